"""Orbax checkpoints: train state + data-iterator state + resolved config, restorable onto any mesh.

Saves are asynchronous and keep the last N; orbax writes each step to a temporary directory and
renames it only when complete, so the last good checkpoint is never replaced by a partial one. On
restore, a step that fails to load is reported and skipped in favour of the previous one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxfound.errors import JaxfoundError

log = logging.getLogger("jaxfound")


def manager(directory: str | Path, keep: int = 2, async_save: bool = True) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(Path(directory).absolute() / "checkpoints", options=opts)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator=None, config: dict | None = None,
         force: bool = False) -> bool:
    """Start saving (async); returns whether a save was started."""
    import grain

    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
        items["config"] = ocp.args.JsonSave(config)
    return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_like(state, shardings):
    """ShapeDtypeStructs carrying the target shardings: restore reshards onto the current mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iterator=None):
    """Restore the newest loadable step -> (step, state, skipped) or (None, None, skipped).

    skipped: [(step, reason)] for newer steps that could not be read (truncated, missing, garbage).
    """
    import grain

    skipped = []
    for step in sorted(mngr.all_steps(read=True), reverse=True):
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
            return step, restored["state"], skipped
        except Exception as e:  # any unreadable step: say which and why, then fall back
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            log.warning("checkpoint step %d is unreadable (%s); falling back to an earlier one", step, reason)
            skipped.append((step, reason))
    return None, None, skipped


def read_config(run_dir: str | Path) -> dict:
    """The resolved config a run saved (run_dir/config.json)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise JaxfoundError(f"{path} not found: is {run_dir} a jaxfound run directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise JaxfoundError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def save_params(path: str | Path, params) -> None:
    """Params alone (e.g. the best fine-tuned model), synchronously."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(Path(path).absolute(), params, force=True)
    ckptr.wait_until_finished()


def load_params(path: str | Path, abstract=None):
    """Params saved by save_params; abstract (ShapeDtypeStructs with shardings) places them on a mesh."""
    path = Path(path).absolute()
    if not path.exists():
        raise JaxfoundError(f"checkpoint {path} not found")
    try:
        return ocp.StandardCheckpointer().restore(path, abstract) if abstract is not None else \
            ocp.StandardCheckpointer().restore(path)
    except Exception as e:
        raise JaxfoundError(f"checkpoint {path}: could not be read ({type(e).__name__}: {e})") from None
