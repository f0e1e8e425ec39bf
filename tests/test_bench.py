"""jaxfound.app.bench: per-device bytes by mesh, XLA FLOP counts, peaks, synthetic batches, the report and the verb."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfound.app import bench
from jaxfound.cli import main
from jaxfound.config import load_config
from jaxfound.errors import JaxfoundError

TINY = ["model.hidden_size=64", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=128",
        "model.max_position=32", "model.vocab_size=1024", "data.seq_len=32", "train.batch_size=8"]


@pytest.fixture(scope="module")
def reports():
    """One tiny BERT benchmarked on a data=8 and on an fsdp=8 mesh (8 simulated CPU devices)."""
    out = {}
    for mesh in ("data", "fsdp"):
        other = "fsdp" if mesh == "data" else "data"
        cfg = load_config(None, [*TINY, f"mesh.{mesh}=8", f"mesh.{other}=1"])
        out[mesh] = bench.benchmark(cfg, steps=2, warmup=1, measure_cpu_peak=False)
    return out


def test_fsdp_holds_about_an_eighth_of_the_state_per_device(reports):
    data, fsdp = reports["data"], reports["fsdp"]
    n_params = data["params_bytes_total"] // 4
    assert data["params_bytes_per_device"] == n_params * 4  # replicated: every device holds all params
    assert data["opt_bytes_per_device"] >= 2 * n_params * 4  # Adam's two moments
    ratio = fsdp["state_bytes_per_device"] / data["state_bytes_per_device"]
    # by hand: vectors without an 'embed' axis stay replicated: 4 LayerNorms (scale + bias), the q/k/v biases,
    # the MLP-up and MLM-transform biases ('mlp') and the MLM output bias ('vocab'); the rest splits 8 ways
    replicated = 4 * 2 * 64 + 3 * 64 + 128 + 64 + 1024
    expected = (replicated + (n_params - replicated) / 8) / n_params
    assert ratio == pytest.approx(expected, rel=0.01)
    assert 1 / 8 < ratio < 0.15


def test_xla_cost_analysis_counts_the_per_device_program():
    """The reason bench multiplies 'flops' by the device count: a split matmul reports 1/8 of its FLOPs."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    x, w = jnp.ones((64, 128)), jnp.ones((128, 256))
    whole = jax.jit(jnp.dot).lower(x, w).compile().cost_analysis()["flops"]
    split = jax.jit(jnp.dot, in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))).lower(
        x, w).compile().cost_analysis()["flops"]
    assert whole == pytest.approx(2 * 64 * 128 * 256)
    assert split == pytest.approx(whole / 8)


def test_total_flops_differ_by_the_replicated_optimizer_update(reports):
    """Per-device FLOPs x devices. data=8 repeats the (elementwise) AdamW update on 8 replicas, fsdp=8 splits it."""
    data, fsdp = reports["data"], reports["fsdp"]
    assert data["flops_per_step"] == pytest.approx(data["flops_per_step_per_device"] * 8)
    n_params = data["params_bytes_total"] // 4
    extra_per_param = (data["flops_per_step"] - fsdp["flops_per_step"]) / (7 * n_params)
    assert 10 < extra_per_param < 60  # clipping, AdamW, the non-finite guard: some tens of FLOPs per param
    # the model's matmuls, by hand: 6 x (encoder matmul params) x tokens is a lower bound
    d, f, tokens = 64, 128, 8 * 32
    assert data["flops_per_step"] > 6 * (4 * d * d + 2 * d * f) * tokens


def test_report_is_consistent(reports):
    r = reports["data"]
    assert r["tokens_per_step"] == 8 * 32
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s_median"])
    assert r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
    assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s_median"])
    assert r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and r["devices"] == 8
    assert r["memory"] is None  # the CPU backend reports no memory stats
    assert r["peak_flops_per_s"] is None and r["mfu"] is None  # measure_cpu_peak=False


@pytest.mark.parametrize("kind,dtype,peak", [
    ("TPU v5 lite", "bfloat16", 197e12), ("TPU v5p", "bfloat16", 459e12), ("TPU v4", "float32", 275e12),
    ("TPU v6 lite", "bfloat16", 918e12), ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12), ("NVIDIA H200", "bfloat16", 989e12),
])
def test_peak_table_by_device_kind(kind, dtype, peak):
    got, source = bench.peak_flops(SimpleNamespace(device_kind=kind, platform="gpu"), dtype)
    assert got == peak and "table" in source


def test_cpu_peak_is_a_measured_matmul():
    peak, source = bench.peak_flops(jax.devices()[0], "float32")
    assert 1e9 < peak < 1e14 and "measured" in source


def test_unknown_accelerator_has_no_peak():
    assert bench.peak_flops(SimpleNamespace(device_kind="Mystery X1", platform="gpu"), "float32")[0] is None


def test_synthetic_mlm_batch_has_pipeline_shapes():
    cfg = load_config(None, TINY)
    b = bench.synthetic_batch(cfg, 1024)
    P_ = 5  # ceil(32 * 0.15)
    assert b["input_ids"].shape == (8, 32) and b["input_ids"].dtype == np.int32
    assert b["mlm_positions"].shape == b["mlm_labels"].shape == b["mlm_weights"].shape == (8, P_)
    for row in b["mlm_positions"]:
        assert len(set(row)) == P_ and list(row) == sorted(row) and row.max() < 32
    assert b["input_ids"].max() < 1024


def test_synthetic_clm_batch_has_no_mlm_fields():
    cfg = load_config(None, [*TINY, "model.arch=gpt", "train.task=clm"])
    assert set(bench.synthetic_batch(cfg, 1024)) == {"input_ids", "segment_ids"}


def test_vocab_defaults_to_the_tokenizer_size_rounded_up():
    assert bench.resolve_vocab(load_config(None, ["model.vocab_size=0", "data.tokenizer_vocab=1000"])) == 1024


def test_bench_rejects_fine_tuning_tasks_and_bad_batches():
    with pytest.raises(JaxfoundError, match="train.task=ner"):
        bench.build(load_config(None, [*TINY, "train.task=ner"]))
    with pytest.raises(JaxfoundError, match="batch_size=4"):
        bench.build(load_config(None, [*TINY, "train.batch_size=4", "mesh.data=8"]))


def test_bench_verb_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--steps", "1", "--warmup", "0", "--out", str(out), *TINY, "model.arch=gpt",
               "train.task=clm", "mesh.fsdp=2", "mesh.data=4"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["arch"] == "gpt" and report["mesh"]["fsdp"] == 2 and report["tokens_per_s"] > 0
    assert "tokens/s" in capsys.readouterr().out
