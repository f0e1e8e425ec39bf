"""The native W8A8 kernel (AVX-512 VNNI, jax.ffi) against an integer numpy reference and XLA's w8a8 path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxfound.quant import kernel
from jaxfound.quant.int8 import quantize_kernel, w8a8_dot_xla

pytestmark = pytest.mark.skipif(
    not kernel.available(), reason=f"VNNI kernel not usable here: {kernel._why_unavailable() or 'build failed'}")

F32_ULP = float(np.finfo(np.float32).eps)


def integer_problem(rng, M, K, N):
    """x rows whose absmax is exactly 127 (activation scale 1, qx = x) and weight scales 1: out = qx @ qw."""
    qx = rng.integers(-127, 128, (M, K)).astype(np.int32)
    qx[:, rng.integers(0, K)] = 127
    qw = rng.integers(-127, 128, (K, N)).astype(np.int8)
    return qx.astype(np.float32), qw, np.ones(N, np.float32), qx @ qw.astype(np.int32)


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 33, 17), (13, 64, 64), (100, 384, 200), (6, 1024, 80)])
def test_kernel_equals_integer_reference_exactly(M, K, N):
    # every tail: rows not a multiple of the 8-row tile or the 96-row block, K not of 4,
    # N not of 16 or of the 32-column tile
    x, qw, ws, ref = integer_problem(np.random.default_rng(M * K + N), M, K, N)
    assert np.abs(ref).max() < 2**24  # exactly representable after the int32 -> float32 conversion
    got = np.asarray(jax.jit(kernel.w8a8_dense)(jnp.asarray(x), jnp.asarray(qw), jnp.asarray(ws)))
    np.testing.assert_array_equal(got, ref.astype(np.float32))


def test_kernel_extremes_do_not_overflow():
    # u8 = q + 128 reaches 255 and the 128 * colsum correction must cancel exactly
    x = np.full((3, 1024), -127.0, np.float32)
    qw = np.full((1024, 20), -127, np.int8)
    got = np.asarray(kernel.w8a8_dense(jnp.asarray(x), jnp.asarray(qw), jnp.ones(20)))
    np.testing.assert_array_equal(got, np.float32(127 * 127 * 1024))


@pytest.mark.parametrize("shape,K,N", [((2, 9), 40, 30), ((3, 128), 384, 384), ((1, 37), 96, 1536)])
def test_kernel_matches_xla_w8a8_path(shape, K, N):
    rng = np.random.default_rng(K + N)
    x = rng.standard_normal((*shape, K)).astype(np.float32)
    x[..., rng.integers(0, K)] *= 30  # outlier channel, as after LayerNorm
    x[0, 0] = 0.0  # an all-zero token: scale 1, output exactly 0
    q, s = quantize_kernel(jnp.asarray(rng.standard_normal((K, N)).astype(np.float32) * 0.05))
    got = np.asarray(jax.jit(kernel.w8a8_dense)(jnp.asarray(x), q, s))
    ref = np.asarray(jax.jit(w8a8_dot_xla)(jnp.asarray(x), q, s))
    assert got.shape == (*shape, N)
    np.testing.assert_array_equal(got[0, 0], 0.0)
    # same integers and the same float32 rescale; XLA may round the per-token 127 / absmax differently by an
    # ulp, which moves an occasional rounding of x * 127 / absmax, hence a few ulp of the output's scale
    tol = 4 * F32_ULP * np.abs(ref).max(axis=-1, keepdims=True) + 2 * np.asarray(s) * np.abs(x).max(-1, keepdims=True)
    assert np.all(np.abs(got - ref) <= tol)
    assert np.mean(got == ref) > 0.9


def test_kernel_on_a_sharded_batch_and_under_vmap():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 16, 64)).astype(np.float32)
    q, s = quantize_kernel(jnp.asarray(rng.standard_normal((64, 48)).astype(np.float32)))
    ref = np.asarray(kernel.w8a8_dense(jnp.asarray(x), q, s))
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, PartitionSpec("data")))
    np.testing.assert_array_equal(np.asarray(jax.jit(kernel.w8a8_dense)(xs, q, s)), ref)
    np.testing.assert_array_equal(np.asarray(jax.vmap(kernel.w8a8_dense, (0, None, None))(jnp.asarray(x), q, s)), ref)
    # batched weights: one call per weight
    q2, s2 = jnp.stack([q, q[:, ::-1]]), jnp.stack([s, s[::-1]])
    got = np.asarray(jax.jit(jax.vmap(kernel.w8a8_dense, (None, 0, 0)))(jnp.asarray(x), q2, s2))
    np.testing.assert_array_equal(got[0], ref)
    np.testing.assert_array_equal(got[1], ref[..., ::-1])


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("JAXFOUND_INT8_KERNEL", "0")
    assert "JAXFOUND_INT8_KERNEL=0" in kernel._why_unavailable()
