"""What int8 buys on this CPU, one matmul at a time: XLA (the backend jaxfound's w8a8 runs on), jaxfound's
native int8 kernels and torch, side by side in one run.

    python benchmarks/int8_matmul.py --out benchmarks/results/int8_matmul_cpu.json

For NER-sized Dense shapes (all-MiniLM-L6-v2: hidden 384, intermediate 1536; add BERT-base with
--shapes 768x3072 3072x768) at M tokens:
  xla f32         jnp.dot float32
  xla int8        lax.dot_general int8 x int8 -> int32 (what quant.int8.quantized_dot does in w8a8)
  xla w8a8 op     the whole w8a8 Dense as XLA ops: per-token absmax -> int8, the int8 dot, rescale to float32
  <path> w8a8 op  the same w8a8 Dense as each native kernel this CPU supports (quant/kernel.py: avx512_vnni,
                  avx2), packing the weights inside every call; the default path is printed as "w8a8 kernel path"
  <path> packed   the same kernel on weights packed once (quant/packed.py), as generate / serve run decoders
  <path> w8 packed  weight-only on the same packed weights: float activations, int8 converted in registers
With --decode: SmolLM2-135M's decode shapes (576x576 q/out, 576x192 k/v, 576x1536 gate/up, 1536x576 down,
576x49152 the tied LM head) at M = 1 and 8 (batch-1 and batch-8 decode steps).
  torch f32       torch.matmul float32 (MKL / oneDNN)                      } unless --no-torch
  torch int8      torch dynamic int8 Linear (fbgemm): quantize, int8 GEMM, rescale }
Rates are in G(FL)OP/s (2*M*K*N per call), best of --reps samples taken round-robin over the methods;
ratios are against xla f32 of the same shape, and each kernel's against xla w8a8 op, all measured in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def blocking(fn, *args):
    out = fn(*args)
    return out.block_until_ready() if hasattr(out, "block_until_ready") else out


def rates(flops: float, reps: int, calls: dict) -> dict[str, float]:
    """G(FL)OP/s of each (fn, *args) in ``calls``, waiting for each result.

    The calls are interleaved round-robin, reps rounds, each sample enough back-to-back calls to last about a
    millisecond (so M=1 is not timer noise); a method's rate is its best sample. On a shared 2-core host other
    processes slow samples down at random, and interleaving plus best-of keeps them out of the ratios.
    """
    inner = {}
    for name, call in calls.items():
        blocking(*call)
        t0 = time.perf_counter()
        blocking(*call)
        inner[name] = max(1, int(1e-3 / max(time.perf_counter() - t0, 1e-7)))
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(reps):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                blocking(*call)
            best[name] = min(best[name], (time.perf_counter() - t0) / inner[name])
    return {name: flops / t / 1e9 for name, t in best.items()}


def parse_shape(text: str) -> tuple[int, int]:
    k, n = text.lower().split("x")
    return int(k), int(n)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128, 1024])
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=[(384, 384), (384, 1536), (1536, 384)],
                    help="KxN Dense shapes (in x out)")
    ap.add_argument("--decode", action="store_true", help="SmolLM2's decode shapes at M = 1, 8 (see above)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses its own intra-op pool)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default="", help="recorded in the JSON, e.g. whether the CPU was shared with other jobs")
    args = ap.parse_args(argv)
    if args.decode:
        args.tokens, args.shapes = [1, 8], [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]

    import jax
    import jax.numpy as jnp
    from jax import lax

    from jaxfound.quant import kernel
    from jaxfound.quant.int8 import w8a8_dot_xla
    from jaxfound.quant.packed import pack_kernel

    default_path = kernel.path()
    natives, packed_fns, w8_fns = {}, {}, {}
    for name in kernel.PATHS:
        try:
            natives[name] = jax.jit(kernel.load(name))
            packed_fns[name] = jax.jit(kernel.load_packed(name))
            w8_fns[name] = jax.jit(kernel.load_packed(name, "w8"))
        except RuntimeError as e:
            print(f"skipping the {name} kernel: {e}")
    print(f"w8a8 kernel path: {default_path or 'none (XLA ops)'} ({kernel.choose()[1]}); CPU {cpu_model()}")
    if not args.no_torch:
        import torch
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    f32 = jax.jit(lambda x, w: jnp.dot(x, w))
    i8 = jax.jit(lambda x, w: lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32))
    w8a8 = jax.jit(w8a8_dot_xla)
    rows = []
    for M in args.tokens:
        for K, N in args.shapes:
            x = rng.standard_normal((M, K)).astype(np.float32)
            w = rng.standard_normal((K, N)).astype(np.float32)
            xj, wj = jnp.asarray(x), jnp.asarray(w)
            xq = jnp.asarray(rng.integers(-127, 128, (M, K)), jnp.int8)
            wq = jnp.asarray(rng.integers(-127, 128, (K, N)), jnp.int8)
            scale = jnp.full((N,), 0.01, jnp.float32)
            calls = {"xla_f32": (f32, xj, wj), "xla_int8": (i8, xq, wq), "xla_w8a8_op": (w8a8, xj, wq, scale)}
            calls.update({f"{name}_w8a8_op": (fn, xj, wq, scale) for name, fn in natives.items()})
            packed, comp = (jnp.asarray(a) for a in pack_kernel(np.asarray(wq)))
            calls.update({f"{name}_packed": (fn, xj, packed, comp, scale) for name, fn in packed_fns.items()})
            calls.update({f"{name}_w8_packed": (fn, xj, packed, comp, scale) for name, fn in w8_fns.items()})
            if not args.no_torch:
                lin = torch.nn.Linear(K, N, bias=False)
                qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, torch.qint8)
                calls["torch_f32"] = (torch.matmul, torch.from_numpy(x), torch.from_numpy(w))
                calls["torch_int8_dynamic"] = (qlin, torch.from_numpy(x))
            with contextlib.ExitStack() as stack:
                if not args.no_torch:
                    stack.enter_context(torch.no_grad())
                r = {"M": M, "K": K, "N": N, **rates(2.0 * M * K * N, args.reps, calls)}
            rows.append(r)
            print(".", end="", flush=True)
    print()

    kcols = ([f"{name}_w8a8_op" for name in natives] + [f"{name}_packed" for name in packed_fns]
             + [f"{name}_w8_packed" for name in w8_fns])
    cols = ["xla_f32", "xla_int8", "xla_w8a8_op", *kcols, "torch_f32", "torch_int8_dynamic"]
    cols = [c for c in cols if c in rows[0]]
    print(f"G(FL)OP/s, best of {args.reps} interleaved samples; (x) = ratio to xla f32 of the same shape; "
          f"[x] = native kernel / xla w8a8 op")
    print(f"{'M':>5} {'K':>5} {'N':>5} " + " ".join(f"{c:>20}" for c in cols) + " " + " ".join(
        f"{c.removesuffix('_w8a8_op') + '/xla_w8a8':>22}" for c in kcols))
    for r in rows:
        cells = [f"{r[c]:8.1f} ({r[c] / r['xla_f32']:4.2f}x)" for c in cols]
        vs = [f"[{r[c] / r['xla_w8a8_op']:4.2f}x]" for c in kcols]
        print(f"{r['M']:>5} {r['K']:>5} {r['N']:>5} " + " ".join(f"{c:>20}" for c in cells) + " " + " ".join(
            f"{c:>22}" for c in vs))

    def geomean(num, den):
        return float(np.exp(np.mean([np.log(r[num] / r[den]) for r in rows])))

    summary = {c: geomean(c, "xla_f32") for c in cols}
    vs_xla_w8a8 = {c: geomean(c, "xla_w8a8_op") for c in kcols}
    print("geometric mean over shapes (x xla f32): " + ", ".join(f"{c} {v:.2f}" for c, v in summary.items()))
    print("geometric mean over shapes (x xla w8a8 op): " + ", ".join(f"{c} {v:.2f}" for c, v in vs_xla_w8a8.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "args": vars(args), "note": args.note, "load_average_at_end": os.getloadavg(),
            "device": str(jax.devices()[0].device_kind), "cpu": cpu_model(),
            "w8a8_kernel_path": default_path, "w8a8_kernel_choice": kernel.choose()[1], "native_paths": list(natives),
            "rows": rows, "geomean_ratio_to_xla_f32": summary, "geomean_ratio_to_xla_w8a8_op": vs_xla_w8a8},
            indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
