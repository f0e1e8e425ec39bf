"""The W8A8 Dense as a native CPU kernel, built on first use and called through jax.ffi.

XLA:CPU's int8 x int8 -> int32 dot runs no faster than its float32 dot (benchmarks/int8_matmul.py), so w8a8
on CPU gained nothing from int8. Two native paths compute the same numbers as the XLA path in
``int8.quantized_dot`` (per-token activation quantization, int8 GEMM, rescale, fused in one call;
tests/test_quant_kernel.py checks each against an integer reference and against XLA):

  avx512_vnni  ``int8_dense.cc``: vpdpbusd, for CPUs with avx512f/bw/vl/dq and avx512_vnni.
  avx2         ``int8_dense_avx2.cc``: vpmaddwd on int16, for CPUs with avx2 and fma.

Each path also serves weights packed once (``quant.packed``: no per-call packing, a small-M tiling for decode steps,
the columns split over the pool), as w8a8 and as weight-only w8 (int8 converted to float in registers).
``int4_dense.cc`` is the W4A8 dense on 4-bit weights packed once (``quant.int4``), built per path with that path's
flags (AVX2 adds F16C for the float16 group scales): vpdpbusd, or vpmaddubsw + vpmaddwd, on the unpacked nibbles.

The path is chosen at run time from /proc/cpuinfo: the first path of ``DEFAULT_ORDER`` the CPU supports,
unless ``NOT_DEFAULT`` holds it back (with the measured reason). $JAXFOUND_INT8_KERNEL overrides the
choice: ``0`` keeps w8a8 on XLA ops, ``avx512_vnni`` or ``avx2`` asks for that path (e.g. to run the AVX2
path on an AVX-512 machine), ``auto`` (the default) chooses. ``load(name)`` builds any supported path
whatever the default, for tests and benchmarks.

Each path is compiled with its own flags by the system C++ compiler into its own shared library in a cache
directory ($JAXFOUND_CACHE, else $XDG_CACHE_HOME/jaxfound, else ~/.cache/jaxfound), keyed by the source, the
jaxlib version, the flags and the compiler. Where no path can be used -- not x86-64 Linux, a CPU without the
instructions, no compiler, a failed build, or JAXFOUND_INT8_KERNEL=0 -- ``available()`` says why once (a
warning) and w8a8 stays on the XLA path; on GPU and TPU the XLA path is always used (``lax.platform_dependent``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from jaxfound.errors import JaxfoundError

log = logging.getLogger(__name__)

COMMON_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")


@dataclass(frozen=True)
class KernelPath:
    """One native implementation: its source, compiler flags, the /proc/cpuinfo flags it needs, its FFI names."""

    name: str
    source: Path
    flags: tuple[str, ...]
    cpu_flags: tuple[str, ...]
    target: str  # the XLA FFI target it is registered as
    symbol: str  # the handler symbol in the shared library
    packed_target: str  # the same for weights packed once (quant.packed), w8a8
    packed_symbol: str
    w8_target: str  # weight-only (w8: float activations) on packed weights
    w8_symbol: str


_HERE = Path(__file__).parent
HEADERS = (_HERE / "parallel_for.h",)  # included by every native source (compile_library's -I and cache key)
PATHS = {
    "avx512_vnni": KernelPath(
        "avx512_vnni", _HERE / "int8_dense.cc",
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"),
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"), "jaxfound_w8a8_dense", "JaxfoundW8A8Dense",
        "jaxfound_w8a8_packed", "JaxfoundW8A8Packed", "jaxfound_w8_packed", "JaxfoundW8Packed"),
    "avx2": KernelPath(
        "avx2", _HERE / "int8_dense_avx2.cc", ("-mavx2", "-mfma"), ("avx2", "fma"),
        "jaxfound_w8a8_dense_avx2", "JaxfoundW8A8DenseAvx2", "jaxfound_w8a8_packed_avx2", "JaxfoundW8A8PackedAvx2",
        "jaxfound_w8_packed_avx2", "JaxfoundW8PackedAvx2"),
}
DEFAULT_ORDER = ("avx512_vnni", "avx2")
# Paths that w8a8 does not use unless $JAXFOUND_INT8_KERNEL names them, with the measured reason. None now:
# on a 2-core AVX2 EPYC the avx2 path beat XLA's w8a8 ops at all 12 NER shapes, 1.02x-2.7x, geomean 1.5x
# (M 1..1024, K x N 384x384 / 384x1536 / 1536x384; benchmarks/results/int8_matmul_avx2.json).
NOT_DEFAULT: dict[str, str] = {}
ENV = "JAXFOUND_INT8_KERNEL"


def cache_dir() -> Path:
    if os.environ.get("JAXFOUND_CACHE"):
        return Path(os.environ["JAXFOUND_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxfound"


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def why_unsupported(name: str) -> str | None:
    """Why this machine cannot run path ``name`` (None: it can, given that the build succeeds)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"built for x86-64 Linux only (this is {platform.system()} {platform.machine()})"
    missing = [f for f in PATHS[name].cpu_flags if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if not compiler():
        return "no C++ compiler found (set $CXX or install g++)"
    return None


def choose() -> tuple[str | None, str]:
    """(the path w8a8 should use, or None; why) from $JAXFOUND_INT8_KERNEL and the CPU's flags."""
    asked = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if asked == "0":
        return None, f"disabled by {ENV}=0"
    if asked in PATHS:
        reason = why_unsupported(asked)
        return (None, f"{ENV}={asked} but {reason}") if reason else (asked, f"asked for by {ENV}={asked}")
    if asked not in ("auto", "1"):
        raise JaxfoundError(f"{ENV}={asked!r} is not one of: 0, auto, {', '.join(PATHS)}")
    skipped = []
    for name in DEFAULT_ORDER:
        reason = why_unsupported(name) or NOT_DEFAULT.get(name)
        if reason is None:
            return name, "the fastest path this CPU supports"
        skipped.append(f"{name}: {reason}")
    return None, "; ".join(skipped)


def compile_library(source: Path, flags: tuple[str, ...], what: str) -> Path:
    """Compile a native FFI source into a shared library in cache_dir()/kernels (once per source / jaxlib / flags /
    compiler) and return its path. Raises RuntimeError with the compiler's message when the build fails."""
    cxx = compiler()
    flags = [*COMMON_FLAGS, *flags]
    headers = b"".join(h.read_bytes() for h in HEADERS)  # a changed header rebuilds every library
    key = hashlib.sha256(
        source.read_bytes() + headers + jaxlib.__version__.encode() + " ".join(flags).encode() + str(cxx).encode()
    ).hexdigest()[:16]
    lib = cache_dir() / "kernels" / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", f"-I{_HERE}", str(source), "-o", str(out)]
        log.info("building the %s: %s", what, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, lib)  # atomic: concurrent builders race harmlessly
    return lib


def build(name: str) -> Path:
    """Compile path ``name`` (once per source / jaxlib / flags / compiler) and return the shared library."""
    kp = PATHS[name]
    return compile_library(kp.source, kp.flags, f"int8 {name} kernel")


def load(name: str):
    """Build and register path ``name`` with XLA:CPU; returns its dense(x (..., I), q (I, O), scale (O,)).

    Raises RuntimeError (saying why) where this machine cannot run it. Does not change what w8a8 uses.
    """
    return _register(name)[0]


def load_packed(name: str, mode: str = "w8a8"):
    """As ``load``, the path's dense on weights packed once: (x (..., I), packed, comp, scale (O,)) (quant.packed);
    mode 'w8a8' (per-token int8 activations) or 'w8' (float activations, int8 weights converted in registers)."""
    if mode not in ("w8a8", "w8"):
        raise JaxfoundError(f"unknown packed kernel mode {mode!r} (known: w8a8, w8)")
    return _register(name)[1 if mode == "w8a8" else 2]


@functools.cache
def _register(name: str):
    """(dense, packed w8a8 dense, packed w8 dense) of path ``name``, built and registered once per process."""
    if name not in PATHS:
        raise JaxfoundError(f"unknown int8 kernel path {name!r} (known: {', '.join(PATHS)})")
    reason = why_unsupported(name)
    if reason:
        raise RuntimeError(f"the {name} int8 kernel cannot run here: {reason}")
    kp = PATHS[name]
    try:
        lib = ctypes.cdll.LoadLibrary(str(build(name)))
        for target, symbol in ((kp.target, kp.symbol), (kp.packed_target, kp.packed_symbol),
                               (kp.w8_target, kp.w8_symbol)):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"could not build or load the {name} int8 kernel: {e}") from e
    return _dense_call(kp.target), _packed_call(kp.packed_target), _packed_call(kp.w8_target)


@functools.cache
def path() -> str | None:
    """The native path w8a8 runs on this machine ('avx512_vnni' | 'avx2'), or None for XLA ops (warns why)."""
    name, reason = choose()
    if name is not None:
        try:
            load(name)
            return name
        except RuntimeError as e:
            reason = str(e)
    log.warning("int8 w8a8 on CPU uses XLA's int8 dot, not a native kernel: %s", reason)
    return None


def available() -> bool:
    """True when w8a8 runs on a native kernel here (the first call builds and registers it)."""
    return path() is not None


def w8a8_dense(x_NxI, q_IxO, scale_O):
    """The kernel of ``path()``: x (..., I) float32 -> (..., O) float32; CPU only, ``available()`` must be True."""
    name = path()
    if name is None:
        raise RuntimeError(f"no native int8 kernel here ({choose()[1]}); use int8.w8a8_dot_xla")
    return load(name)(x_NxI, q_IxO, scale_O)


def w8a8_packed(x_NxI, packed, comp, scale_O):
    """``w8a8_dense`` on weights packed once (quant.packed.pack_kernel); CPU only, ``available()`` must be True."""
    name = path()
    if name is None:
        raise RuntimeError(f"no native int8 kernel here ({choose()[1]}); use quant.packed.packed_dot_xla")
    return load_packed(name)(x_NxI, packed, comp, scale_O)


def w8_packed(x_NxI, packed, comp, scale_O):
    """Weight-only int8 (float activations) on packed weights; CPU only, ``available()`` must be True."""
    name = path()
    if name is None:
        raise RuntimeError(f"no native int8 kernel here ({choose()[1]}); use quant.packed.packed_dot_xla")
    return load_packed(name, "w8")(x_NxI, packed, comp, scale_O)


W4_SOURCE = _HERE / "int4_dense.cc"
W4_EXTRA = {"avx512_vnni": ((), ()), "avx2": (("-mf16c",), ("f16c",))}  # (flags, cpu flags) beyond the path's own
W4_TARGET = "jaxfound_w4a8_packed_{}"


@functools.cache
def _register_w4(name: str):
    """The packed W4A8 dense of path ``name`` (int4_dense.cc built with that path's flags), registered once."""
    if name not in PATHS:
        raise JaxfoundError(f"unknown int8 kernel path {name!r} (known: {', '.join(PATHS)})")
    extra_flags, extra_cpu = W4_EXTRA[name]
    reason = why_unsupported(name)
    missing = [f for f in extra_cpu if f not in cpu_flags()]
    if reason or missing:
        raise RuntimeError(f"the {name} w4 kernel cannot run here: {reason or 'this CPU lacks ' + ', '.join(missing)}")
    target = W4_TARGET.format(name)
    try:
        lib = ctypes.cdll.LoadLibrary(str(compile_library(W4_SOURCE, PATHS[name].flags + extra_flags,
                                                          f"w4 {name} kernel")))
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.JaxfoundW4A8Packed), platform="cpu")
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"could not build or load the {name} w4 kernel: {e}") from e
    return _w4_call(target)


def load_w4(name: str):
    """Path ``name``'s W4A8 dense on packed w4 weights: (x (..., I), packed (quant.int4.pack_w4), out features,
    group) -> (..., O) float32. Raises RuntimeError (saying why) where this machine cannot run it."""
    return _register_w4(name)


@functools.cache
def w4_available() -> bool:
    """True when the W4A8 kernel of ``path()`` builds here (the first call builds it; a failure is said once)."""
    name = path()
    if name is None:
        return False
    try:
        load_w4(name)
        return True
    except RuntimeError as e:
        log.warning("w4 on CPU uses XLA ops, not a native kernel: %s", e)
        return False


def w4a8_packed(x_NxI, packed, out_features: int, group: int):
    """The W4A8 kernel of ``path()``; CPU only, ``w4_available()`` must be True."""
    if not w4_available():
        raise RuntimeError("no native w4 kernel here; use quant.int4.w4_dot_xla")
    return load_w4(path())(x_NxI, packed, out_features, group)


def _w4_call(target: str):
    def dense(x_NxI, packed, out_features: int, group: int):
        lead = x_NxI.shape[:-1]
        x2d = x_NxI.reshape(-1, x_NxI.shape[-1]).astype(jnp.float32)
        out_type = jax.ShapeDtypeStruct((x2d.shape[0], out_features), jnp.float32)
        y = jax.ffi.ffi_call(target, out_type)(x2d, packed, n=np.int64(out_features), group=np.int64(group))
        return y.reshape(*lead, out_features)

    return dense


def _packed_call(target: str):
    """The FFI call of ``target`` on packed weights, x's leading axes folded into rows (one call per batch)."""

    @jax.custom_batching.custom_vmap
    def dense(x_NxI, packed, comp, scale_O):
        lead = x_NxI.shape[:-1]
        x2d = x_NxI.reshape(-1, x_NxI.shape[-1]).astype(jnp.float32)
        out_type = jax.ShapeDtypeStruct((x2d.shape[0], scale_O.shape[0]), jnp.float32)
        y = jax.ffi.ffi_call(target, out_type)(x2d, packed, comp, scale_O.astype(jnp.float32))
        return y.reshape(*lead, scale_O.shape[0])

    @dense.def_vmap
    def _vmap(axis_size, in_batched, x, packed, comp, scale):
        if not any(in_batched[1:]):
            return dense(x, packed, comp, scale), True
        args = tuple(a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
                     for a, b in zip((x, packed, comp, scale), in_batched))
        return jax.lax.map(lambda one: dense(*one), args), True

    return dense


def _dense_call(target: str):
    """The FFI call of ``target`` as a function of (x, q, scale), batched by folding x's rows into one call."""

    @jax.custom_batching.custom_vmap
    def dense(x_NxI, q_IxO, scale_O):
        lead = x_NxI.shape[:-1]
        x2d = x_NxI.reshape(-1, x_NxI.shape[-1]).astype(jnp.float32)
        out_type = jax.ShapeDtypeStruct((x2d.shape[0], q_IxO.shape[1]), jnp.float32)
        y = jax.ffi.ffi_call(target, out_type)(x2d, q_IxO.astype(jnp.int8), scale_O.astype(jnp.float32))
        return y.reshape(*lead, q_IxO.shape[1])

    @dense.def_vmap
    def _vmap(axis_size, in_batched, x, q, scale):
        """Batched activations fold into the rows of one call; batched weights run one call per weight."""
        if not (in_batched[1] or in_batched[2]):
            return dense(x, q, scale), True
        args = tuple(a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip((x, q, scale), in_batched))
        return jax.lax.map(lambda one: dense(*one), args), True

    return dense
