"""docs/scaling.md from `jaxfound compile`: each recipe's train step compiled ahead of time for TPU v5e and v5p slices
on this CPU host (libtpu's topology descriptions; no TPU attached), under a few meshes; per-chip memory, whether it
fits, the roofline step-time estimate from XLA's counts and the MFU it implies; the recommended mesh is the fitting
one with the highest estimated MFU.

    python benchmarks/scaling.py                      # writes benchmarks/results/scaling_tpu.json and docs/scaling.md
    python benchmarks/scaling.py --quick              # one topology, fewer meshes (a smoke run)
    python benchmarks/scaling.py --redo gpt2_medium   # recompile the rows of models matching a name, keep the rest

Every number is a compiler estimate for a slice that is not attached, labelled so in the table. Recipes compile with
model.scan_layers=true (one block compiled; the same step as unrolled, tests/test_scan.py) to keep compile time low.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxfound.accelerators import GIB, tpu_chip  # noqa: E402
from jaxfound.app.compile import compile_for_topology  # noqa: E402
from jaxfound.config import load_config  # noqa: E402

RECIPES = {  # name -> (recipe, overrides, [(topology, [mesh names])]): the slices each recipe is sized for
    # without remat its activations (8 x 1024 tokens per chip) overflow a v5e chip; the compiler said 16+ GiB
    "gpt2_medium (clm, seq 1024, bf16, remat full)": ("gpt2_medium_clm.yaml", ["model.remat=full"],
                                                      [("v5e:2x2", ["fsdp", "data"]), ("v5p:2x2x1", ["fsdp"])]),
    # twice the rows per chip (16 x 1024 tokens): the TPU compiler tiles the (tokens, 4096) x (4096, 1024) products
    # with far fewer re-reads of the activations from 16384 rows on (benchmarks/tpu_matmul_tiling.py)
    "gpt2_medium (clm, seq 1024, bf16, remat full, batch 64)": (
        "gpt2_medium_clm.yaml", ["model.remat=full", "train.batch_size=64"],
        [("v5e:2x2", ["data", "fsdp"]), ("v5p:2x2x1", ["fsdp"])]),
    "llama_1b (clm, seq 2048, bf16)": ("llama_1b_clm.yaml", [], [("v5e:4x4", ["fsdp"]), ("v5p:2x2x1", ["fsdp"])]),
    "gpt2_small (clm, seq 1024, bf16)": ("gpt2_small_clm.yaml", [], [("v5e:2x2", ["data"]), ("v5p:2x2x1", ["data"])]),
    "bert_base (mlm, seq 128, bf16)": ("bert_base_mlm.yaml", [], [("v5e:2x2", ["data"]), ("v5p:2x2x1", ["data"])]),
}
MESHES = {"data": ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1"],
          "fsdp": ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"]}
COMMON = ["model.scan_layers=true"]
# hand-written, below the table: what the numbers mean where they surprised someone (issue #20)
NOTES = """\
Notes. Collectives are counted once per logical op (`jaxfound.app.compile.collectives`: one per channel_id, an
async pair at its `-done`). The first table counted every textual copy, and gpt2_medium on v5e:2x2 showed 35.4 GB of
collectives per chip per step (MFU 28.5%, bound by collectives) against 3.0 GB on v5p:2x2x1. That 12x was a
counting artefact: on v5e, libtpu's async collective fusion copies an all-gather (same channel_id) into its start,
each compute fusion it overlaps and its done, so the one 103 MB all-gather of the fsdp-sharded embedding table
(bf16[50304,1024]) appeared 14 times in the unrolled 1-layer compile and 26 times in the 2-layer one, and the
1-/2-layer extrapolation made the +12 copies per layer 970 all-gathers and 31.8 GB; `collective-permute-start`
tuples also counted operand and result (3.6 GB for 1.8). Counted once, v5e moves 2.50 GB (all-gather 0.66,
collective-permute 1.79, all-to-all 0.05) and v5p 3.00 GB (all-gather 1.46, all-reduce 1.47). The compilers do
choose differently, with similar bytes: v5e turns most fsdp weight gathers and gradient reductions into collective
matmuls (bidirectional-ring collective-permutes, f32 for gradients), v5p issues plain all-gathers and all-reduces
the f32 gradients. v5e is now bound by HBM bytes: XLA's bytes_accessed is 211 GB per step there against 110 GB on
v5p (8.25 vs 4.1 GB per added layer). Not explained yet: the 1-layer v5e compile with libtpu's async collective
fusion off (LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=false) has no copies (the old per-copy count
gives 15 all-gathers, 128.5 MB, as the new count does with it on; 50 and 1.53 GB the old way with it on) and
reports 22.1 GB of bytes_accessed against 21.3 GB with it on, so the copies do not inflate that count there.

gpt2_medium on v5e:2x2, more settings (stop 33): a pure data-parallel mesh (4, 1, 1) fits (7.75 GiB: params and
Adam moments replicated, one 297 MiB gradient all-reduce) and estimates 42.6% (was 39.1% with fsdp): the fsdp
collective matmuls are gone, but the step is still bound by XLA's bytes (237 ms of HBM time against 118 ms of
compute). `model.remat=dots_saveable` with fsdp does not fit (17.43 GiB) and estimates 31.9%. XLA counts 7.42 GB
of bytes_accessed per added layer on v5e (23.35 GB for one layer, 30.78 GB for two, data mesh), while the operands
plus results of the optimized program's top-level instructions of layer 1 sum to ~2.5 GB: XLA's TPU cost model
charges more than each op reading its inputs and writing its outputs once (re-reads per tile, by our reading). With
~2.5 GB a layer the step would be compute-bound; which count a v5e follows can only be measured on one
(`jaxfound bench -c configs/gpt2_medium_clm.yaml` on a v5e slice), not settled from a CPU host.

Where those bytes come from, and the batch that halves them per token (stop 35): each of the layer's products
compiled alone for one chip (`python benchmarks/tpu_matmul_tiling.py`, results/tpu_matmul_tiling.json) is charged
its operands read once times a factor that depends on the rows per chip. On v5e the (T, 4096) x (4096, 1024) products
(the MLP's down projection and the up projection's input gradient) and the MLP weight gradients are charged 3.9x and
3.7x at T = 8192 (the recipe's 8 x 1024 tokens per chip) and 1.19x and 1.73x from T = 16384 on: the compiler picks
another tiling there, and re-reads the activations far less. v5p switches at T = 8192 already (1.36x), which is most
of v5p's 4.1 against v5e's 8.25 GB per layer. So gpt2_medium on v5e:2x2 with train.batch_size=64 (16 x 1024 tokens
per chip, data mesh) counts 10.81 GB per added layer for twice the tokens (7.42 at batch 32) and estimates 57.6%
(fits: 10.89 GiB), the recommended setting. With fsdp the same batch estimates 33.3%: its collective matmuls are
charged 605 ms of HBM time. The q / k / v / out products (T, 1024) x (1024, 1024) stay at ~2.9x on v5e at every T.
"""


def measure(recipes: dict, quick: bool = False, done: list[dict] = (), save=lambda rows: None) -> list[dict]:
    """Every (recipe, slice, mesh) not in done; save(rows) after each, so an interrupted run resumes."""
    rows = list(done)
    seen = {(r["model"], r["topology"], r["mesh_name"]) for r in rows}
    for name, (recipe, overrides, slices) in recipes.items():
        for topology, mesh_names in slices[:1] if quick else slices:
            for mesh_name in mesh_names[:1] if quick else mesh_names:
                if (name, topology, mesh_name) in seen:
                    continue
                mesh = MESHES[mesh_name]
                cfg = load_config(ROOT / "configs" / recipe, [*overrides, *COMMON, *mesh], verb="compile")
                t0 = time.perf_counter()
                try:
                    r = compile_for_topology(cfg, topology, decoder_steps=False, progress=lambda s: None)
                except Exception as e:  # a mesh the batch or heads do not divide: recorded, not fatal
                    print(f"{name} {topology} {mesh_name}: {type(e).__name__}: {str(e)[:200]}")
                    rows.append({"model": name, "topology": topology, "mesh_name": mesh_name, "error": str(e)[:300]})
                    save(rows)
                    continue
                s = r["steps"][0]
                row = {"model": name, "recipe": recipe, "topology": topology, "mesh_name": mesh_name,
                       "mesh": r["mesh"], "params": r["params"], "batch": r["batch_size"], "seq": r["seq_len"],
                       "chips": r["devices"], "memory_bytes": s["memory"]["total"],
                       "hbm_bytes": r["hbm_bytes_per_device"],
                       "fits": s["fits"], "est_step_s": s.get("est_step_s"), "est_mfu": s.get("est_mfu"),
                       "est_mfu_no_overlap": s.get("est_mfu_no_overlap"), "roofline_s": s.get("roofline_s"),
                       "xla_flops": s["xla_flops"], "model_flops": s.get("model_flops"), "attention": r["attention"],
                       "collective_bytes": sum(c["bytes"] for c in s["collectives"].values()),
                       "compile_s": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                save(rows)
                print(f"{name:36s} {topology:10s} {mesh_name:14s} {row['memory_bytes'] / GIB:7.2f} GiB "
                      f"fits={row['fits']!s:5s} MFU~{100 * (row['est_mfu'] or 0):5.1f}%  ({row['compile_s']} s)")
    order = [(name, topology) for name, (_, _, slices) in recipes.items() for topology, _ in slices]
    order = {key: i for i, key in enumerate(order)}
    return sorted(rows, key=lambda r: order.get((r["model"], r["topology"]), len(order)))


def markdown(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    lines = [
        "# Scaling: the recipes on TPU slices, compiled ahead of time",
        "",
        "Generated by `python benchmarks/scaling.py` (from `jaxfound compile`; do not edit by hand). Each recipe's",
        "exact train step (AdamW, its dtype and remat, `model.scan_layers=true`, `model.attention=auto` = splash",
        "attention on TPU) is compiled by libtpu for the slice on a CPU host; no TPU was attached. Memory is XLA's",
        "buffer assignment per chip; *est. MFU* is model FLOPs over (roofline step time x peak), where the roofline",
        "is the largest of XLA FLOPs / peak, XLA bytes / HBM bandwidth and collective bytes / ICI bandwidth",
        "(collectives overlapped with compute; *no overlap* adds them instead). FLOPs, bytes and collectives of the",
        "scanned step come from unrolled 1- and 2-layer compiles, extrapolated (XLA counts a loop body once). A",
        "compiler estimate, not a measurement. Recommended: the fitting mesh (and batch, where a recipe has two rows)",
        "with the highest estimate per recipe and slice.",
        "",
        "| model | slice | chips | mesh (data, fsdp, tensor) | memory / chip | HBM / chip | fits | est. step "
        "| est. MFU | no overlap | bound by | recommended |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = {}
    for r in ok:
        key = (r["recipe"], r["topology"])  # batch variants of one recipe compete
        if r["fits"] and (key not in best or (r["est_mfu"] or 0) > (best[key]["est_mfu"] or 0)):
            best[key] = r
    for r in ok:
        m = r["mesh"]
        rec = "**yes**" if best.get((r["recipe"], r["topology"])) is r else ""
        lines.append(f"| {r['model']} | {r['topology']} | {r['chips']} | {m['data']}, {m['fsdp']}, {m['tensor']} | "
                     f"{r['memory_bytes'] / GIB:.2f} GiB | {r['hbm_bytes'] / GIB:.0f} GiB | "
                     f"{'yes' if r['fits'] else '**no**'} | "
                     + (f"{r['est_step_s'] * 1e3:.0f} ms | {100 * (r['est_mfu'] or 0):.1f}% | "
                        f"{100 * (r['est_mfu_no_overlap'] or 0):.1f}% | "
                        f"{max(r['roofline_s'], key=r['roofline_s'].get)} | " if r.get("est_step_s") else
                        "- | - | - | (the TPU compiler refused it: out of HBM) | ") + f"{rec} |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Meshes that could not be built (the batch or the heads do not divide):", ""]
        lines += [f"- {r['model']} on {r['topology']}, {r['mesh_name']}: {r['error'].splitlines()[0][:160]}"
                  for r in failed]
    chips = sorted({r["topology"].split(":")[0] for r in ok})
    lines += ["", *NOTES.splitlines()]
    lines += ["", "Chip figures used: " + "; ".join(
        f"{c}: {tpu_chip(c + (':2x2' if c != 'v5p' else ':2x2x1')).hbm_bytes // GIB} GiB HBM, "
        f"{tpu_chip(c + (':2x2' if c != 'v5p' else ':2x2x1')).peak_bf16 / 1e12:.0f} TFLOP/s bf16" for c in chips) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="each recipe's first slice and mesh only")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling_tpu.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "scaling.md"))
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out, compile the rest")
    p.add_argument("--redo", metavar="NAME", help="keep the rows in --out except those of models whose name "
                   "contains NAME, and compile those again")
    args = p.parse_args(argv)
    out = Path(args.out)
    done = json.loads(out.read_text()) if (args.resume or args.redo) and out.is_file() else []
    done = [r for r in done if not (args.redo and args.redo in r["model"])]
    rows = measure(RECIPES, args.quick, done, lambda rows: out.write_text(json.dumps(rows, indent=1) + "\n"))
    out.write_text(json.dumps(rows, indent=1) + "\n")
    Path(args.doc).write_text(markdown(rows))
    print(f"wrote {args.out} and {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
