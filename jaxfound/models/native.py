"""Native CPU kernels of the model layer, built on first use and called through jax.ffi.

``decode_attention.cc``: one decode step's attention over the KV cache (write the new keys and values in place,
attend over the visible slots only), for x86-64 CPUs with AVX2 and FMA. ``models.cache.update_and_attend`` uses it
on the CPU backend for float32 caches outside multi-device meshes; everywhere else (GPU, TPU, bfloat16 caches, a
sharded cache, $JAXFOUND_DECODE_ATTENTION=0, or a machine where the build fails -- said once, as a warning) the
same step runs as XLA ops. tests/test_decode_attention.py checks the two against each other.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxfound.quant.kernel import compile_library, compiler, cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.cc")
FLAGS = ("-mavx2", "-mfma")
CPU_FLAGS = ("avx2", "fma")
TARGET = "jaxfound_decode_attention"
ENV = "JAXFOUND_DECODE_ATTENTION"  # 0: always XLA ops


def why_unavailable() -> str | None:
    if os.environ.get(ENV, "1").strip() == "0":
        return f"disabled by {ENV}=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"built for x86-64 Linux only (this is {platform.system()} {platform.machine()})"
    missing = [f for f in CPU_FLAGS if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if not compiler():
        return "no C++ compiler found (set $CXX or install g++)"
    return None


@functools.cache
def available() -> bool:
    """True when the decode attention kernel is built and registered here (the first call builds it)."""
    reason = why_unavailable()
    if reason is None:
        try:
            lib = ctypes.cdll.LoadLibrary(str(compile_library(SOURCE, FLAGS, "decode attention kernel")))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxfoundDecodeAttention), platform="cpu")
            return True
        except (OSError, AttributeError, RuntimeError) as e:
            reason = str(e)
    log.warning("decode attention on CPU uses XLA ops, not the native kernel: %s", reason)
    return False


def decode_attention(q_BxQxNxH, k_new_BxQxKxH, v_new_BxQxKxH, k_BxKxSxH, v_BxKxSxH, index_B, window: int = 0):
    """(out (B, Q, N, H), k cache, v cache): the new keys and values written at each row's index (in place when the
    caches are donated), then causal grouped-query attention over the visible slots; float32; CPU only."""
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    out_types = (jax.ShapeDtypeStruct(q_BxQxNxH.shape, jnp.float32),
                 jax.ShapeDtypeStruct(k_BxKxSxH.shape, jnp.float32),
                 jax.ShapeDtypeStruct(v_BxKxSxH.shape, jnp.float32))
    call = jax.ffi.ffi_call(TARGET, out_types, input_output_aliases={3: 1, 4: 2})
    return call(f32(q_BxQxNxH), f32(k_new_BxQxKxH), f32(v_new_BxQxKxH), f32(k_BxKxSxH), f32(v_BxKxSxH),
                index_B.astype(jnp.int32), window=np.int64(window))
