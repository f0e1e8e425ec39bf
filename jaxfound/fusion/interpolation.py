"""Per-tensor SLERP and Model Stock with mergekit's semantics (merge_methods/slerp.py, model_stock.py).

SLERP measures the angle between two whole tensors (flattened), so it does not depend on the layout. Model Stock's
filter_wise angles are per output row, which depends on it: mergekit works on torch layouts, whose leading axis is a
Linear's output; `row_axis` says where that axis sits in jaxfound's layout (a Dense kernel is (in, out), so its last
axis; embeddings, norms and biases: axis 0), and the results equal mergekit's on the same weights.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxfound.errors import JaxfoundError
from jaxfound.fusion.sparsify import rows, unrows

DOT_THRESHOLD = 0.9995  # |cos| above this: the rows are (anti)parallel and SLERP falls back to linear interpolation
NORM_EPS = 1e-8


def _compute(x):
    return x.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)


def slerp(t, v0, v1, dot_threshold: float = DOT_THRESHOLD):
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1) of one whole tensor, flattened to one vector.

    Tensors whose directions are (anti)parallel (|cos| > dot_threshold) interpolate linearly. The coefficients come
    from the normalised tensors, the result mixes the tensors as they are (their norms interpolate too).
    """
    a, b = _compute(v0).reshape(-1), _compute(v1).reshape(-1)
    if a.size == 0:
        return v0
    t = jnp.asarray(t, a.dtype)
    norm_a, norm_b = jnp.linalg.norm(a), jnp.linalg.norm(b)
    norm_a = jnp.where(norm_a > NORM_EPS, norm_a, 1)
    norm_b = jnp.where(norm_b > NORM_EPS, norm_b, 1)
    dot = jnp.clip(((a / norm_a) * (b / norm_b)).sum(), -1, 1)
    linear = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(linear, 0, dot))
    sin_theta = jnp.where(linear, 1, jnp.sin(theta))  # the linear branch never uses it
    coef_a = jnp.where(linear, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    coef_b = jnp.where(linear, t, jnp.sin(t * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape).astype(v0.dtype)


def model_stock(base, models, filter_wise: bool = False, row_axis: int = 0):
    """Model Stock (Jang et al. 2024): w = t * mean(models) + (1 - t) * base, t = N cos / (1 + (N - 1) cos), cos the
    mean pairwise cosine of the models' deltas from base (per output row when filter_wise, else per tensor).

    Where 1 + (N - 1) cos is near zero there is no finite estimate and the base is kept, as mergekit does.
    """
    n = len(models)
    if n < 2:
        raise JaxfoundError(f"model_stock needs at least 2 models besides the base (it averages their pairwise "
                            f"angles), got {n}")
    dtype = _compute(base).dtype
    if filter_wise:
        shape_rows = (lambda x: _compute(x).reshape(1, -1)) if base.ndim < 2 else (
            lambda x: rows(_compute(x), row_axis))
    else:
        shape_rows = (lambda x: _compute(x).reshape(1, -1))
    w0 = shape_rows(base)
    offsets = [shape_rows(m) - w0 for m in models]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
            cosines.append(jnp.clip((a * b).sum(-1) / jnp.maximum(norms, 1e-6), -1, 1))
    cos_R1 = jnp.stack(cosines).mean(0)[:, None]
    denominator = 1 + (n - 1) * cos_R1
    singular = jnp.abs(denominator) < 1e-6
    t = jnp.where(singular, 0, n * cos_R1 / jnp.where(singular, 1, denominator)).astype(dtype)
    average = sum(shape_rows(m) for m in models) / n
    mixed = t * average + (1 - t) * w0
    if filter_wise and base.ndim >= 2:
        return unrows(mixed, base, row_axis).astype(base.dtype)
    return mixed.reshape(base.shape).astype(base.dtype)
