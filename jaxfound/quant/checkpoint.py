"""Quantized checkpoints: int8 kernels + float32 scales (4-bit: nibbles + float16 group scales and offsets) in
safetensors (never inflated, never pickled) + JSON.

A checkpoint is a directory: ``params.safetensors`` (keys are '/'-joined param paths) and ``quant.json``
(the caller's metadata: mode, model config, rules).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxfound.errors import JaxfoundError
from jaxfound.quant.int4 import ALL_MODES

PARAMS_FILE = "params.safetensors"
META_FILE = "quant.json"
FORMAT = "jaxfound-int8/2"  # /2: a tied word table may be int8 rows + one scale per row (embedding, scale)
READS = ("jaxfound-int8/1", FORMAT)  # /1 files (int8 Dense kernels only) are /2 files without an int8 table


def flatten(tree, prefix="") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if "/" in str(key):
            raise JaxfoundError(f"params: key {prefix}/{key} contains '/', which separates path parts on disk")
        path = f"{prefix}/{key}" if prefix else str(key)
        out.update(flatten(value, path) if isinstance(value, dict) else {path: np.asarray(value)})
    return out


def unflatten(flat: dict) -> dict:
    tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _to_json(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def save_quantized(path, qparams, metadata: dict) -> Path:
    """Write ``qparams`` as stored (int8 stays int8) and ``metadata`` (needs 'mode': w8 | w8a8 | w4) under ``path``."""
    if metadata.get("mode") not in ALL_MODES:
        mode = metadata.get("mode")
        raise JaxfoundError(f"save_quantized: metadata['mode'] is {mode!r}; allowed: {', '.join(ALL_MODES)}")
    try:
        meta_text = json.dumps({"format": FORMAT, **metadata}, default=_to_json, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise JaxfoundError(f"save_quantized: metadata must be JSON-serializable ({e})") from None
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {k: np.ascontiguousarray(v) for k, v in flatten(qparams).items()}
    # write-then-rename: a crash never leaves a half-written checkpoint under the final names
    save_file(flat, str(path / (PARAMS_FILE + ".tmp")))
    (path / (META_FILE + ".tmp")).write_text(meta_text, encoding="utf-8")
    os.replace(path / (PARAMS_FILE + ".tmp"), path / PARAMS_FILE)
    os.replace(path / (META_FILE + ".tmp"), path / META_FILE)
    return path


def load_quantized(path) -> tuple[dict, dict]:
    """(qparams as numpy arrays, metadata) from a directory written by ``save_quantized``."""
    path = Path(path)
    params_file, meta_file = path / PARAMS_FILE, path / META_FILE
    for f in (params_file, meta_file):
        if not f.is_file():
            raise JaxfoundError(f"quantized checkpoint: {f} not found (expected {PARAMS_FILE} and {META_FILE} "
                                f"written by jaxfound.quant.save_quantized)")
    try:
        metadata = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxfoundError(f"quantized checkpoint: {meta_file} is not valid JSON ({e})") from None
    if not isinstance(metadata, dict) or metadata.get("format") not in READS:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise JaxfoundError(f"quantized checkpoint: {meta_file} has format {found!r}; this jaxfound reads "
                            f"{', '.join(READS)} (written by save_quantized)")
    try:
        flat = load_file(str(params_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise JaxfoundError(f"quantized checkpoint: {params_file} is corrupt or not safetensors ({e})") from None
    for key in (k for k, v in flat.items() if k.endswith("kernel") and v.dtype == np.int8):
        scale = flat.get(key[: -len("kernel")] + "scale")
        if scale is None or flat[key].ndim != 2 or scale.shape != flat[key].shape[1:]:
            raise JaxfoundError(f"quantized checkpoint: {params_file}: int8 {key} has no matching (out,) scale")
    for key in (k for k, v in flat.items() if k.endswith("embedding") and v.dtype == np.int8):
        scale = flat.get(key[: -len("embedding")] + "scale")
        if scale is None or flat[key].ndim != 2 or scale.shape != flat[key].shape[:1]:
            raise JaxfoundError(f"quantized checkpoint: {params_file}: int8 table {key} has no matching (vocab,) "
                                "scale (one per row)")
    for key in (k for k, v in flat.items() if k.endswith("kernel") and v.dtype == np.uint8):  # 4-bit (quant.int4)
        stem = key[: -len("kernel")]
        scale, offset = flat.get(stem + "scale"), flat.get(stem + "offset")
        if (scale is None or offset is None or flat[key].ndim != 2 or scale.ndim != 2 or scale.shape != offset.shape
                or scale.shape[1] != flat[key].shape[1] or (2 * flat[key].shape[0]) % scale.shape[0]):
            raise JaxfoundError(f"quantized checkpoint: {params_file}: 4-bit {key} has no matching (groups, out) "
                                "scale and offset")
    metadata.pop("format")
    return unflatten(flat), metadata
