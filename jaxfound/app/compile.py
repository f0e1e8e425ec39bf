"""`jaxfound compile`: the recipe's exact train step (and a decoder's prefill and decode steps) compiled ahead of time
for a TPU slice on this host, no TPU needed (as MaxText's train_compile): memory per chip, whether it fits, FLOPs,
XLA's estimated step time and the MFU it implies, and the collectives in the optimized HLO.

    report = compile_for_topology(load_config("configs/gpt2_small_clm.yaml"), "v5e:2x2")
    print(format_report(report))

The step is built as `fit` builds it (model, optimizer, logical shardings, the jitted step with its in/out shardings
and donation) over the recipe's mesh laid on the slice's devices; only the state and batch are abstract
(ShapeDtypeStruct with shardings), so nothing is allocated and a 1B-parameter recipe compiles on a laptop.

Numbers (all per chip and per step, for the partitioned per-chip program):
- memory: XLA's buffer assignment (arguments, outputs, temporaries, generated code; donated arguments alias
  outputs, counted once), against the chip's HBM;
- ``xla_flops``, ``bytes_accessed``: the compiled program's cost analysis (remat recomputation included); with
  scanned layers XLA counts the loop body once, so these (and the collectives) come from unrolled 1- and 2-layer
  compiles of the same step, extrapolated to every layer (``counts`` says so; memory is the scanned program's);
- ``model_flops``: the useful work, over chips: 6 T N for the trunk's matmul params N (embeddings excluded) and
  6 T_head V D for the output layer (T_head: every token for a causal LM, the masked positions for MLM), plus
  12 layers D L T for attention (PaLM's convention, unmasked);
- ``est_step_s``: a roofline from the compiler's numbers: the largest of xla_flops / peak, bytes_accessed / HBM
  bandwidth and collective bytes / ICI bandwidth (collectives overlapped with compute, as XLA's async collectives
  on TPU aim for); ``est_step_s_no_overlap`` adds the collective time instead (a pessimistic bound). XLA counts
  no FLOPs inside the Pallas splash kernel, so with splash attention its work (12 layers D L T, fwd + bwd) is
  added to the compute term (``kernel_flops_added``). XLA's own ``optimal_seconds`` is reported beside it as
  ``xla_optimal_s`` where it is usable: libtpu 0.0.42 returns negative values for training steps (-3.0 for
  bert_tiny, -405 for bert_base), so it cannot be the estimate;
- ``est_mfu`` = model_flops / (est_step_s * peak): what that estimate implies. A compiler estimate, never a
  measurement.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfound.accelerators import GIB, chips_in, topology_devices, tpu_chip
from jaxfound.app.bench import resolve_vocab, synthetic_batch
from jaxfound.errors import JaxfoundError
from jaxfound.generation import compiled_steps
from jaxfound.models import TRUNK_KEYS, abstract_params, build_model, scan
from jaxfound.models.attention import SPLASH_BLOCK
from jaxfound.sharding import batch_sharding, make_mesh, mesh_shape
from jaxfound.tasks import get_task
from jaxfound.train.optim import make_optimizer, trainable_labels
from jaxfound.train.state import TrainState, state_shardings
from jaxfound.train.step import make_train_step

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "s64": 8, "f64": 8}
_HLO_OP = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start|-done)?\((.*)$", re.M)
_CHANNEL = re.compile(r"channel_id=(\d+)")
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|s8|u8|pred|s64|f64)\[([0-9,]*)\]")


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def collectives(hlo_text: str) -> dict:
    """{op: {'count', 'bytes'}} over the optimized HLO's collective ops (bytes: the op's result, per chip).

    One logical op is counted once: TPU's async collective fusion copies a collective (same channel_id) into its
    start, every continuation fusion it overlaps and its done (a 2-layer gpt2_medium step on v5e:2x2 holds 26
    copies of its one 103 MB embedding all-gather), so ops are keyed by channel; an async pair is counted at its
    -done, whose result is the output alone (a -start's tuple also holds the operand and sync flags)."""
    ops = {}
    for m in _HLO_OP.finditer(hlo_text):
        result, op, phase, rest = m.groups()
        if phase == "-start":
            continue
        channel = _CHANNEL.search(rest)
        key = (op, channel.group(1)) if channel and phase is None else (op, m.start())
        size = sum(_DTYPE_BYTES[dt] * _prod(dims) for dt, dims in _SHAPE.findall(result))
        ops[key] = max(ops.get(key, 0), size)
    out = {}
    for (op, _), size in ops.items():
        entry = out.setdefault(op, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += size
    return out


def _prod(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


def model_flops(cfg, params_abstract, head_tokens: int, tokens: int) -> float:
    """6 T N (trunk matmul params, no embeddings) + 6 T_head V D (output layer) + 12 layers D L T (attention)."""
    flat = jax.tree_util.tree_flatten_with_path(params_abstract)[0]
    skip = ("word", "position", "token_type")
    n = sum(x.size for path, x in flat if getattr(path[0], "key", "") in TRUNK_KEYS and x.ndim >= 2
            and not any(getattr(p, "key", "") in skip for p in path))
    m = cfg.model
    return (6.0 * n * tokens + 6.0 * head_tokens * m.vocab_size * m.hidden_size
            + 12.0 * m.num_layers * m.hidden_size * cfg.data.seq_len * tokens)


def _memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    get = lambda name: int(getattr(mem, name, 0) or 0)  # noqa: E731
    out = {k: get(f"{k}_size_in_bytes") for k in ("argument", "output", "temp", "alias", "generated_code")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    optimal = float(cost.get("optimal_seconds", 0.0))
    return {"xla_flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "xla_optimal_s": optimal if optimal > 0 else None}


def _entry(name: str, compiled, compile_s: float, chip, hbm: int, kernel_flops: float = 0.0,
           counts: dict | None = None) -> dict:
    """kernel_flops: work inside custom calls that XLA's cost analysis cannot see (Pallas splash attention).
    counts: FLOPs, bytes and collectives to use instead of the compiled program's own (scanned layers)."""
    mem, cost, comm = _memory(compiled), _cost(compiled), collectives(compiled.as_text())
    if counts is not None:
        cost = cost | {"xla_flops_as_compiled": cost["xla_flops"], "xla_flops": counts["xla_flops"],
                       "bytes_accessed": counts["bytes_accessed"], "counts": counts["source"]}
        comm = counts["collectives"]
    comm_bytes = sum(c["bytes"] for c in comm.values())
    compute_s = (cost["xla_flops"] + kernel_flops) / chip.peak_bf16
    memory_s, comm_s = cost["bytes_accessed"] / chip.hbm_bw, comm_bytes / chip.ici_bw
    return {"step": name, "compile_s": round(compile_s, 2), "memory": mem, "fits": mem["total"] <= hbm,
            "headroom_bytes": hbm - mem["total"], **cost, "kernel_flops_added": kernel_flops,
            "roofline_s": {"compute": compute_s, "memory": memory_s, "collectives": comm_s},
            "est_step_s": max(compute_s, memory_s, comm_s) or None,
            "est_step_s_no_overlap": (max(compute_s, memory_s) + comm_s) or None, "collectives": comm}


def train_step_abstract(cfg, model, task, mesh):
    """(jitted train step, abstract sharded state, abstract sharded batch) for cfg on mesh: nothing allocated."""
    seq_len = cfg.data.seq_len
    tx = make_optimizer(cfg.train, cfg.train.schedule_steps or max(cfg.train.steps, 1), model.cfg.arch)
    shardings = state_shardings(model, tx, mesh, seq_len)
    params = nn.unbox(abstract_params(model, seq_len))
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(tx.init, params), nonfinite_steps=jax.ShapeDtypeStruct((), jnp.int32))
    step = make_train_step(model, tx, task.loss, mesh, shardings, cfg.train.seed, cfg.train.grad_accum,
                           trainable_labels(cfg.train, model.cfg.arch))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh))
             for k, v in synthetic_batch(cfg, cfg.model.vocab_size).items()}
    return step, _abstract(state, shardings), batch


def compile_for_topology(cfg, topology: str, *, decode_batch: int | None = None, decoder_steps: bool = True,
                         count_layers: bool = True, progress=print) -> dict:
    """Compile cfg's train step (and for decoders prefill + decode) for a TPU topology; a JSON-ready report.

    count_layers: for scanned layers, count FLOPs / bytes / collectives of every layer on unrolled 1- and 2-layer
    compiles (see _unrolled_counts); False keeps the scanned program's own counts (its loop body once)."""
    chip = tpu_chip(topology)
    if cfg.train.task not in ("mlm", "clm"):
        raise JaxfoundError(f"compile: train.task={cfg.train.task}; pretraining recipes (mlm, clm) are compiled")
    devices = topology_devices(topology)
    n = len(devices)
    per_chip_devices = max(1, n // chips_in(topology))  # v3 / v4 slices may list one device per core
    hbm = chip.hbm_bytes // per_chip_devices
    mesh_sizes = data, fsdp, tensor = mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, n)
    if cfg.train.batch_size % (data * fsdp):
        raise JaxfoundError(f"compile: train.batch_size={cfg.train.batch_size} is not divisible by mesh data*fsdp = "
                            f"{data * fsdp} on {topology} ({n} devices); set train.batch_size or the mesh section")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=resolve_vocab(cfg)))
    task = get_task(cfg.train.task, cfg.model.arch)
    model = build_model(cfg.model, task.head)
    mesh = make_mesh(cfg.mesh, devices=devices)
    progress(f"compiling the {cfg.model.arch} {task.name} train step for {topology} ({n} x {devices[0].device_kind}, "
             f"mesh data={data} fsdp={fsdp} tensor={tensor}) ...")
    step, state, batch = train_step_abstract(cfg, model, task, mesh)
    t0 = time.perf_counter()
    compiled = _compile_or_oom(step.lower(state, batch))
    tokens = cfg.train.batch_size * cfg.data.seq_len
    L, D = cfg.data.seq_len, cfg.model.hidden_size
    splash = cfg.model.attention in ("auto", "splash") and L % SPLASH_BLOCK == 0
    attention_flops = 12.0 * cfg.model.num_layers * D * L * tokens / n if splash else 0.0  # fwd + bwd, unmasked
    if isinstance(compiled, OutOfMemory):  # the TPU compiler refuses a program that cannot fit: say by how much
        train = compiled.entry("train", time.perf_counter() - t0, hbm, _shard_bytes((state, batch)))
        return _report(cfg, topology, chip, devices, hbm, mesh_sizes, state, task, [train])
    compile_s = time.perf_counter() - t0
    scanned = cfg.model.scan_layers and cfg.model.num_layers > 2
    counts = _unrolled_counts(cfg, task, mesh, progress) if scanned and count_layers else None
    train = _entry("train", compiled, compile_s, chip, hbm, attention_flops, counts)
    head_tokens = batch["mlm_positions"].size if "mlm_positions" in batch else tokens
    train["model_flops"] = model_flops(cfg, state.params, head_tokens, tokens) / n
    train["tokens_per_step"] = tokens
    peak = chip.peak_bf16
    if train.get("est_step_s"):
        train["est_mfu"] = train["model_flops"] / (train["est_step_s"] * peak)
        train["est_mfu_no_overlap"] = train["model_flops"] / (train["est_step_s_no_overlap"] * peak)
        train["est_hfu"] = train["xla_flops"] / (train["est_step_s"] * peak)
        train["est_tokens_per_s"] = tokens / train["est_step_s"]
    steps = [train]
    if task.name == "clm" and decoder_steps:
        steps += _decoder_steps(model, state.params, mesh, decode_batch or cfg.train.batch_size, cfg.data.seq_len,
                                chip, hbm, progress)
    return _report(cfg, topology, chip, devices, hbm, mesh_sizes, state, task, steps)


def _unrolled_counts(cfg, task, mesh, progress) -> dict:
    """FLOPs, bytes and collectives of the whole scanned step. XLA's cost analysis counts a while loop's body once
    (a 12-layer scanned BERT-base reports 1/6 of its FLOPs), so they come from the same step unrolled with 1 and 2
    layers: count(1) + (layers - 1) * (count(2) - count(1)), exact for identical layers."""
    progress("counting FLOPs and collectives on unrolled 1- and 2-layer compiles (XLA counts a scanned body once)")
    measured = []
    for layers in (1, 2):
        small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=layers, scan_layers=False))
        step, state, batch = train_step_abstract(small, build_model(small.model, task.head), task, mesh)
        compiled = _compile_or_oom(step.lower(state, batch))
        if isinstance(compiled, OutOfMemory):
            raise JaxfoundError(f"compile: counting FLOPs needs a {layers}-layer copy of the step, and even that does "
                                f"not fit: {compiled.message}")
        measured.append((_cost(compiled), collectives(compiled.as_text())))
    (c1, k1), (c2, k2) = measured
    n = cfg.model.num_layers - 1
    extrapolate = lambda a, b: a + n * (b - a)  # noqa: E731
    comm = {}
    for op in set(k1) | set(k2):
        one, two = k1.get(op, {"count": 0, "bytes": 0}), k2.get(op, {"count": 0, "bytes": 0})
        comm[op] = {"count": int(extrapolate(one["count"], two["count"])),
                    "bytes": int(extrapolate(one["bytes"], two["bytes"]))}
    return {"xla_flops": extrapolate(c1["xla_flops"], c2["xla_flops"]),
            "bytes_accessed": extrapolate(c1["bytes_accessed"], c2["bytes_accessed"]), "collectives": comm,
            "source": "extrapolated from unrolled 1- and 2-layer compiles of the same step"}


def _report(cfg, topology, chip, devices, hbm, mesh_sizes, state, task, steps) -> dict:
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    data, fsdp, tensor = mesh_sizes
    return {"topology": topology, "chip": chip.name, "device_kind": devices[0].device_kind, "devices": len(devices),
            "hbm_bytes_per_device": hbm, "peak_flops_per_device": chip.peak_bf16, "arch": cfg.model.arch,
            "task": task.name, "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype,
            "num_layers": cfg.model.num_layers, "hidden_size": cfg.model.hidden_size, "params": int(n_params),
            "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len, "remat": cfg.model.remat,
            "scan_layers": cfg.model.scan_layers, "attention": cfg.model.attention,
            "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}, "steps": steps,
            "fits": all(s["fits"] for s in steps)}


@dataclasses.dataclass
class OutOfMemory:
    """The TPU compiler's refusal of a program larger than HBM, with the bytes it names."""

    message: str
    required: int | None  # bytes of temporaries the compiler reported, if it said

    def entry(self, name: str, compile_s: float, hbm: int, argument_bytes: int) -> dict:
        temp = self.required or 0
        total = max(temp, argument_bytes)  # what the compiler says it needs (it may include the arguments)
        return {"step": name, "compile_s": round(compile_s, 2), "compiled": False, "error": self.message,
                "memory": {"argument": argument_bytes, "output": 0, "temp": temp, "alias": 0, "generated_code": 0,
                           "total": total}, "fits": False, "headroom_bytes": hbm - total, "xla_flops": None,
                "bytes_accessed": None, "xla_optimal_s": None, "kernel_flops_added": 0.0, "est_step_s": None,
                "collectives": {}}


_OOM = re.compile(r"Ran out of memory.*?required for ([\w ]+?) \(([\d.]+)([KMGT]?)\)")


def _compile_or_oom(lowered):
    """lowered.compile(), or OutOfMemory when the TPU compiler says the program cannot fit in HBM."""
    try:
        return lowered.compile()
    except Exception as e:  # jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
            raise
        m = _OOM.search(text)
        scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        required = int(float(m.group(2)) * scale[m.group(3)]) if m else None
        return OutOfMemory(text.splitlines()[0][-400:] if text else "out of memory", required)


def _shard_bytes(tree) -> int:
    """Bytes one device holds of these sharded abstract arrays (the largest shard of each)."""
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def _decoder_steps(model, params, mesh, batch: int, seq_len: int, chip, hbm: int, progress) -> list[dict]:
    """The generation engine's prefill (prompt of seq_len // 2) and decode (cache of seq_len) steps; a scanned
    model decodes unrolled (the KV cache is per layer), as `jaxfound generate` runs it."""
    if model.cfg.scan_layers:
        model = build_model(dataclasses.replace(model.cfg, scan_layers=False), model.head)
        params = jax.eval_shape(scan.unstack_layers, params)
    data, fsdp = mesh.shape["data"], mesh.shape["fsdp"]
    batch = max(data * fsdp, batch - batch % (data * fsdp))
    progress(f"compiling prefill and decode (batch {batch}, cache {seq_len}) ...")
    t0 = time.perf_counter()
    prefill, decode, _, _ = compiled_steps(model, params, mesh, batch, max(1, seq_len // 2), seq_len, True)
    spent = time.perf_counter() - t0
    out = [_entry("prefill", prefill, spent / 2, chip, hbm), _entry("decode", decode, spent / 2, chip, hbm)]
    for e in out:
        e["batch"] = batch
    return out


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if abs(b) >= GIB / 10 else f"{b / 2**20:.1f} MiB"


def format_report(r: dict) -> str:
    lines = [f"{r['arch']} {r['task']} ({r['params'] / 1e6:.1f}M params, {r['dtype']}) on {r['topology']}: "
             f"{r['devices']} x {r['device_kind']}, {_gib(r['hbm_bytes_per_device'])} HBM each, mesh "
             f"data={r['mesh']['data']} fsdp={r['mesh']['fsdp']} tensor={r['mesh']['tensor']}, "
             f"batch {r['batch_size']} x {r['seq_len']}"]
    for s in r["steps"]:
        m = s["memory"]
        verdict = "fits" if s["fits"] else f"DOES NOT FIT ({_gib(-s['headroom_bytes'])} over)"
        if s.get("compiled") is False:
            lines.append(f"\n[{s['step']}] the TPU compiler refused it after {s['compile_s']:.1f} s: {s['error']}")
            lines.append(f"  memory per chip: the compiler needs {_gib(m['temp'])} (arguments alone: state and batch "
                         f"shards, {_gib(m['argument'])}) -> at least {_gib(m['total'])}: {verdict}")
            continue
        lines.append(f"\n[{s['step']}] compiled in {s['compile_s']:.1f} s")
        lines.append(f"  memory per chip: arguments {_gib(m['argument'])}, outputs {_gib(m['output'])} "
                     f"(aliased {_gib(m['alias'])}), temporaries {_gib(m['temp'])}, code {_gib(m['generated_code'])}"
                     f" -> total {_gib(m['total'])}: {verdict}")
        lines.append(f"  FLOPs per chip: {s['xla_flops']:.3e} (XLA)"
                     + (f", model {s['model_flops']:.3e}" if "model_flops" in s else ""))
        if s.get("est_step_s"):
            r_s = s["roofline_s"]
            line = (f"  roofline estimate from XLA's counts: {s['est_step_s'] * 1e3:.3g} ms per step (compute "
                    f"{r_s['compute'] * 1e3:.3g}, HBM {r_s['memory'] * 1e3:.3g}, collectives "
                    f"{r_s['collectives'] * 1e3:.3g} ms)")
            if "est_mfu" in s:
                line += (f": MFU {100 * s['est_mfu']:.1f}% ({100 * s['est_mfu_no_overlap']:.1f}% without overlap), "
                         f"{s['est_tokens_per_s']:.3g} tokens/s")
            lines.append(line)
        if s["collectives"]:
            lines.append("  collectives: " + ", ".join(f"{k} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
                                                      for k, v in s["collectives"].items()))
        else:
            lines.append("  collectives: none")
    lines.append("\n" + ("fits" if r["fits"] else "does NOT fit") + f" on {r['topology']} (compiler estimates "
                 "for a slice that is not attached)")
    return "\n".join(lines)
