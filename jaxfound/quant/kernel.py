"""The W8A8 Dense as a native CPU kernel (AVX-512 VNNI), built on first use and called through jax.ffi.

XLA:CPU's int8 x int8 -> int32 dot runs no faster than its float32 dot (benchmarks/int8_matmul.py), so w8a8
on CPU gained nothing from int8. ``int8_dense.cc`` is a small VNNI GEMM that also fuses the per-token
activation quantization and the rescale; it computes the same numbers as the XLA path in
``int8.quantized_dot`` (tests/test_quant_kernel.py compares them).

The shared library is compiled with the system C++ compiler into a cache directory ($JAXFOUND_CACHE, else
$XDG_CACHE_HOME/jaxfound, else ~/.cache/jaxfound) keyed by the source, the jaxlib version and the flags.
Where it cannot be used -- not x86-64 Linux, no AVX-512 VNNI, no compiler, a failed build, or
JAXFOUND_INT8_KERNEL=0 -- ``available()`` says why once (a warning) and w8a8 stays on the XLA path;
on GPU and TPU the XLA path is always used (``lax.platform_dependent``).
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
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_dense.cc")
TARGET = "jaxfound_w8a8_dense"
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
         "-mavx512vnni"]
NEEDED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")


def cache_dir() -> Path:
    if os.environ.get("JAXFOUND_CACHE"):
        return Path(os.environ["JAXFOUND_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxfound"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _why_unavailable() -> str | None:
    if os.environ.get("JAXFOUND_INT8_KERNEL", "1") == "0":
        return "disabled by JAXFOUND_INT8_KERNEL=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"built for x86-64 Linux only (this is {platform.system()} {platform.machine()})"
    missing = [f for f in NEEDED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if not _compiler():
        return "no C++ compiler found (set $CXX or install g++)"
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def build() -> Path:
    """Compile int8_dense.cc (once per source / jaxlib / flags) and return the shared library's path."""

    cxx = _compiler()
    key = hashlib.sha256(
        SOURCE.read_bytes() + jaxlib.__version__.encode() + " ".join(FLAGS).encode() + str(cxx).encode()
    ).hexdigest()[:16]
    lib = cache_dir() / "kernels" / f"int8_dense-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
        log.info("building the int8 VNNI kernel: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, lib)  # atomic: concurrent builders race harmlessly
    return lib


@functools.cache
def available() -> bool:
    """True when the VNNI kernel is built and registered with XLA:CPU (the first call builds it)."""
    reason = _why_unavailable()
    if reason is None:
        try:
            lib = ctypes.cdll.LoadLibrary(str(build()))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxfoundW8A8Dense), platform="cpu")
        except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:
            reason = f"could not build or load it: {e}"
    if reason is not None:
        log.warning("int8 w8a8 on CPU uses XLA's int8 dot, not the VNNI kernel: %s", reason)
        return False
    return True


@jax.custom_batching.custom_vmap
def w8a8_dense(x_NxI, q_IxO, scale_O):
    """The VNNI kernel: x (..., I) float32 -> (..., O) float32; CPU only, ``available()`` must be True."""
    lead = x_NxI.shape[:-1]
    x2d = x_NxI.reshape(-1, x_NxI.shape[-1]).astype(jnp.float32)
    out_type = jax.ShapeDtypeStruct((x2d.shape[0], q_IxO.shape[1]), jnp.float32)
    y = jax.ffi.ffi_call(TARGET, out_type)(x2d, q_IxO.astype(jnp.int8), scale_O.astype(jnp.float32))
    return y.reshape(*lead, q_IxO.shape[1])


@w8a8_dense.def_vmap
def _w8a8_dense_vmap(axis_size, in_batched, x, q, scale):
    """Batched activations fold into the rows of one call; batched weights run one call per weight."""
    x_batched, q_batched, scale_batched = in_batched
    if not (q_batched or scale_batched):
        return w8a8_dense(x, q, scale), True
    x, q, scale = (a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip((x, q, scale), in_batched))
    return jax.lax.map(lambda args: w8a8_dense(*args), (x, q, scale)), True
