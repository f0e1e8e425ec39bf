"""What int8 buys on this CPU, one matmul at a time: XLA (the backend jaxfound's w8a8 runs on) against torch.

    python benchmarks/int8_matmul.py --out benchmarks/results/int8_matmul_cpu.json

For the Dense shapes of all-MiniLM-L6-v2 (hidden 384, intermediate 1536) and BERT-base (768, 3072) at M tokens:
  xla f32         jnp.dot float32
  xla int8        lax.dot_general int8 x int8 -> int32 (what quant.int8.quantized_dot does in w8a8)
  xla w8a8 op     the whole w8a8 Dense as XLA ops: per-token absmax -> int8, the int8 dot, rescale to float32
  vnni w8a8 op    the same w8a8 Dense as jaxfound's AVX-512 VNNI kernel (quant/int8_dense.cc, what
                  quantized_dot runs on such CPUs); absent where the kernel is unavailable
  torch f32       torch.matmul float32 (MKL / oneDNN)
  torch int8      torch dynamic int8 Linear (fbgemm, VNNI kernels): quantize activations, int8 GEMM, rescale
Rates are in G(FL)OP/s (2*M*K*N per call); ratios are against xla f32 of the same shape, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = [(384, 1536), (1536, 384), (384, 384), (768, 3072), (3072, 768)]


def rate(flops: float, reps: int, fn, *args) -> float:
    """G(FL)OP/s of fn(*args) (which must block until its result is ready), median of reps calls."""
    fn(*args)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return flops / statistics.median(times) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 1024])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from jax import lax

    from jaxfound.quant import kernel
    from jaxfound.quant.int8 import w8a8_dot_xla

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    f32 = jax.jit(lambda x, w: jnp.dot(x, w))
    i8 = jax.jit(lambda x, w: lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32))
    w8a8 = jax.jit(w8a8_dot_xla)
    vnni = jax.jit(kernel.w8a8_dense) if kernel.available() else None
    rows = []
    for M in args.tokens:
        for K, N in SHAPES:
            x = rng.standard_normal((M, K)).astype(np.float32)
            w = rng.standard_normal((K, N)).astype(np.float32)
            xj, wj = jnp.asarray(x), jnp.asarray(w)
            xq = jnp.asarray(rng.integers(-127, 128, (M, K)), jnp.int8)
            wq = jnp.asarray(rng.integers(-127, 128, (K, N)), jnp.int8)
            scale = jnp.full((N,), 0.01, jnp.float32)
            flops = 2.0 * M * K * N
            lin = torch.nn.Linear(K, N, bias=False)
            qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, torch.qint8)
            xt, wt = torch.from_numpy(x), torch.from_numpy(w)
            n = args.reps
            r = {"M": M, "K": K, "N": N,
                 "xla_f32": rate(flops, n, lambda a, b: f32(a, b).block_until_ready(), xj, wj),
                 "xla_int8": rate(flops, n, lambda a, b: i8(a, b).block_until_ready(), xq, wq),
                 "xla_w8a8_op": rate(flops, n, lambda a, b, c: w8a8(a, b, c).block_until_ready(), xj, wq, scale)}
            if vnni is not None:
                r["vnni_w8a8_op"] = rate(flops, n, lambda a, b, c: vnni(a, b, c).block_until_ready(), xj, wq, scale)
            with torch.no_grad():
                r["torch_f32"] = rate(flops, n, torch.matmul, xt, wt)
                r["torch_int8_dynamic"] = rate(flops, n, qlin, xt)
            rows.append(r)

    cols = ["xla_f32", "xla_int8", "xla_w8a8_op", "vnni_w8a8_op", "torch_f32", "torch_int8_dynamic"]
    cols = [c for c in cols if c in rows[0]]
    print(f"G(FL)OP/s, median of {args.reps}; (x) = ratio to xla f32 of the same shape")
    print(f"{'M':>5} {'K':>5} {'N':>5} " + " ".join(f"{c:>20}" for c in cols))
    for r in rows:
        cells = [f"{r[c]:8.0f} ({r[c] / r['xla_f32']:4.2f}x)" for c in cols]
        print(f"{r['M']:>5} {r['K']:>5} {r['N']:>5} " + " ".join(f"{c:>20}" for c in cells))
    summary = {c: float(np.exp(np.mean([np.log(r[c] / r["xla_f32"]) for r in rows]))) for c in cols}
    print("geometric mean over shapes (x xla f32): " + ", ".join(f"{c} {v:.2f}" for c, v in summary.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "device": str(jax.devices()[0].device_kind),
                                              "rows": rows, "geomean_ratio_to_xla_f32": summary}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
