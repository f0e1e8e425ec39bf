"""4-bit weights with per-group scales and offsets (w4), multiplied with per-token int8 activations (W4A8).

A kernel w (in, out) is cut into groups of G consecutive input rows (G = 32 by default, or 64); each (group, output
column) keeps a float16 scale s and offset o, and each weight a 4-bit u in [0, 15] with w ~= s * u + o (the
asymmetric min / max code of llama.cpp's Q4_1). Params of a w4 Dense:

  kernel  uint8 (in / 2, out): two weights per byte, row 2i in the low nibble, row 2i + 1 in the high one
  scale   float16 (in / G, out)
  offset  float16 (in / G, out)

The matmul quantizes each token's activations to int8 (as w8a8 does), forms exact int32 dots per group and
combines them in float32:  y[n] = x_scale * sum_g (s[g, n] * sum_{k in g} qx[k] u[k, n] + o[g, n] * sum_{k in g} qx[k]).
``w4_dot_xla`` is that with XLA ops (every backend); on an x86-64 CPU a decode step reads the weights packed once
(``pack_w4``: panels of 16 columns, each group's metadata beside its nibbles) through the native kernel
(quant.kernel: ``int4_dense.cc``, AVX-512 VNNI or AVX2), 5 bits per weight for G = 32 against int8's 8.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxfound.errors import JaxfoundError
from jaxfound.quant import kernel
from jaxfound.quant.int8 import DEFAULT_RULES, quantize, quantize_activations, quantize_kernel
from jaxfound.quant.int8 import dequantize as int8_dequantize

ALL_MODES = ("w8", "w8a8", "w4")  # model.quant / `jaxfound quantize --mode`: int8 (quant.int8) and 4-bit
GROUP = 32
GROUPS = (32, 64)
LEVELS = 15  # u in 0..15
REFINE = 4  # least-squares refinements of each group's (scale, offset) after min / max
PANEL = 16


def check_group(group: int) -> int:
    if group not in GROUPS:
        raise JaxfoundError(f"w4 group size {group}: allowed {', '.join(map(str, GROUPS))}")
    return group


def w4_fits(in_features: int, group: int) -> bool:
    """Whether a kernel with this many input rows can be stored as w4 groups (else it stays int8)."""
    return in_features % group == 0


def quantize_w4(w_IxO, group: int = GROUP) -> dict:
    """{kernel uint8 (I/2, O), scale float16 (I/G, O), offset float16 (I/G, O)} of a float kernel; see the module
    docstring. Each group starts from its min / max range, then alternates codes and a least-squares (scale, offset)
    for them, kept only while the squared error falls (what llama.cpp's k-quants do in spirit); the final codes are
    rounded against the float16 scale and offset that are stored. numpy; I must be a multiple of group."""
    w = np.asarray(w_IxO, np.float32)
    rows, cols = w.shape
    if not w4_fits(rows, check_group(group)):
        raise JaxfoundError(f"w4: a kernel with {rows} input rows does not split into groups of {group}")
    groups = w.reshape(rows // group, group, cols)
    lo, hi = groups.min(axis=1), groups.max(axis=1)
    s, o = (hi - lo) / LEVELS, lo
    for _ in range(REFINE):  # alternate: codes for (s, o), then (s, o) by least squares for the codes
        u = _codes(groups, s, o)
        n, su, sw = group, u.sum(axis=1), groups.sum(axis=1)
        suu, suw = (u * u).sum(axis=1), (u * groups).sum(axis=1)
        det = n * suu - su * su
        fit = det > 0
        s_new = np.where(fit, (n * suw - su * sw) / np.where(fit, det, 1), s)
        o_new = np.where(fit, (sw - s_new * su) / n, o)
        better = _error(groups, s_new, o_new) <= _error(groups, s, o)
        s, o = np.where(better, s_new, s), np.where(better, o_new, o)
    scale, offset = s.astype(np.float16), o.astype(np.float16)
    u = _codes(groups, scale.astype(np.float32), offset.astype(np.float32)).astype(np.uint8)
    u = u.reshape(rows, cols)
    return {"kernel": (u[0::2] | (u[1::2] << 4)).astype(np.uint8), "scale": scale, "offset": offset}


def _codes(groups_GxKxO, s_GxO, o_GxO):
    safe = np.where(s_GxO == 0, 1, s_GxO)
    return np.clip(np.rint((groups_GxKxO - o_GxO[:, None]) / safe[:, None]), 0, LEVELS).astype(np.float32)


def _error(groups_GxKxO, s_GxO, o_GxO):
    return np.square(_codes(groups_GxKxO, s_GxO, o_GxO) * s_GxO[:, None] + o_GxO[:, None] - groups_GxKxO).sum(axis=1)


def unpack_nibbles(kernel_HxO):
    """The 4-bit codes (I, O) uint8 of a w4 kernel (I / 2, O) (jnp: runs in XLA)."""
    k = jnp.asarray(kernel_HxO)
    lo, hi = k & 0x0F, k >> 4
    return jnp.stack([lo, hi], axis=1).reshape(2 * k.shape[0], k.shape[1])


def dequantize_w4(kernel_HxO, scale_GxO, offset_GxO, dtype=jnp.float32):
    u_IxO = unpack_nibbles(kernel_HxO).astype(jnp.float32)
    G = u_IxO.shape[0] // scale_GxO.shape[0]
    s = jnp.repeat(jnp.asarray(scale_GxO, jnp.float32), G, axis=0)
    o = jnp.repeat(jnp.asarray(offset_GxO, jnp.float32), G, axis=0)
    return (u_IxO * s + o).astype(dtype)


def w4_dot_xla(x_NxI, kernel_HxO, scale_GxO, offset_GxO):
    """x (..., I) @ the w4 kernel in float32 (..., O) with XLA ops: per-token int8 activations, exact int32 dots per
    group, combined with the group scales and offsets (the native kernel's numbers, up to float summation order)."""
    q_NxI, xs_N1 = quantize_activations(x_NxI)
    NG, cols = scale_GxO.shape
    lead, rows = q_NxI.shape[:-1], q_NxI.shape[-1]
    q_NxGxK = q_NxI.reshape(-1, NG, rows // NG)
    u_GxKxO = unpack_nibbles(kernel_HxO).astype(jnp.int8).reshape(NG, rows // NG, cols)
    dims = (((2,), (1,)), ((1,), (0,)))  # contract the group's k, batch over groups
    dot_GxNxO = lax.dot_general(q_NxGxK, u_GxKxO, dims, preferred_element_type=jnp.int32)
    sums_GxN = jnp.sum(q_NxGxK.astype(jnp.int32), axis=-1).T
    y_NxO = jnp.sum(dot_GxNxO.astype(jnp.float32) * jnp.asarray(scale_GxO, jnp.float32)[:, None]
                    + sums_GxN.astype(jnp.float32)[..., None] * jnp.asarray(offset_GxO, jnp.float32)[:, None], axis=0)
    return (y_NxO * xs_N1.reshape(-1, 1)).reshape(*lead, cols)


def w4_dot(x_NxI, kernel_HxO, scale_GxO, offset_GxO):
    """The w4 Dense on its stored params (XLA ops on every backend; decode steps read ``packed_w4_dot``)."""
    return w4_dot_xla(x_NxI, kernel_HxO, scale_GxO, offset_GxO)


def packed_w4_dot(x_NxI, packed_PxB, out_features: int):
    """x (..., I) @ a w4 kernel packed by ``pack_w4``, float32 (..., O): the native kernel on CPU where it builds, else
    XLA ops on the unpacked params."""
    G = packed_group(packed_PxB, x_NxI.shape[-1])

    def xla(x, packed):
        return w4_dot_xla(x, *unpack_w4(packed, x.shape[-1], out_features))

    if kernel.w4_available():
        native = lambda x, packed: kernel.w4a8_packed(x, packed, out_features, G)  # noqa: E731
        return lax.platform_dependent(x_NxI, packed_PxB, cpu=native, default=xla)
    return xla(x_NxI, packed_PxB)


def is_w4(node) -> bool:
    return (isinstance(node, dict) and getattr(node.get("kernel"), "dtype", None) == np.uint8
            and "scale" in node and "offset" in node)


def quantize_params_w4(params, rules=DEFAULT_RULES, group: int = GROUP):
    """Float params -> w4 qparams: the Dense kernels ``rules`` choose become w4 (kernel, scale, offset) where their
    input rows split into groups, int8 (kernel, scale: quant.int8) where they do not; the rest is unchanged."""
    check_group(group)

    def one(w):
        if w4_fits(np.shape(w)[0], group):
            return quantize_w4(w, group)
        q, scale = quantize_kernel(jnp.asarray(w))
        return {"kernel": np.asarray(q), "scale": np.asarray(scale)}

    return quantize(params, rules, one)


def pack_w4(kernel_HxO, scale_GxO, offset_GxO) -> np.ndarray:
    """The native kernel's layout (uint8 (ceil(O / 16), G_n * (64 + 8 G)), see int4_dense.cc) of a w4 Dense."""
    u = np.asarray(unpack_nibbles(np.asarray(kernel_HxO)))
    rows, cols = u.shape
    NG = np.shape(scale_GxO)[0]
    G, NP = rows // NG, -(-cols // PANEL)
    pad = NP * PANEL - cols
    u = np.pad(u, ((0, 0), (0, pad)))
    s = np.pad(np.asarray(scale_GxO, np.float16), ((0, 0), (0, pad)))
    o = np.pad(np.asarray(offset_GxO, np.float16), ((0, 0), (0, pad)))
    # codes as (panel, group, block, [quad 2b | quad 2b + 1], column, r)
    codes = u.reshape(NG, G // 8, 2, 4, NP, PANEL).transpose(4, 0, 1, 2, 5, 3)
    blocks = (codes[:, :, :, 0] | (codes[:, :, :, 1] << 4)).astype(np.uint8).reshape(NP, NG, G * 8)
    meta = np.concatenate([s.reshape(NG, NP, PANEL).transpose(1, 0, 2), o.reshape(NG, NP, PANEL).transpose(1, 0, 2)],
                          axis=-1).view(np.uint8)  # (NP, NG, 64)
    return np.ascontiguousarray(np.concatenate([meta, blocks], axis=-1).reshape(NP, NG * (64 + 8 * G)))


def packed_group(packed_PxB, in_features: int) -> int:
    """G of a packed w4 buffer of a kernel with in_features rows (its row holds in / G * (64 + 8 G) bytes)."""
    extra = packed_PxB.shape[1] - 8 * in_features
    if extra <= 0 or (64 * in_features) % extra:
        raise JaxfoundError(f"a packed w4 buffer of shape {packed_PxB.shape} does not fit {in_features} input rows")
    return 64 * in_features // extra


def unpack_w4(packed_PxB, in_features: int, out_features: int):
    """(kernel (I / 2, O), scale, offset) back from pack_w4's buffer (jnp: the non-native path, and tests)."""
    G = packed_group(packed_PxB, in_features)
    NP, NG = packed_PxB.shape[0], in_features // G
    rows = jnp.asarray(packed_PxB).reshape(NP, NG, 64 + 8 * G)
    meta = lax.bitcast_convert_type(rows[..., :64].reshape(NP, NG, 32, 2), jnp.float16)  # (NP, NG, 32)
    scale = meta[..., :PANEL].transpose(1, 0, 2).reshape(NG, NP * PANEL)[:, :out_features]
    offset = meta[..., PANEL:].transpose(1, 0, 2).reshape(NG, NP * PANEL)[:, :out_features]
    blocks = rows[..., 64:].reshape(NP, NG, G // 8, PANEL, 4)
    codes = jnp.stack([blocks & 0x0F, blocks >> 4], axis=3)  # (NP, NG, G/8, 2, PANEL, 4)
    u = codes.transpose(1, 2, 3, 5, 0, 4).reshape(in_features, NP * PANEL)[:, :out_features]
    return (u[0::2] | (u[1::2] << 4)).astype(jnp.uint8), scale, offset


def quantize_params(params, mode: str, rules=DEFAULT_RULES):
    """Float params quantized for ``mode``: w8 / w8a8 int8 kernels (quant.int8.quantize), w4 4-bit ones."""
    if mode not in ALL_MODES:
        raise JaxfoundError(f"quantize mode {mode!r}: allowed {', '.join(ALL_MODES)}")
    return quantize_params_w4(params, rules) if mode == "w4" else quantize(params, rules)


def dequantize(qparams, dtype=jnp.float32):
    """qparams -> float params: every 4-bit kernel (scale, offset dropped) and every int8 one (quant.int8.dequantize)
    becomes a ``dtype`` kernel."""
    def walk(tree):
        if is_w4(tree):
            rest = {k: v for k, v in tree.items() if k not in ("kernel", "scale", "offset")}
            return {"kernel": dequantize_w4(tree["kernel"], tree["scale"], tree["offset"], dtype), **rest}
        return {k: walk(v) if isinstance(v, dict) else v for k, v in tree.items()}

    return int8_dequantize(walk(nn.unbox(qparams)), dtype)
