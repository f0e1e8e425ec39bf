"""Training built once: mesh, optimizer, state shardings, the jitted step and the initial state (born sharded).

`fit`, the pretraining evaluation (it needs the params' shardings) and `bench` all start from `build`.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxfound.models import TRUNK_KEYS
from jaxfound.sharding import make_mesh
from jaxfound.train.optim import lr_schedule, make_optimizer
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
    tx = make_optimizer(cfg.train, schedule_steps)
    shardings = state_shardings(model, tx, mesh, seq_len)
    frozen = TRUNK_KEYS if cfg.train.freeze == "trunk" else ()
    step = make_train_step(model, tx, loss, mesh, shardings, cfg.train.seed, cfg.train.grad_accum, frozen)
    state = init_state(model, tx, mesh, seq_len, cfg.train.seed, shardings, init_params)
    return Training(mesh, tx, lr_schedule(cfg.train, schedule_steps), shardings, step, state)
