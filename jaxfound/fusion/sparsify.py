"""Sparsifying one task vector before it is mixed: mergekit's sparsify.py as pure jax functions of one tensor.

    magnitude     TIES: keep the max(1, int(density * size)) largest |tau|
    outliers      Breadcrumbs: drop the int(gamma * size) largest |tau| and the smallest, keep int(density * size)
    bernoulli     DARE: keep each entry with probability density
    magprune      DELLA: keep with probability density - epsilon .. density + epsilon, rising with |tau|'s rank
                  within each output row

`rescale_l1` is mergekit's `rescale` (the default of DARE and DELLA): the kept entries are scaled so the tensor's L1
norm is unchanged (DARE's 1 / density in expectation). Python densities become rank windows before tracing, so one
compiled kernel serves every density; the random masks are functions of an explicit key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxfound.errors import JaxfoundError


def rescale_l1(tau, mask, eps: float = 1e-7):
    """tau where mask, scaled so the L1 norm matches tau's; left unscaled when either norm is below eps."""
    masked = jnp.where(mask, tau, 0).astype(tau.dtype)
    before, after = jnp.abs(tau).sum(), jnp.abs(masked).sum()
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, masked * (before / jnp.where(ok, after, 1)), masked).astype(tau.dtype)


def apply_mask(tau, mask, rescale):
    """tau where mask, rescaled to tau's L1 norm when rescale (a bool, possibly traced)."""
    if isinstance(rescale, bool):
        return rescale_l1(tau, mask) if rescale else jnp.where(mask, tau, 0).astype(tau.dtype)
    return jnp.where(rescale, rescale_l1(tau, mask), jnp.where(mask, tau, 0).astype(tau.dtype))


def rank_window_mask(tau, lo, hi):
    """Mask of the entries whose rank by ascending |tau| is in [lo, hi); lo and hi may be traced."""
    n = tau.size
    order = jnp.argsort(jnp.abs(tau).reshape(-1).astype(jnp.float32))
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return ((rank >= lo) & (rank < hi)).reshape(tau.shape)


def magnitude_window(size: int, density: float) -> tuple[int, int]:
    """TIES' kept ranks (mergekit `magnitude`): the max(1, int(density * size)) largest."""
    return size - max(1, int(density * size)), size


def outlier_window(size: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs' kept ranks (mergekit `magnitude_outliers`): by ascending |tau|, skip the smallest
    size - int(density * size) - int(gamma * size), keep the next int(density * size)."""
    target, n_top = int(density * size), int(gamma * size)
    n_bot = max(0, size - target - n_top)
    return n_bot, n_bot + target


def trim_mask(tau, density: float):
    """Mask of the max(1, int(density * size)) largest-magnitude entries of one tensor (mergekit `magnitude`)."""
    if density >= 1.0 or tau.size == 0:
        return jnp.ones(tau.shape, bool)
    return rank_window_mask(tau, *magnitude_window(tau.size, density))


def outlier_mask(tau, density: float, gamma: float):
    """Breadcrumbs' mask (mergekit `magnitude_outliers`): the largest gamma fraction and the smallest dropped."""
    if density >= 1.0:
        return jnp.ones(tau.shape, bool)
    return rank_window_mask(tau, *outlier_window(tau.size, density, gamma))


def bernoulli_mask(tau, density, key):
    """DARE's mask: each entry kept with probability density (which may be traced)."""
    return jax.random.uniform(key, tau.shape) < density


def rows(x, row_axis: int):
    """x as (rows, rest): torch's leading (output) axis first. row_axis says where that axis sits in jaxfound's layout
    (a Dense kernel is (in, out): its last axis)."""
    if x.ndim == 0:
        return x.reshape(1, 1)
    moved = jnp.moveaxis(x, row_axis, 0)
    return moved.reshape(moved.shape[0], -1)


def unrows(x_RxC, like, row_axis: int):
    """The inverse of rows."""
    if like.ndim == 0:
        return x_RxC.reshape(())
    moved_shape = (like.shape[row_axis],) + tuple(s for i, s in enumerate(like.shape) if i != row_axis % like.ndim)
    return jnp.moveaxis(x_RxC.reshape(moved_shape), 0, row_axis)


def check_magprune(density: float, epsilon: float, where: str = "della") -> None:
    if density < 1.0 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise JaxfoundError(f"{where}: density {density} and epsilon {epsilon} give keep probabilities outside (0, 1); "
                            "choose epsilon < min(density, 1 - density)")


def magprune_mask(tau, density, epsilon, key, row_axis: int = 0):
    """DELLA's MAGPRUNE mask: within each output row, entries ranked by |tau|; keep probability rises linearly from
    density - epsilon (smallest) to density + epsilon (largest). A 1-D tensor is one row, as in mergekit.
    density and epsilon may be traced; check_magprune validates Python values."""
    mag_RxC = jnp.abs(tau).reshape(1, -1) if tau.ndim < 2 else rows(jnp.abs(tau), row_axis)
    mag_RxC = mag_RxC.astype(jnp.float32)
    ranks = jnp.argsort(jnp.argsort(mag_RxC, axis=1), axis=1).astype(jnp.float32)  # 0 .. C-1
    span = max(mag_RxC.shape[1] - 1, 1)
    probs = (density - epsilon) + (ranks / span) * 2 * epsilon
    keep_RxC = jax.random.uniform(key, probs.shape) < probs
    return keep_RxC.reshape(tau.shape) if tau.ndim < 2 else unrows(keep_RxC, tau, row_axis)
