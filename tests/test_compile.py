"""`jaxfound compile`: recipes compiled ahead of time for a TPU slice on this CPU host (libtpu's topology description,
no TPU attached): memory and FLOPs come back, the TPU and CPU compiles of one step count the same FLOPs, an oversized
recipe is reported as not fitting, splash attention is what a TPU step runs, and bad topologies are named."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax
import pytest

from jaxfound.accelerators import TPU_CHIPS, tpu_chip
from jaxfound.app import compile as aot
from jaxfound.app.bench import resolve_vocab
from jaxfound.cli import main
from jaxfound.config import load_config
from jaxfound.errors import JaxfoundError
from jaxfound.models import build_model
from jaxfound.sharding import make_mesh
from jaxfound.tasks import get_task

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install 'jaxfound[tpu]'): no TPU compiler")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUIET = dict(progress=lambda line: None)


def _cfg(recipe: str, *overrides: str):
    return load_config(CONFIGS / recipe, list(overrides), verb="compile")


def _cpu_flops(cfg, devices: int) -> float:
    """The same train step compiled for this host's CPU devices with the same mesh: its per-device FLOPs."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=resolve_vocab(cfg)))
    task = get_task(cfg.train.task, cfg.model.arch)
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[:devices])
    step, state, batch = aot.train_step_abstract(cfg, build_model(cfg.model, task.head), task, mesh)
    return aot._cost(step.lower(state, batch).compile())["xla_flops"]


@pytest.mark.parametrize(("recipe", "batch"), [("bert_base_mlm.yaml", 32), ("gpt2_small_clm.yaml", 16)])
def test_base_recipes_compile_for_v5e_with_memory_flops_and_the_cpu_flop_count(recipe, batch):
    """The real recipes (scanned layers, XLA attention so every FLOP is visible to the cost analysis; a smaller
    batch keeps the CPU compile small and GPT-2's 1024 x 1024 float32 logits within a v5e chip): memory per chip,
    FLOPs, and the same FLOPs as the CPU compile within 10%."""
    cfg = _cfg(recipe, "model.scan_layers=true", "model.attention=xla", f"train.batch_size={batch}")
    r = aot.compile_for_topology(cfg, "v5e:2x2", decoder_steps=False, count_layers=False, **QUIET)
    [train] = r["steps"]
    assert r["devices"] == 4 and r["device_kind"] == "TPU v5 lite" and r["mesh"] == {"data": 4, "fsdp": 1,
                                                                                        "tensor": 1}
    assert train["fits"] and 0 < train["memory"]["total"] < 16 * 2**30
    # Adam's params + two moments in float32 are arguments: at least 12 bytes per parameter, all replicated
    assert train["memory"]["argument"] >= 12 * r["params"]
    assert train["collectives"]["all-reduce"]["count"] >= 1  # data parallel: gradients are summed
    cpu = _cpu_flops(cfg, 4)  # the same (scanned) step: both count the layer loop's body once
    tpu = train["xla_flops"]
    print(f"{recipe}: TPU {tpu:.4e} vs CPU {cpu:.4e} FLOPs per device ({tpu / cpu:.3f})")
    assert abs(tpu / cpu - 1) <= 0.10


def test_scanned_steps_count_every_layer():
    """XLA counts a scanned loop's body once; the report's counts (from unrolled 1- and 2-layer compiles) equal the
    unrolled 5-layer step's own, and the analytic model FLOPs describe the same work."""
    recipe, common = "gpt_tiny_clm.yaml", ("model.num_layers=5", "model.attention=xla", "train.batch_size=8")
    scanned = aot.compile_for_topology(_cfg(recipe, *common, "model.scan_layers=true"), "v5e:2x2",
                                       decoder_steps=False, **QUIET)["steps"][0]
    unrolled = aot.compile_for_topology(_cfg(recipe, *common), "v5e:2x2", decoder_steps=False, **QUIET)["steps"][0]
    assert scanned["xla_flops_as_compiled"] < 0.5 * unrolled["xla_flops"]  # the loop body, counted once
    assert abs(scanned["xla_flops"] / unrolled["xla_flops"] - 1) < 0.02
    assert abs(scanned["bytes_accessed"] / unrolled["bytes_accessed"] - 1) < 0.1
    assert 0.6 < unrolled["model_flops"] / unrolled["xla_flops"] < 1.4
    assert 0 < scanned["est_mfu"] <= 1 and scanned["est_mfu_no_overlap"] <= scanned["est_mfu"]


def test_an_oversized_recipe_is_reported_as_not_fitting(capsys, tmp_path):
    out = tmp_path / "llama_1b.json"
    code = main(["compile", "-c", str(CONFIGS / "llama_1b_clm.yaml"), "--topology", "v5e:2x2", "mesh.data=-1",
                 "mesh.fsdp=1", "train.batch_size=8", "data.seq_len=256", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    train = r["steps"][0]
    # 1.2B params replicated on each chip with float32 Adam state: ~14.8 GB before activations, over 16 GiB
    assert r["params"] > 1.1e9 and not r["fits"] and not train["fits"]
    assert train["memory"]["total"] > 16 * 2**30 and train["headroom_bytes"] < 0
    assert "DOES NOT FIT" in text and "does NOT fit on v5e:2x2" in text


def test_a_tpu_step_runs_splash_attention_and_decoders_compile_prefill_and_decode():
    cfg = _cfg("llama_tiny_clm.yaml", "train.batch_size=8")
    r = aot.compile_for_topology(cfg, "v5e:2x2", decode_batch=4, **QUIET)
    assert [s["step"] for s in r["steps"]] == ["train", "prefill", "decode"]
    assert r["steps"][0]["kernel_flops_added"] > 0  # splash's work, which XLA's counts cannot see
    assert all(s["fits"] and s["xla_flops"] > 0 for s in r["steps"])
    # the same recipe's lowered step contains the Pallas (Mosaic) kernel
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=resolve_vocab(cfg)))
    task = get_task("clm", "llama")
    from jaxfound.accelerators import topology_devices

    mesh = make_mesh(cfg.mesh, devices=topology_devices("v5e:2x2"))
    step, state, batch = aot.train_step_abstract(cfg, build_model(cfg.model, task.head), task, mesh)
    assert "tpu_custom_call" in step.lower(state, batch).as_text()


def test_bad_topologies_name_the_valid_ones(capsys):
    with pytest.raises(JaxfoundError, match=r"topology 'v9:2x2' is not valid.*v5e:2x2 \(v5e: 16 GiB"):
        tpu_chip("v9:2x2")
    assert main(["compile", "--topology", "v5e:1x1"]) == 2
    assert "libtpu rejects it" in capsys.readouterr().err
    assert {c.name for c in TPU_CHIPS.values()} == {"v3", "v4", "v5e", "v5p", "v6e"}


def test_collectives_are_read_from_hlo_text():
    hlo = """
  %all-reduce.1 = f32[1024,768]{1,0} all-reduce(f32[1024,768]{1,0} %p), channel_id=1, replica_groups={{0,1,2,3}}
  %ag = ((bf16[1,256]{1,0}, bf16[2]{0}), (bf16[4,256]{1,0}, bf16[8]{0})) all-gather-start(bf16[1,256]{1,0} %x, \
bf16[2]{0} %y), channel_id=2, dimensions={0}
  %ag.done = (bf16[4,256]{1,0}, bf16[8]{0}) all-gather-done(%ag)
  %cp = (bf16[96,4096]{1,0}, bf16[96,4096]{1,0}, u32[], u32[]) collective-permute-start(%w), channel_id=3
  %cp.done = bf16[96,4096]{1,0} collective-permute-done(%cp)
  %rs = bf16[128]{0} reduce-scatter(bf16[512]{0} %z), channel_id=4, dimensions={0}
"""
    assert aot.collectives(hlo) == {"all-reduce": {"count": 1, "bytes": 1024 * 768 * 4},
                                    "all-gather": {"count": 1, "bytes": 4 * 256 * 2 + 8 * 2},
                                    "collective-permute": {"count": 1, "bytes": 96 * 4096 * 2},
                                    "reduce-scatter": {"count": 1, "bytes": 128 * 2}}


def test_async_collective_fusion_copies_count_once():
    # TPU's async collective fusion copies one all-gather (one channel) into its start, each continuation fusion
    # it overlaps and its done: a v5e:2x2 gpt2_medium step holds 26 such copies of one embedding gather
    copy = ("  %all-gather.{i} = bf16[50304,1024]{{1,0:T(8,128)(2,1)}} all-gather(%param_0.{i}), channel_id=83, "
            "replica_groups=mesh['axis_0'=1,'axis_1'=4] {{'axis_1'}}, dimensions={{1}}\n")
    other = "  %all-gather.9 = bf16[1024,4096]{1,0} all-gather(%param_0.9), channel_id=98, dimensions={0}\n"
    hlo = "".join(f"%fused_computation.{i} {{\n{copy.format(i=i)}}}\n" for i in range(26)) + other
    assert aot.collectives(hlo) == {"all-gather": {"count": 2, "bytes": (50304 * 1024 + 1024 * 4096) * 2}}


def test_matmul_tiling_benchmark_charges_at_least_the_operands(tmp_path):
    """benchmarks/tpu_matmul_tiling.py on small shapes: every product is charged at least its operands and result
    read once (XLA cannot move fewer bytes than that), and the table's ratio is bytes_accessed over that."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "tpu_matmul_tiling.py"
    spec = importlib.util.spec_from_file_location("tpu_matmul_tiling", path)
    tiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiling)

    out = tmp_path / "tiling.json"
    assert tiling.main(["--hidden", "128", "--mlp", "512", "--rows", "256", "1024", "--chips", "v5e",
                        "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5 * 2
    down = next(r for r in rows if r["product"].startswith("mlp down") and r["rows"] == 256)
    assert down["operands_once"] == 2 * (256 * 512 + 512 * 128 + 256 * 128)  # bf16 operands and result
    for r in rows:
        assert r["bytes_accessed"] >= 0.99 * r["operands_once"] and r["ratio"] == pytest.approx(
            r["bytes_accessed"] / r["operands_once"])


def test_scaling_doc_is_generated_from_the_results_json():
    """docs/scaling.md is benchmarks/scaling.py's markdown of benchmarks/results/scaling_tpu.json, not typed by hand;
    the recommended row per recipe and slice is the fitting one with the highest estimate."""
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("scaling", root / "benchmarks" / "scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    rows = json.loads((root / "benchmarks" / "results" / "scaling_tpu.json").read_text())
    doc = (root / "docs" / "scaling.md").read_text()
    assert scaling.markdown(rows) == doc
    table = [line for line in doc.splitlines() if line.startswith("| gpt2_medium")]
    recommended = [line for line in table if line.endswith("| **yes** |")]
    ok = [r for r in rows if "error" not in r and r["recipe"] == "gpt2_medium_clm.yaml" and r["fits"]]
    for topology in {r["topology"] for r in ok}:
        best = max((r for r in ok if r["topology"] == topology), key=lambda r: r["est_mfu"])
        [line] = [line for line in recommended if f"| {topology} |" in line]
        assert f"{100 * best['est_mfu']:.1f}%" in line and best["model"] in line
