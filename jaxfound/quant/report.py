"""How much smaller the quantized params are, overall and for the tensors that were quantized."""

from __future__ import annotations

import numpy as np


def _leaves(tree, prefix="") -> dict:
    """'/'-joined path -> leaf (arrays, or shape / dtype structs: only shapes and dtypes are read)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        out.update(_leaves(value, path) if isinstance(value, dict) else {path: value})
    return out


def _nbytes(x) -> int:
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def size_report(params, qparams) -> dict:
    """Bytes before / after for the whole tree and for the quantized layers (Dense kernel -> int8 kernel + scale, or
    4-bit codes + group scales and offsets; a tied word table -> int8 rows + scale + its float16 lookup copy). params
    may be shapes alone (ShapeDtypeStruct leaves, e.g. models.abstract_params: a model read straight into int8 is never
    held in float)."""
    before, after = _leaves(params), _leaves(qparams)
    quantized = [p[: -len("/scale")] for p in after if p.endswith("/scale") and p not in before]
    weight = {p: f"{p}/kernel" if f"{p}/kernel" in after else f"{p}/embedding" for p in quantized}
    q_before = sum(_nbytes(before[weight[p]]) for p in quantized)

    def extra(p):  # a table's float copy; a 4-bit kernel's group offsets
        return sum(_nbytes(after[f"{p}/{k}"]) for k in ("lookup", "offset") if f"{p}/{k}" in after)

    q_after = sum(_nbytes(after[weight[p]]) + _nbytes(after[f"{p}/scale"]) + extra(p) for p in quantized)
    total_before = sum(_nbytes(v) for v in before.values())
    total_after = sum(_nbytes(v) for v in after.values())
    return {
        "bytes_before": total_before,
        "bytes_after": total_after,
        "ratio": total_before / max(total_after, 1),
        "quantized_layers": len(quantized),
        "quantized_bytes_before": q_before,
        "quantized_bytes_after": q_after,
        "quantized_ratio": q_before / max(q_after, 1),
    }
