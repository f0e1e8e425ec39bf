"""Orbax checkpoints: train state + data-iterator state + resolved config, restorable onto any mesh.

Saves are asynchronous and keep the last N; orbax writes each step to a temporary directory and
renames it only when complete, and deletes steps past N only after that, so the last good checkpoint is
never replaced by a partial one. A write that fails (disk full, quota) stops the run with a JaxfoundError;
temporary directories a killed run left behind are removed when the next run opens the manager. On
restore, a step that fails to load is reported and skipped in favour of the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxfound.errors import JaxfoundError

log = logging.getLogger("jaxfound")


def manager(directory: str | Path, keep: int = 2, async_save: bool = True) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(Path(directory).absolute() / "checkpoints", options=opts)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator=None, config: dict | None = None,
         force: bool = False, data_fingerprint: dict | None = None) -> bool:
    """Start saving (async); returns whether a save was started.

    data_fingerprint (jaxfound.data.pipeline.fingerprint of the training examples) lets a resume check that
    the saved data position refers to the same data.

    Raises JaxfoundError if this save, or the previous one still in flight, could not be written.
    """
    import grain

    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
        items["config"] = ocp.args.JsonSave(config)
    if data_fingerprint is not None:
        items["data_fingerprint"] = ocp.args.JsonSave(data_fingerprint)
    try:
        return mngr.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # orbax / tensorstore surface a failed write (ENOSPC, EFBIG, EACCES) as many types
        raise _write_error(mngr, step, e) from None


def finish(mngr: ocp.CheckpointManager, close: bool = False) -> None:
    """Wait for the save in flight (and optionally close); a failed write becomes a JaxfoundError."""
    try:
        mngr.wait_until_finished()
        if close:
            mngr.close()
    except Exception as e:
        raise _write_error(mngr, None, e) from None


def complete_steps(mngr: ocp.CheckpointManager) -> list[int]:
    """Steps whose directories were finalised (renamed from their temporary name), read from disk."""
    root = Path(str(mngr.directory))
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []


def _write_error(mngr: ocp.CheckpointManager, step: int | None, e: Exception) -> JaxfoundError:
    """The failed write (often the previous async save, noticed at the next one) as one actionable line."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    code = getattr(e, "errno", None) or next(iter(re.findall(r"os_error_code='?(\d+)", first)), None)
    if code:  # tensorstore buries the OS error (ENOSPC, EFBIG, EACCES) in a long message
        reason = f"{os.strerror(int(code))}, errno {code}"
    else:
        reason = f"{type(e).__name__}: {first if len(first) <= 300 else first[:150] + ' ... ' + first[-150:]}"
    try:  # stop orbax's background writers so the process exits quietly
        mngr.close()
    except Exception:  # noqa: S110  (the same failure again)
        pass
    done = complete_steps(mngr)
    last = f"the last complete checkpoint is step {done[-1]}" if done else "no complete checkpoint was written"
    when = f" (noticed when saving step {step})" if step is not None else ""
    return JaxfoundError(f"a checkpoint could not be written to {mngr.directory}{when} ({reason}); {last}. "
                         "Free disk space (or choose another run.dir) and run the same command again to resume")


def state_bytes(abstract_state) -> int:
    """Bytes one checkpoint of this state holds (global arrays, before compression)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state) if hasattr(x, "dtype")))


def check_space(directory: str | Path, abstract_state) -> None:
    """Fail before training if the disk under directory cannot hold even one checkpoint of this state."""
    need = state_bytes(abstract_state)
    free = shutil.disk_usage(Path(directory)).free
    if free < need:
        raise JaxfoundError(f"run.dir={directory}: {free / 2**20:.1f} MiB free on its disk, but one checkpoint of "
                            f"this model needs about {need / 2**20:.1f} MiB; free space or choose another run.dir")


def abstract_like(state, shardings):
    """ShapeDtypeStructs carrying the target shardings: restore reshards onto the current mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def latest_params(run_dir: str | Path) -> dict:
    """The params of run_dir's latest checkpoint (host arrays as saved; no train state, no iterator)."""
    mngr = manager(run_dir, async_save=False)
    step = mngr.latest_step()
    if step is None:
        mngr.close()
        raise JaxfoundError(f"{run_dir}: no best/ params and no checkpoint under checkpoints/ to load params from "
                            "(a finished `jaxfound pretrain` or `finetune` run has them)")
    params = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]
    mngr.close()
    return params


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iterator=None,
                   data_fingerprint: dict | None = None):
    """Restore the newest loadable step -> (step, state, skipped) or (None, None, skipped).

    skipped: [(step, reason)] for newer steps that could not be read (truncated, missing, garbage). A readable
    step written for other training data (its saved fingerprint differs from data_fingerprint, or its data
    position lies outside this run's data) is an error, not a reason to fall back: nothing is moved aside.
    Checkpoints written before fingerprints were saved are checked by position only.
    """
    skipped = []
    mngr.reload()
    fresh = data_iterator.get_state() if data_iterator is not None else None
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
            _check_fingerprint(mngr, step, data_fingerprint)
            if data_iterator is not None:
                _restore_data(mngr, step, data_iterator)
        except _DataMismatch as e:
            raise JaxfoundError(
                f"checkpoint step {step} in {mngr.directory} was written for other training data ({e}); resume with "
                "the data the run was started with, or use a new run.dir"
            ) from None
        except Exception as e:  # any unreadable step: say which and why, then fall back
            if data_iterator is not None:
                data_iterator.set_state(fresh)  # a failed restore may have left the iterator half-set
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            log.warning("checkpoint step %d is unreadable (%s); falling back to an earlier one", step, reason)
            skipped.append((step, reason))
            continue
        if skipped:
            _quarantine(mngr, [s for s, _ in skipped])
        return step, restored["state"], skipped
    if skipped:  # nothing readable: the run starts over, and must be able to save at those step numbers
        _quarantine(mngr, [s for s, _ in skipped])
    return None, None, skipped


class _DataMismatch(Exception):
    """A readable data-iterator state that points outside this run's data (e.g. the train file changed)."""


def _check_fingerprint(mngr: ocp.CheckpointManager, step: int, current: dict | None) -> None:
    if current is None or not (Path(str(mngr.directory)) / str(step) / "data_fingerprint").exists():
        return
    saved = mngr.restore(step, args=ocp.args.Composite(data_fingerprint=ocp.args.JsonRestore()))["data_fingerprint"]
    if saved != current:
        raise _DataMismatch(f"{saved.get('examples')} training examples with hash {saved.get('blake2b')} then, "
                            f"{current['examples']} with hash {current['blake2b']} now")


def _restore_data(mngr: ocp.CheckpointManager, step: int, data_iterator) -> None:
    import grain

    foreign = _foreign_data_state(mngr, step)
    try:
        if foreign is not None:
            data_iterator.set_state(json.loads(foreign.read_text()))
        else:
            mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except IndexError as e:  # grain: "Checkpoint `next_index` N is out of range for dataset of length M."
        raise _DataMismatch(f"its data position does not fit this run's data: {str(e).splitlines()[0][:200]}") from None


def _quarantine(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
    """Rename unreadable steps to '<step>.unreadable' (kept for inspection, invisible to orbax).

    Left in place they would count towards checkpoint.keep, so saves after the fallback would delete the
    good step restored from, and orbax would refuse to save at their step numbers.
    """
    root = Path(str(mngr.directory))
    if jax.process_index() == 0:
        for step in steps:
            target = root / f"{step}.unreadable"
            n = 1
            while target.exists():
                n += 1
                target = root / f"{step}.unreadable{n}"
            (root / str(step)).rename(target)
            log.warning("moved unreadable checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:

        multihost_utils.sync_global_devices("jaxfound_checkpoint_quarantine")
    mngr.reload()


def _foreign_data_state(mngr: ocp.CheckpointManager, step: int) -> Path | None:
    """Process 0's iterator state when the checkpoint was written by a different number of processes.

    grain names the file by (process, process count); jaxfound's pretraining iterators hold only the next
    step, the same in every process, so process 0's state is valid for any process count.
    """
    data_dir = Path(str(mngr.directory)) / str(step) / "data"
    if not data_dir.is_dir() or (data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json").exists():
        return None
    written = sorted(data_dir.glob("process_0-of-*.json"))
    return written[0] if written else None


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
