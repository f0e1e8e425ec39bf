"""Training built once: mesh, optimizer, state shardings, the jitted step and the initial state (born sharded).

`fit`, the pretraining evaluation (it needs the params' shardings) and `bench` all start from `build`.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxfound.errors import JaxfoundError
from jaxfound.sharding import make_mesh
from jaxfound.train.optim import lr_schedule, make_optimizer, trainable_labels
from jaxfound.train.state import TrainState, init_state, state_shardings
from jaxfound.train.step import make_train_step


@dataclass
class Training:
    """What one run trains with; state is the initial state (restore a checkpoint over it)."""

    mesh: object
    tx: object
    schedule: object  # step -> learning rate
    shardings: TrainState  # a NamedSharding per leaf of the state
    step: object  # jitted (state, batch) -> (state, metrics), state donated
    state: TrainState


def build(cfg, model, loss, seq_len: int, schedule_steps: int, init_params=None) -> Training:
    """Everything a train loop needs for cfg (train, mesh sections), with the lr schedule over schedule_steps."""
    mesh = make_mesh(cfg.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.train.batch_size % shards:
        raise JaxfoundError(f"train.batch_size={cfg.train.batch_size} is not divisible by the mesh's data x fsdp = "
                            f"{shards} batch shards ({dict(mesh.shape)}); use a multiple of {shards} or set mesh.data")
    tx = make_optimizer(cfg.train, schedule_steps, model.cfg.arch)
    shardings = state_shardings(model, tx, mesh, seq_len)
    step = make_train_step(model, tx, loss, mesh, shardings, cfg.train.seed, cfg.train.grad_accum,
                           trainable_labels(cfg.train, model.cfg.arch))
    state = init_state(model, tx, mesh, seq_len, cfg.train.seed, shardings, init_params)
    return Training(mesh, tx, lr_schedule(cfg.train, schedule_steps), shardings, step, state)
