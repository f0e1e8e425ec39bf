"""int8 weights packed once into the native kernel's panel layout, for decoding (small M) without per-call packing.

A quantized Dense {kernel q (I, O) int8, scale (O,)} becomes {packed, comp, scale}:

  packed_PxQ  int8 (ceil(O / 16), ceil(I / 4) * 64): panel p, k-quad j, column c, k r at
              packed[p, 64 j + 4 c + r] = q[4 j + r, 16 p + c] (zero padded), one 64-byte vector per (panel, k-quad)
  comp_O16    int32 (16 * ceil(O / 16),): 128 * column sums of q, the correction of the AVX-512 path's unsigned
              activations (the AVX2 path reads the same panels and ignores it)

Both native paths (quant.kernel: avx512_vnni, avx2) read this one layout, so it is made once per process when a
quantized decoder is prepared for generation (``pack_params``), never per call; checkpoints keep the plain (I, O)
kernels. ``packed_dot`` is the Dense on it, w8a8 or w8 (weight-only: int8 converted to float in registers): the
native kernel on CPU, else XLA ops on the unpacked kernel.

The tied word embedding / LM head: ``int8.quantize_tied_embedding`` stores one int8 table q (V, D) with one scale
per row (vocab entry). The LM head is x @ q.T with per-output-channel scale = that row scale, so packing q.T gives the
head's panels. The embedding lookup reads the table's float16 copy ('lookup') where the params have one, else it
gathers int8 rows back out of the same panels (``packed_rows``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxfound.quant import int4, kernel
from jaxfound.quant.int8 import MODES, dequantize_kernel, w8a8_dot_xla

PANEL = 16  # output columns per panel
QUAD = 4  # k per 4-byte group


def pack_kernel(q_IxO) -> tuple[np.ndarray, np.ndarray]:
    """(packed, comp) of an int8 kernel q (I, O); see the module docstring for the layout."""
    q = np.asarray(q_IxO)
    if q.dtype != np.int8 or q.ndim != 2:
        raise ValueError(f"pack_kernel takes an int8 (in, out) kernel, got {q.dtype} {q.shape}")
    K, N = q.shape
    KQ, NP = -(-K // QUAD), -(-N // PANEL)
    padded = np.zeros((KQ * QUAD, NP * PANEL), np.int8)
    padded[:K, :N] = q
    packed = padded.reshape(KQ, QUAD, NP, PANEL).transpose(2, 0, 3, 1).reshape(NP, KQ * QUAD * PANEL)
    comp = 128 * padded.astype(np.int32).sum(axis=0)
    return np.ascontiguousarray(packed), comp.astype(np.int32)


def unpack_kernel(packed_PxQ, K: int, N: int):
    """The int8 kernel (K, N) back from its panels (jnp: XLA ops, for the non-CPU path and tests)."""
    NP, width = packed_PxQ.shape
    KQ = width // (QUAD * PANEL)
    q = jnp.asarray(packed_PxQ).reshape(NP, KQ, PANEL, QUAD).transpose(1, 3, 0, 2).reshape(KQ * QUAD, NP * PANEL)
    return q[:K, :N]


def packed_rows(packed_PxQ, ids, K: int):
    """Columns ``ids`` of the packed kernel as rows (..., K) int8: the tied table's rows for the embedding lookup."""
    NP, width = packed_PxQ.shape
    KQ = width // (QUAD * PANEL)
    panels = jnp.asarray(packed_PxQ).reshape(NP, KQ, PANEL, QUAD)
    rows = panels[ids // PANEL, :, ids % PANEL, :]  # advanced indices around a slice: (*ids.shape, KQ, QUAD)
    return rows.reshape(*ids.shape, KQ * QUAD)[..., :K]


def packed_dot_xla(x_NxI, packed, comp, scale_O, mode: str = "w8a8"):
    """``packed_dot`` with XLA ops: unpack, then int8.w8a8_dot_xla or a float dot (w8); comp is implied."""
    del comp
    q_IxO = unpack_kernel(packed, x_NxI.shape[-1], scale_O.shape[0])
    if mode == "w8":
        return jnp.dot(x_NxI.astype(jnp.float32), dequantize_kernel(q_IxO, scale_O), preferred_element_type=jnp.float32)
    return w8a8_dot_xla(x_NxI, q_IxO, scale_O)


def packed_dot(x_NxI, packed, comp, scale_O, mode: str = "w8a8"):
    """x (..., I) @ dequant(packed) in float32 (..., O): w8a8 (per-token int8 activations) or w8 (float32
    activations; the int8 weights become float in registers, never a float copy in memory)."""
    if mode not in MODES:
        raise ValueError(f"packed_dot: mode {mode!r}; allowed {', '.join(MODES)}")
    if kernel.available():
        native = kernel.w8_packed if mode == "w8" else kernel.w8a8_packed
        return lax.platform_dependent(x_NxI, packed, comp, scale_O, cpu=native,
                                      default=lambda *a: packed_dot_xla(*a, mode=mode))
    return packed_dot_xla(x_NxI, packed, comp, scale_O, mode)


def is_packed(node) -> bool:
    return isinstance(node, dict) and "packed" in node and "comp" in node


def _packable(node, key: str) -> bool:
    leaf = node.get(key)
    return "scale" in node and getattr(leaf, "dtype", None) == np.int8 and getattr(leaf, "ndim", 0) == 2


def pack_params(qparams) -> dict:
    """qparams with every int8 Dense kernel (and an int8 tied embedding table) packed: {packed, comp, scale, ...}.

    Float layers and everything else are returned as they are. Pure; numpy work, done once per params tree.
    """
    def walk(tree):
        if int4.is_w4(tree):  # 4-bit: one buffer of panels with their group scales and offsets (quant.int4.pack_w4)
            rest = {k: v for k, v in tree.items() if k not in ("kernel", "scale", "offset")}
            return {"w4_packed": int4.pack_w4(tree["kernel"], tree["scale"], tree["offset"]), **rest}
        if _packable(tree, "kernel"):
            packed, comp = pack_kernel(tree["kernel"])
            rest = {k: v for k, v in tree.items() if k != "kernel"}
            return {"packed": packed, "comp": comp, **rest}
        if _packable(tree, "embedding"):  # the tied table (V, D): the LM head's kernel is its transpose
            packed, comp = pack_kernel(np.asarray(tree["embedding"]).T)
            rest = {k: v for k, v in tree.items() if k != "embedding"}  # scale, and the float 'lookup' copy if any
            return {"packed": packed, "comp": comp, **rest}
        return {k: walk(v) if isinstance(v, dict) else v for k, v in tree.items()}

    return walk(qparams)


FUSED = {"qkv": ("query", "key", "value"), "gate_up": ("gate", "up")}  # siblings that read the same input


def _fusable(node) -> bool:
    if int4.is_w4(node):
        return set(node) <= {"kernel", "scale", "offset", "bias"}
    return (isinstance(node, dict) and set(node) <= {"kernel", "scale", "bias"} and "scale" in node
            and getattr(node.get("kernel"), "dtype", None) == np.int8 and np.ndim(node["kernel"]) == 2)


def fuse_projections(qparams) -> dict:
    """qparams with sibling int8 Denses that read one input (attention query / key / value -> 'qkv', MLP gate / up
    -> 'gate_up') concatenated along their outputs: one kernel call instead of three (two) per decode step, and a
    wider one, which streams its weights faster (a 576 x 576 int8 GEMV reads ~13 GB/s here, 576 x 4608 ~32 GB/s).
    Per-output-channel scales (int8) and per-(group, column) scales and offsets (w4) make the concatenation exact.
    Groups with an adapter or a float member stay apart.
    The model (models.llama) splits the fused outputs back; pure, numpy."""
    def walk(tree):
        out = {k: walk(v) if isinstance(v, dict) else v for k, v in tree.items()}
        for fused, parts in FUSED.items():
            nodes = [out.get(p) for p in parts]
            if not all(_fusable(n) for n in nodes) or len({frozenset(n) for n in nodes}) != 1:
                continue
            if len({(np.shape(n["kernel"])[0], np.shape(n["scale"])[0]) for n in nodes}) != 1:
                continue
            out[fused] = {k: np.concatenate([np.asarray(n[k]) for n in nodes], axis=-1) for k in nodes[0]}
            for p in parts:
                del out[p]
        return out

    return walk(qparams)


def for_decoding(params, mode: str, fuse: bool = False):
    """params as a decode step of a model with quant ``mode`` should read them: packed (``pack_params``) for w8, w8a8
    and w4 where the native kernels run (CPU backend, quant.kernel.available()), else unchanged. fuse: sibling
    projections concatenated first (``fuse_projections``; for models that read 'qkv' / 'gate_up': models.llama)."""
    if mode == "w4" and jax.default_backend() == "cpu" and kernel.w4_available():
        return pack_params(fuse_projections(params) if fuse else params)
    if mode in MODES and jax.default_backend() == "cpu" and kernel.available():
        return pack_params(fuse_projections(params) if fuse else params)
    return params
