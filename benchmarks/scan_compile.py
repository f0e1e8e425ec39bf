"""Compile time of the GPT-2 causal-LM train step, layers scanned (model.scan_layers) against unrolled, in one run:

    python benchmarks/scan_compile.py --out benchmarks/results/scan_compile_cpu.json
    python benchmarks/scan_compile.py --layers 12 --hidden 256 --rounds 1

The real jitted step of jaxfound.train (AdamW, clipping, non-finite guard, donated state), lowered from abstract
shapes (no params allocated) and compiled fresh each time: the persistent compilation cache is off and jax's
in-memory caches are cleared before every measure. Rounds alternate the two layouts so they share the machine's noise.
Defaults: 24 layers at GPT-2 small's width (768, 12 heads, MLP 3072), vocabulary 50304, batch 8 x seq 128, fp32.
Target: scanned >= 3x faster to compile (lower + compile) than unrolled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxfound.config import Config, ModelConfig, TrainConfig  # noqa: E402
from jaxfound.losses import clm_loss  # noqa: E402
from jaxfound.models import abstract_params, build_model  # noqa: E402
from jaxfound.sharding import make_mesh  # noqa: E402
from jaxfound.train.optim import make_optimizer  # noqa: E402
from jaxfound.train.state import TrainState, state_shardings  # noqa: E402
from jaxfound.train.step import make_train_step  # noqa: E402

TARGET = 3.0


def compile_seconds(cfg: Config, batch: int, seq: int) -> dict:
    """(lower, compile) wall seconds of one fresh train-step compilation for cfg."""
    jax.clear_caches()
    model = build_model(cfg.model, "lm")
    tx = make_optimizer(cfg.train, 1000)
    mesh = make_mesh(cfg.mesh)
    shardings = state_shardings(model, tx, mesh, seq)
    step = make_train_step(model, tx, clm_loss, mesh, shardings, cfg.train.seed)
    params = nn.unbox(abstract_params(model, seq))
    state = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                                nonfinite_steps=jnp.zeros((), jnp.int32)), params)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    start = time.perf_counter()
    lowered = step.lower(state, {"input_ids": ids, "segment_ids": ids})
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"lower_s": lowered_at - start, "compile_s": done - lowered_at, "total_s": done - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    model = ModelConfig(arch="gpt", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                        num_heads=args.heads, intermediate_size=4 * args.hidden, max_position=max(args.seq, 128),
                        activation="gelu_new", layer_norm_eps=1e-5, dropout=0.1)
    cfg = Config(model=model, train=TrainConfig(task="clm", batch_size=args.batch, clip_norm=1.0))
    layouts = {"unrolled": cfg, "scanned": dataclasses.replace(cfg, model=dataclasses.replace(model, scan_layers=True))}
    times = {name: [] for name in layouts}
    for r in range(args.rounds):
        for name, c in layouts.items():
            times[name].append(compile_seconds(c, args.batch, args.seq))
            print(f"round {r + 1}/{args.rounds} {name:9s} " + "  ".join(f"{k} {v:6.2f}" for k, v in
                                                                          times[name][-1].items()), flush=True)
    median = {name: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for name, ts in times.items()}
    ratio = {k: median["unrolled"][k] / median["scanned"][k] for k in median["scanned"]}
    print(f"\n{args.layers}-layer GPT-2 train step (hidden {args.hidden}, batch {args.batch} x seq {args.seq}), "
          f"median of {args.rounds} fresh compilations, seconds")
    print(f"{'':10s}{'lower':>10s}{'compile':>10s}{'total':>10s}")
    for name in layouts:
        print(f"{name:10s}" + "".join(f"{median[name][k]:10.2f}" for k in ("lower_s", "compile_s", "total_s")))
    print(f"{'ratio':10s}" + "".join(f"{ratio[k]:9.1f}x" for k in ("lower_s", "compile_s", "total_s")))
    print(f"target: scanned >= {TARGET:.0f}x faster (total): {'met' if ratio['total_s'] >= TARGET else 'NOT met'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "what": "train-step compile time, scanned vs unrolled layers", "arch": "gpt", "layers": args.layers,
            "hidden_size": args.hidden, "num_heads": args.heads, "vocab_size": args.vocab, "batch": args.batch,
            "seq_len": args.seq, "rounds": args.rounds, "backend": jax.default_backend(),
            "devices": jax.device_count(), "jax": jax.__version__, "machine": platform.machine(),
            "rounds_s": times, "median_s": median, "ratio_unrolled_over_scanned": ratio, "target": TARGET,
            "target_met": ratio["total_s"] >= TARGET}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
