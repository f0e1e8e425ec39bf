"""Device mesh, logical-axis rules, and shardings for params, optimizer state and batches.

Sharding is a function of (the params' logical axis names, the mesh, the rules below): the models
name their axes ('embed', 'mlp', 'heads', 'vocab', ...), this file alone says which mesh axis each
name goes to.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfound.errors import JaxfoundError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes. Batch splits over data and fsdp; weights shard their 'embed' dimension
# over fsdp (ZeRO-3 style) and their heads / mlp / vocab dimension over tensor (Megatron style).
LOGICAL_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    # not ("vocab", "tensor"): XLA's SPMD partitioner (jax 0.10.2, CPU) computed wrong embedding gradients for
    # a table sharded (tensor, fsdp) under a (2, 2, 2) mesh (tests/test_sharding.py caught it); embed -> fsdp
    # already splits the table, and the tied logits stay batch-sharded.
    ("vocab", None),
    ("pos", None),
    ("types", None),
    ("norm", None),
    ("labels", None),
    ("head_dim", None),
    ("layers", None),  # the stacked layer axis of scanned blocks (model.scan_layers): every device holds all layers
    # the KV cache: rows over data and fsdp like the batch, key/value heads over tensor like the heads
    ("cache_batch", ("data", "fsdp")),
    ("cache_len", None),
    ("cache_heads", "tensor"),
)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolve one -1 entry to 'all devices left over' and check the product."""
    sizes = [data, fsdp, tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise JaxfoundError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise JaxfoundError(f"mesh: sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise JaxfoundError(f"mesh: {num_devices} devices are not divisible by fsdp*tensor*... = {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise JaxfoundError(
            f"mesh: data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {int(np.prod(sizes))}, "
            f"but there are {num_devices} devices (use -1 for one axis to take the rest)"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (sharding propagates; no explicit-axis typing)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU / unusual topologies: plain order is fine
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _fit_spec(spec: P, shape, mesh: Mesh) -> P:
    """Drop mesh axes that do not divide a dimension (that dimension is then replicated)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if names and dim % size == 0 else None)
    return P(*out)


def logical_shardings(abstract_boxed, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of (boxed, abstract) values: logical names -> mesh axes."""
    specs = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.unbox(abstract_boxed)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
        mesh_specs, shapes, is_leaf=lambda s: isinstance(s, P),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (global batch) axis split over data and fsdp."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def global_batch(batch_local: dict, mesh: Mesh) -> dict:
    """Process-local numpy rows -> global jax arrays sharded along the batch axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch_local.items()}


def bytes_per_device(tree) -> dict[str, int]:
    """Bytes each device holds of a tree of (sharded) jax arrays."""
    out: dict[str, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            key = str(shard.device)
            out[key] = out.get(key, 0) + shard.data.nbytes
    return out


def initialize_distributed(mesh_cfg) -> None:
    """jax.distributed.initialize from config, or from the environment (TPU pods, SLURM) when set there."""
    if jax.distributed.is_initialized():
        return
    if mesh_cfg.coordinator:
        jax.distributed.initialize(
            coordinator_address=mesh_cfg.coordinator,
            num_processes=mesh_cfg.num_processes,
            process_id=mesh_cfg.process_id,
        )
    elif any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES")):
        jax.distributed.initialize()  # the cluster environment says who the coordinator is


_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("jaxfound_activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=LOGICAL_RULES):
    """While tracing under this context, `constrain` pins activations to mesh axes by logical name."""
    token = _ACTIVATION_MESH.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain(x, logical_axes):
    """with_sharding_constraint by logical names; a no-op outside `activation_sharding`."""
    ctx = _ACTIVATION_MESH.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = nn.logical_to_mesh_axes(logical_axes, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)))


def current_activation_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_sharding` (None outside one): kernels that shard_map themselves."""
    ctx = _ACTIVATION_MESH.get()
    return None if ctx is None else ctx[0]
