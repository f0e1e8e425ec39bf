"""Throughput of the real train step on synthetic batches: compile time, step time, tokens/s, FLOPs, MFU, memory.

The model, optimizer, shardings and jitted step are built by `jaxfound.train.build`, as for `fit`; only the data is
random (batch_size x seq_len tokens, BERT-style masked positions for mlm), so no corpus is needed.

FLOPs come from XLA's cost analysis of the compiled step. For a partitioned (SPMD) program that is the
cost of the per-device module: `flops_per_step` multiplies it by the number of devices (checked in
tests/test_bench.py: a data=8 mesh reports 1/8 of the 1-device count).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxfound.accelerators import peak_of
from jaxfound.data.pipeline import max_predictions
from jaxfound.data.tokenizer import load_tokenizer, padded_vocab
from jaxfound.errors import JaxfoundError
from jaxfound.models import build_model
from jaxfound.sharding import bytes_per_device, global_batch, initialize_distributed, mesh_shape
from jaxfound.tasks import get_task
from jaxfound.train.build import build as build_training


@dataclass
class Bench:
    """The pieces of one benchmark: a compiled step, its donated state and a device-resident batch."""

    cfg: object
    mesh: object
    step: object  # compiled (state, batch) -> (state, metrics)
    state: object
    batch: dict
    compile_s: float
    cost: dict

    def run(self, n: int) -> list[float]:
        """n timed steps (each waited for) -> seconds per step."""
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.state, metrics = self.step(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
            times.append(time.perf_counter() - t0)
        return times


def resolve_vocab(cfg) -> int:
    """model.vocab_size, else the tokenizer's (data.tokenizer) or data.tokenizer_vocab, padded as the model pads it."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    return padded_vocab(len(load_tokenizer(cfg.data.tokenizer)) if cfg.data.tokenizer else cfg.data.tokenizer_vocab)


def synthetic_batch(cfg, vocab_size: int, seed: int = 0) -> dict:
    """A random global batch with the shapes and dtypes the pipeline yields for cfg.train.task."""
    B, L = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    batch = {"input_ids": rng.integers(5, vocab_size, (B, L), dtype=np.int32),
             "segment_ids": np.ones((B, L), np.int32)}
    if cfg.train.task == "mlm":
        P = max_predictions(L, cfg.data.mask_prob)
        pos_BxP = np.stack([rng.choice(L, P, replace=False) for _ in range(B)])
        batch["mlm_positions"] = np.sort(pos_BxP, 1).astype(np.int32)
        batch["mlm_labels"] = rng.integers(5, vocab_size, (B, P), dtype=np.int32)
        batch["mlm_weights"] = np.ones((B, P), np.float32)
    return batch


def build(cfg) -> Bench:
    """Model, sharded state and the step compiled for cfg's mesh and a synthetic batch, built as `fit` builds them."""
    if cfg.train.task not in ("mlm", "clm"):
        raise JaxfoundError(f"bench: train.task={cfg.train.task}; only pretraining tasks are benchmarked (mlm, clm)")
    if cfg.data.seq_len > cfg.model.max_position:
        raise JaxfoundError(
            f"bench: data.seq_len={cfg.data.seq_len} exceeds model.max_position={cfg.model.max_position}")
    initialize_distributed(cfg.mesh)
    task = get_task(cfg.train.task, cfg.model.arch)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=resolve_vocab(cfg)))
    data, fsdp, _ = mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, jax.device_count())
    if cfg.train.batch_size % (data * fsdp):
        raise JaxfoundError(f"bench: train.batch_size={cfg.train.batch_size} is not divisible by "
                            f"mesh data*fsdp = {data * fsdp}")
    training = build_training(cfg, build_model(cfg.model, task.head), task.loss, cfg.data.seq_len,
                              cfg.train.schedule_steps or max(cfg.train.steps, 1))
    full = synthetic_batch(cfg, cfg.model.vocab_size, cfg.train.seed)
    b = cfg.train.batch_size // jax.process_count()
    batch = global_batch({k: v[jax.process_index() * b:(jax.process_index() + 1) * b] for k, v in full.items()},
                         training.mesh)
    t0 = time.perf_counter()
    compiled = training.step.lower(training.state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return Bench(cfg, training.mesh, compiled, training.state, batch, compile_s, dict(cost))


def peak_flops(device, dtype: str, measure_cpu: bool = True) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number comes from): the table, or a measured matmul on CPU."""
    peak, source = peak_of(device.device_kind, dtype)
    if peak is not None:
        return peak, source
    if device.platform == "cpu" and measure_cpu:
        return measured_matmul_peak(dtype, device), f"measured: jitted jnp.dot 2048x2048 {dtype} on this host"
    return None, f"unknown device kind {device.device_kind!r}: no peak, no MFU"


def measured_matmul_peak(dtype: str = "float32", device=None, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a jitted n x n matmul (bf16 inputs accumulate in fp32), best of reps."""
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dt), device)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def memory_in_use() -> dict | None:
    """bytes_in_use / peak_bytes_in_use of the first local device, where the backend reports them (not CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return None
    return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


def state_bytes(state) -> dict:
    """Per-device bytes of params and optimizer state (max over this process's devices)."""
    params, opt = bytes_per_device(state.params), bytes_per_device(state.opt_state)
    total = {d: params[d] + opt.get(d, 0) for d in params}
    return {"params_bytes_per_device": max(params.values()), "opt_bytes_per_device": max(opt.values()),
            "state_bytes_per_device": max(total.values()),
            "params_bytes_total": int(sum(x.nbytes for x in jax.tree.leaves(state.params)))}


def benchmark(cfg, steps: int = 10, warmup: int = 2, bench: Bench | None = None, measure_cpu_peak: bool = True) -> dict:
    """Compile and time the train step of cfg on synthetic batches; returns a JSON-ready report."""
    if steps < 1 or warmup < 0:
        raise JaxfoundError(f"bench: --steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    bench = bench or build(cfg)
    cfg, mesh = bench.cfg, bench.mesh
    bench.run(warmup)
    times = bench.run(steps)
    step_s = statistics.median(times)
    n_dev = mesh.devices.size
    device = jax.devices()[0]
    flops_per_device = float(bench.cost.get("flops", 0.0)) or None
    flops = flops_per_device * n_dev if flops_per_device else None
    peak, peak_source = peak_flops(device, cfg.model.dtype, measure_cpu_peak)
    # CPU 'devices' are slices of one host, so the host peak is the whole machine's; accelerators add up
    peak_total = peak if (peak and device.platform == "cpu") else (peak * n_dev if peak else None)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    achieved = flops / step_s if flops else None
    return {
        "arch": cfg.model.arch, "task": cfg.train.task, "dtype": cfg.model.dtype,
        "hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers, "num_heads": cfg.model.num_heads,
        "intermediate_size": cfg.model.intermediate_size, "vocab_size": cfg.model.vocab_size,
        "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len, "remat": cfg.model.remat,
        "mesh": dict(mesh.shape), "devices": n_dev, "processes": jax.process_count(),
        "device_kind": device.device_kind, "platform": device.platform,
        "compile_s": round(bench.compile_s, 3),
        "steps": steps, "warmup": warmup,
        "step_s_median": step_s, "step_s_min": min(times), "step_s_max": max(times),
        "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
        "flops_per_step": flops, "flops_per_step_per_device": flops_per_device,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak_total, "peak_source": peak_source,
        "mfu": achieved / peak_total if (achieved and peak_total) else None,
        "memory": memory_in_use(),
        **state_bytes(bench.state),
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(report: dict) -> str:
    rows = [
        ("model", f"{report['arch']} {report['task']} {report['hidden_size']}d x {report['num_layers']}L, "
                  f"vocab {report['vocab_size']}, {report['dtype']}"),
        ("batch", f"{report['batch_size']} x {report['seq_len']} = {report['tokens_per_step']} tokens"),
        ("mesh", f"{report['mesh']} on {report['devices']} x {report['device_kind']}"),
        ("compile", f"{report['compile_s']:.2f} s"),
        ("step (median)", f"{report['step_s_median'] * 1e3:.1f} ms  (min {report['step_s_min'] * 1e3:.1f}, "
                          f"max {report['step_s_max'] * 1e3:.1f}, {report['steps']} steps)"),
        ("tokens/s", f"{report['tokens_per_s']:,.0f}"),
        ("FLOPs/step (XLA)", _fmt(report["flops_per_step"])),
        ("achieved FLOP/s", _fmt(report["achieved_flops_per_s"])),
        ("peak FLOP/s", f"{_fmt(report['peak_flops_per_s'])}  ({report['peak_source']})"),
        ("MFU", f"{report['mfu']:.1%}" if report["mfu"] else "n/a"),
        ("params+opt / device", f"{report['state_bytes_per_device'] / 2**20:,.1f} MiB"),
        ("device memory", json.dumps(report["memory"]) if report["memory"] else "not reported by this backend"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 60)
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])

