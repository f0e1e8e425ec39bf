"""What XLA's TPU cost model charges for one transformer layer's products as the rows per chip grow: bytes_accessed of
each product compiled alone for one chip (libtpu on this CPU host, no TPU attached) over the bytes of its operands
and result read and written once. The ratio is the compiler's own re-reads for the tiling it picked.

    python benchmarks/tpu_matmul_tiling.py                       # gpt2_medium's shapes on v5e and v5p
    python benchmarks/tpu_matmul_tiling.py --hidden 2048 --mlp 8192 --rows 8192 16384

Why it exists (issue #20): gpt2_medium's train step on v5e is bound by XLA's byte count, and with 8 x 1024 tokens
per chip the (tokens, 4096) x (4096, 1024) products are charged ~4x their operands; from 16384 rows on the compiler
tiles them differently and charges ~1.2x. A compiler estimate, not a measurement on a TPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from jaxfound.accelerators import topology_devices  # noqa: E402

TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1"}


def products(D: int, F: int) -> dict:
    """name -> (einsum, lhs shape(T), rhs shape(T), f32 result): a pre-LN block's forward and backward products,
    T = rows (tokens per chip); weight gradients accumulate in float32 as the train step's do."""
    return {
        "q / k / v / out (T,D)x(D,D)": ("td,de->te", lambda T: (T, D), lambda T: (D, D), False),
        "mlp up (T,D)x(D,F)": ("td,df->tf", lambda T: (T, D), lambda T: (D, F), False),
        "mlp down, up's dX (T,F)x(F,D)": ("tf,fd->td", lambda T: (T, F), lambda T: (F, D), False),
        "down's dX (T,D)x(F,D)^T": ("td,fd->tf", lambda T: (T, D), lambda T: (F, D), False),
        "mlp dW (T,D)^T(T,F), f32": ("td,tf->df", lambda T: (T, D), lambda T: (T, F), True),
    }


def charged(device, spec: str, lhs: tuple, rhs: tuple, f32: bool) -> dict:
    sharding = SingleDeviceSharding(device)
    a = jax.ShapeDtypeStruct(lhs, jnp.bfloat16, sharding=sharding)
    b = jax.ShapeDtypeStruct(rhs, jnp.bfloat16, sharding=sharding)
    out = jnp.float32 if f32 else jnp.bfloat16
    fn = jax.jit(lambda x, y: jnp.einsum(spec, x, y, preferred_element_type=out))
    cost = fn.lower(a, b).compile().cost_analysis()
    result = jax.eval_shape(fn, a, b)
    once = 2 * (math.prod(lhs) + math.prod(rhs)) + result.size * result.dtype.itemsize
    return {"bytes_accessed": float(cost["bytes accessed"]), "operands_once": once,
            "ratio": float(cost["bytes accessed"]) / once}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--mlp", type=int, default=4096)
    p.add_argument("--rows", type=int, nargs="+", default=[4096, 8192, 12288, 16384, 32768])
    p.add_argument("--chips", nargs="+", default=list(TOPOLOGIES), choices=list(TOPOLOGIES))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tpu_matmul_tiling.json"))
    args = p.parse_args(argv)
    rows = []
    for chip in args.chips:
        device = topology_devices(TOPOLOGIES[chip])[0]
        for name, (spec, lhs, rhs, f32) in products(args.hidden, args.mlp).items():
            for T in args.rows:
                r = charged(device, spec, lhs(T), rhs(T), f32)
                rows.append({"chip": chip, "product": name, "rows": T, **r})
    print(f"{'chip':5s} {'product':32s} " + " ".join(f"{T:>8d}" for T in args.rows) + "   (charged / operands once)")
    for chip in args.chips:
        for name in products(args.hidden, args.mlp):
            ratios = [r["ratio"] for r in rows if r["chip"] == chip and r["product"] == name]
            print(f"{chip:5s} {name:32s} " + " ".join(f"{x:8.2f}" for x in ratios))
    Path(args.out).write_text(json.dumps({"hidden": args.hidden, "mlp": args.mlp, "jax": jax.__version__,
                                          "libtpu": importlib.metadata.version("libtpu"),
                                          "note": "XLA cost_analysis of each product compiled alone for one chip "
                                                  "of the topology, on a CPU host (libtpu AOT); an estimate",
                                          "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
