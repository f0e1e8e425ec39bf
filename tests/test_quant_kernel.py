"""The native W8A8 kernels (quant/kernel.py: AVX-512 VNNI and AVX2, jax.ffi), each against an integer numpy
reference and XLA's w8a8 path. Every path this CPU supports runs every test; a path it lacks is skipped by
itself, with the reason (on x86-64 Linux with a C++ compiler the AVX2 path always runs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxfound.errors import JaxfoundError
from jaxfound.quant import kernel
from jaxfound.quant.int8 import quantize_kernel, w8a8_dot_xla

F32_ULP = float(np.finfo(np.float32).eps)


@pytest.fixture(params=list(kernel.PATHS))
def dense(request):
    """The dense function of one kernel path; a build failure on a CPU that supports the path fails the test."""
    reason = kernel.why_unsupported(request.param)
    if reason:
        pytest.skip(f"{request.param} kernel: {reason}")
    return kernel.load(request.param)


def integer_problem(rng, M, K, N):
    """x rows whose absmax is exactly 127 (activation scale 1, qx = x) and weight scales 1: out = qx @ qw."""
    qx = rng.integers(-127, 128, (M, K)).astype(np.int32)
    qx[:, rng.integers(0, K)] = 127
    qw = rng.integers(-127, 128, (K, N)).astype(np.int8)
    return qx.astype(np.float32), qw, np.ones(N, np.float32), qx @ qw.astype(np.int32)


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 33, 17), (13, 64, 64), (100, 384, 200), (6, 1024, 80),
                                   (97, 31, 9), (200, 99, 1541)])
def test_kernel_equals_integer_reference_exactly(dense, M, K, N):
    # every tail: rows not a multiple of the 4/8-row tiles or the 96-row block, K not of 2 or 4, N not of the
    # 8/16-column panels or of the 16/32-column tiles; small M is also split over columns
    x, qw, ws, ref = integer_problem(np.random.default_rng(M * K + N), M, K, N)
    assert np.abs(ref).max() < 2**24  # exactly representable after the int32 -> float32 conversion
    got = np.asarray(jax.jit(dense)(jnp.asarray(x), jnp.asarray(qw), jnp.asarray(ws)))
    np.testing.assert_array_equal(got, ref.astype(np.float32))


def test_kernel_extremes_do_not_overflow(dense):
    # VNNI: u8 = q + 128 reaches 255 and the 128 * colsum correction must cancel exactly;
    # AVX2: vpmaddwd's pair sums reach 2 * 127 * 127 and must not saturate
    for value in (-127.0, 127.0):
        x = np.full((3, 1024), value, np.float32)
        qw = np.full((1024, 20), -127, np.int8)
        got = np.asarray(dense(jnp.asarray(x), jnp.asarray(qw), jnp.ones(20)))
        np.testing.assert_array_equal(got, np.float32(-value * 127 * 1024))


@pytest.mark.parametrize("shape,K,N", [((2, 9), 40, 30), ((3, 128), 384, 384), ((1, 37), 96, 1536)])
def test_kernel_matches_xla_w8a8_path(dense, shape, K, N):
    rng = np.random.default_rng(K + N)
    x = rng.standard_normal((*shape, K)).astype(np.float32)
    x[..., rng.integers(0, K)] *= 30  # outlier channel, as after LayerNorm
    x[0, 0] = 0.0  # an all-zero token: scale 1, output exactly 0
    q, s = quantize_kernel(jnp.asarray(rng.standard_normal((K, N)).astype(np.float32) * 0.05))
    got = np.asarray(jax.jit(dense)(jnp.asarray(x), q, s))
    ref = np.asarray(jax.jit(w8a8_dot_xla)(jnp.asarray(x), q, s))
    assert got.shape == (*shape, N)
    np.testing.assert_array_equal(got[0, 0], 0.0)
    # same integers and the same float32 rescale; XLA may round the per-token 127 / absmax differently by an
    # ulp, which moves an occasional rounding of x * 127 / absmax, hence a few ulp of the output's scale
    tol = 4 * F32_ULP * np.abs(ref).max(axis=-1, keepdims=True) + 2 * np.asarray(s) * np.abs(x).max(-1, keepdims=True)
    assert np.all(np.abs(got - ref) <= tol)
    assert np.mean(got == ref) > 0.9


def test_kernel_on_a_sharded_batch_and_under_vmap(dense):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 16, 64)).astype(np.float32)
    q, s = quantize_kernel(jnp.asarray(rng.standard_normal((64, 48)).astype(np.float32)))
    ref = np.asarray(dense(jnp.asarray(x), q, s))
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, PartitionSpec("data")))
    np.testing.assert_array_equal(np.asarray(jax.jit(dense)(xs, q, s)), ref)
    np.testing.assert_array_equal(np.asarray(jax.vmap(dense, (0, None, None))(jnp.asarray(x), q, s)), ref)
    # batched weights: one call per weight
    q2, s2 = jnp.stack([q, q[:, ::-1]]), jnp.stack([s, s[::-1]])
    got = np.asarray(jax.jit(jax.vmap(dense, (None, 0, 0)))(jnp.asarray(x), q2, s2))
    np.testing.assert_array_equal(got[0], ref)
    np.testing.assert_array_equal(got[1], ref[..., ::-1])


def test_paths_agree_bit_for_bit():
    # the paths quantize and rescale alike, so on a machine with both they give the same floats
    runnable = [name for name in kernel.PATHS if kernel.why_unsupported(name) is None]
    if len(runnable) < 2:
        pytest.skip(f"only {runnable or 'no path'} runs here")
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((50, 200)).astype(np.float32))
    q, s = quantize_kernel(jnp.asarray(rng.standard_normal((200, 70)).astype(np.float32)))
    outs = [np.asarray(kernel.load(name)(x, q, s)) for name in runnable]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_default_kernel_is_the_chosen_path():
    name = kernel.path()
    if name is None:
        pytest.skip(f"w8a8 uses XLA ops here: {kernel.choose()[1]}")
    assert kernel.available()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 40)).astype(np.float32))
    q, s = quantize_kernel(jnp.asarray(np.random.default_rng(2).standard_normal((40, 24)).astype(np.float32)))
    np.testing.assert_array_equal(np.asarray(kernel.w8a8_dense(x, q, s)), np.asarray(kernel.load(name)(x, q, s)))


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be x86-64 Linux with a compiler and the given /proc/cpuinfo flags."""
    monkeypatch.setattr(kernel.platform, "system", lambda: "Linux")
    monkeypatch.setattr(kernel.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kernel, "compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(kernel, "NOT_DEFAULT", {})
    monkeypatch.delenv(kernel.ENV, raising=False)

    def set_flags(*flags):
        monkeypatch.setattr(kernel, "cpu_flags", lambda: frozenset(flags))

    return set_flags


AVX512_VNNI = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")


def test_choice_follows_the_cpu_flags(cpu):
    cpu(*AVX512_VNNI)
    assert kernel.choose()[0] == "avx512_vnni"
    cpu("avx2", "fma", "avx512f")  # AVX-512 without VNNI
    assert kernel.choose()[0] == "avx2"
    cpu("sse4_2", "avx")
    name, why = kernel.choose()
    assert name is None and "lacks avx2, fma" in why


def test_choice_skips_a_path_held_back_by_default(cpu, monkeypatch):
    cpu("avx2", "fma")
    monkeypatch.setattr(kernel, "NOT_DEFAULT", {"avx2": "slower than XLA here"})
    name, why = kernel.choose()
    assert name is None and "slower than XLA here" in why
    monkeypatch.setenv(kernel.ENV, "avx2")  # asking for it still works
    assert kernel.choose()[0] == "avx2"


def test_environment_overrides_the_choice(cpu, monkeypatch):
    cpu(*AVX512_VNNI)
    monkeypatch.setenv(kernel.ENV, "avx2")
    assert kernel.choose()[0] == "avx2"
    monkeypatch.setenv(kernel.ENV, "0")
    assert kernel.choose() == (None, "disabled by JAXFOUND_INT8_KERNEL=0")
    cpu("avx2", "fma")
    monkeypatch.setenv(kernel.ENV, "avx512_vnni")
    name, why = kernel.choose()
    assert name is None and "lacks avx512f" in why
    monkeypatch.setenv(kernel.ENV, "sse")
    with pytest.raises(JaxfoundError, match="not one of: 0, auto, avx512_vnni, avx2"):
        kernel.choose()
