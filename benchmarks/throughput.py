"""BERT masked-LM train step on this CPU: jaxfound against transformers' PyTorch BertForMaskedLM + torch AdamW.

Both run in one process, alternating rounds of a few steps so that they share the machine's noise:

    python benchmarks/throughput.py --out benchmarks/results/throughput_cpu.json
    python benchmarks/throughput.py --models small --rounds 6

Both sides: batch 8 x seq 128, fp32, dropout 0.1 (HF also drops attention probabilities), AdamW, gradient
clipping at norm 1.0, 15% of tokens predicted. PyTorch gets the standard HF MLM setup (labels -100 except at
the masked positions, full-vocabulary logits); jaxfound computes logits only at the masked positions.

What limits the ratio: the step is almost all dense matmuls, so the script also times, in the same run, the
step's Dense products one at a time (x @ W, dy @ W.T, x.T @ dy at the step's shapes) as XLA dots and as torch
GEMMs (--no-matmuls skips it), and projects jaxfound's step time were its dense matmuls as fast as torch's:
    projected = jaxfound step - F / (XLA rate) + F / (torch rate)
F being the step's dense-matmul FLOPs (counted from the shapes; attention's two batched products excluded)
and the rates FLOP-weighted over those products.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {
    "small": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024},
    "base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072},
}
TARGETS = {"small": 2.0, "base": 1.3}


def jax_bench(size: str, batch: int, seq: int, dropout: float, extra: list[str]):
    from jaxfound.app.bench import build
    from jaxfound.config import load_config

    recipe = ROOT / "configs" / ("bert_small_mlm.yaml" if size == "small" else "bert_base_mlm.yaml")
    overrides = [f"model.{k}={v}" for k, v in SIZES[size].items()] + [
        "model.vocab_size=30522", "model.dtype=float32", "model.param_dtype=float32", f"model.dropout={dropout}",
        f"train.batch_size={batch}", f"data.seq_len={seq}", "mesh.data=1", "train.clip_norm=1.0", *extra]
    return build(load_config(recipe, overrides, verb="bench"))


def torch_bench(size: str, batch_np: dict, seq: int, dropout: float, threads: int):
    """A closure running one HF BertForMaskedLM + AdamW step on the same tokens and masked positions."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = SIZES[size]
    cfg = BertConfig(vocab_size=30522, hidden_size=s["hidden_size"], num_hidden_layers=s["num_layers"],
                     num_attention_heads=s["num_heads"], intermediate_size=s["intermediate_size"],
                     max_position_embeddings=512, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    model = BertForMaskedLM(cfg).train()
    decay = [p for n, p in model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, eps=1e-6)
    ids = torch.as_tensor(batch_np["input_ids"], dtype=torch.long)
    labels = torch.full_like(ids, -100)
    rows = torch.arange(ids.shape[0])[:, None]
    pos = torch.as_tensor(batch_np["mlm_positions"], dtype=torch.long)
    labels[rows, pos] = torch.as_tensor(batch_np["mlm_labels"], dtype=torch.long)
    mask = torch.ones_like(ids)

    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(fn, n: int) -> list[float]:
    import time

    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def dense_products(size: str, batch: int, seq: int, n_pred: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every Dense in one jaxfound MLM forward (the backward runs two more products of each).

    All layers but the last see every token; the last computes keys / values for every token and the rest only
    at the n_pred predicted positions, as do the MLM head's transform and its tied vocabulary decoder.
    """
    s, T = SIZES[size], batch * seq
    H, inner, layers = s["hidden_size"], s["intermediate_size"], s["num_layers"]
    full = [(T, H, H)] * 4 + [(T, H, inner), (T, inner, H)]  # query, key, value, out (separate Dense), MLP
    last = [(T, H, H)] * 2 + [(n_pred, H, H)] * 2 + [(n_pred, H, inner), (n_pred, inner, H)]
    head = [(n_pred, H, H), (n_pred, H, 30522)]
    return full * (layers - 1) + last + head


def matmul_rates(size: str, args, n_pred: int) -> dict:
    """GFLOP/s of the step's Dense products as XLA dots and as torch GEMMs, alternating, in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    products = dense_products(size, args.batch, args.seq, n_pred)
    rng = np.random.default_rng(0)
    xla = {"fwd": jax.jit(lambda x, w, d: x @ w), "dx": jax.jit(lambda x, w, d: d @ w.T),
           "dw": jax.jit(lambda x, w, d: x.T @ d)}
    pt = {"fwd": lambda x, w, d: x @ w, "dx": lambda x, w, d: d @ w.T, "dw": lambda x, w, d: x.T @ d}
    rows, xla_s, torch_s, total = [], 0.0, 0.0, 0.0
    for M, K, N in sorted(set(products)):
        count = products.count((M, K, N))
        host = [rng.standard_normal(shape, dtype=np.float32) for shape in ((M, K), (K, N), (M, N))]
        dev, ten = [jnp.asarray(a) for a in host], [torch.from_numpy(a) for a in host]
        flops = 2 * M * K * N
        for kind in ("fwd", "dx", "dw"):
            fx = functools.partial(lambda f, a: jax.block_until_ready(f(*a)), xla[kind], dev)
            ft = functools.partial(lambda f, a: f(*a), pt[kind], ten)
            tx, tt = [], []
            for _ in range(args.matmul_rounds):  # blocks, not single calls: torch's OpenMP threads spin for a
                tx += timed(fx, args.matmul_reps + 1)[1:]  # while after a GEMM and would slow an XLA call right
                tt += timed(ft, args.matmul_reps + 1)[1:]  # after it; the first call of each block is dropped
            tx, tt = statistics.median(tx), statistics.median(tt)
            rows.append({"M": M, "K": K, "N": N, "product": kind, "count": count,
                         "xla_gflops": flops / tx / 1e9, "torch_gflops": flops / tt / 1e9})
            xla_s, torch_s, total = xla_s + count * tx, torch_s + count * tt, total + count * flops
    return {"dense_flops_per_step": total, "xla_gflops": total / xla_s / 1e9, "torch_gflops": total / torch_s / 1e9,
            "products": rows}


def compare(size: str, args) -> dict:
    import jax
    import numpy as np

    bench = jax_bench(size, args.batch, args.seq, args.dropout, args.jax_override)
    host = {k: np.array(jax.device_get(v)) for k, v in bench.batch.items()}  # writable copies for torch
    torch_step = torch_bench(size, host, args.seq, args.dropout, args.threads)
    bench.run(args.warmup)
    timed(torch_step, args.warmup)
    jx, pt = [], []
    for r in range(args.rounds):  # alternate, and alternate who goes first, so both see the same noise
        order = [lambda: jx.extend(bench.run(args.steps)), lambda: pt.extend(timed(torch_step, args.steps))]
        for run in order if r % 2 == 0 else order[::-1]:
            run()
    tokens = args.batch * args.seq
    j, t = statistics.median(jx), statistics.median(pt)
    limits = {}
    if args.matmuls:
        mm = matmul_rates(size, args, int(np.size(host["mlm_positions"])))
        F = mm["dense_flops_per_step"]
        projected = j - F / (mm["xla_gflops"] * 1e9) + F / (mm["torch_gflops"] * 1e9)
        limits = {"matmul": mm, "jaxfound_step_s_at_torch_matmul_rate": projected,
                  "ratio_at_torch_matmul_rate": t / projected}
    return {"model": size, **SIZES[size], "vocab_size": 30522, "batch": args.batch, "seq_len": args.seq,
            "dtype": "float32", "dropout": args.dropout, "threads": args.threads, "steps_each": len(jx),
            "compile_s": round(bench.compile_s, 2), "xla_flops_per_step": bench.cost.get("flops"),
            "jaxfound_step_s": j, "torch_step_s": t,
            "jaxfound_tokens_per_s": tokens / j, "torch_tokens_per_s": tokens / t, "ratio": t / j,
            "target_ratio": TARGETS[size],
            "jaxfound_step_s_all": jx, "torch_step_s_all": pt, **limits}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["small", "base"], choices=list(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per framework per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-matmuls", dest="matmuls", action="store_false",
                    help="skip timing the step's Dense products (XLA dot vs torch GEMM)")
    ap.add_argument("--matmul-rounds", type=int, default=3, help="alternating blocks per Dense product")
    ap.add_argument("--matmul-reps", type=int, default=5, help="timed calls per block")
    ap.add_argument("--jax-override", nargs="*", default=[], help="extra jaxfound config overrides")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args(argv)

    results = [compare(size, args) for size in args.models]
    print(f"\nBERT MLM train step, batch {args.batch} x seq {args.seq}, fp32, {args.threads} threads "
          f"(median of {args.rounds * args.steps} alternating steps)")
    print(f"{'model':<6} {'jaxfound tok/s':>15} {'PyTorch tok/s':>14} {'ratio':>7} {'target':>7}")
    for r in results:
        ok = "ok" if r["ratio"] >= r["target_ratio"] else "below"
        print(f"{r['model']:<6} {r['jaxfound_tokens_per_s']:>15,.0f} {r['torch_tokens_per_s']:>14,.0f} "
              f"{r['ratio']:>6.2f}x {r['target_ratio']:>6.1f}x {ok}")
    for r in results if args.matmuls else []:
        mm = r["matmul"]
        print(f"\n{r['model']}: the step's Dense products, GFLOP/s (XLA dot | torch GEMM), "
              f"{mm['dense_flops_per_step'] / 1e9:.0f} GFLOP of the step's {r['xla_flops_per_step'] / 1e9:.0f}")
        print(f"{'M x K x N':>18} {'count':>5}   {'fwd':>11}   {'dx':>11}   {'dw':>11}")
        by_shape = {}
        for p in mm["products"]:
            by_shape.setdefault((p["M"], p["K"], p["N"], p["count"]), {})[p["product"]] = p
        for (M, K, N, count), ps in by_shape.items():
            cells = "   ".join(f"{ps[k]['xla_gflops']:>4.0f} | {ps[k]['torch_gflops']:>4.0f}"
                               for k in ("fwd", "dx", "dw"))
            print(f"{f'{M} x {K} x {N}':>18} {count:>5}   {cells}")
        print(f"{'all, FLOP-weighted':>24}   {mm['xla_gflops']:.0f} | {mm['torch_gflops']:.0f}  ->  at torch's "
              f"matmul rate jaxfound's step would take {r['jaxfound_step_s_at_torch_matmul_rate']:.3f} s instead of "
              f"{r['jaxfound_step_s']:.3f} s: ratio {r['ratio_at_torch_matmul_rate']:.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
