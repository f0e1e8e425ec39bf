"""Scaled dot-product attention behind one function, with a kernel per backend (``model.attention``):

    xla          the einsum form below: fastest on XLA:CPU, runs everywhere; full L x L float32 logits
    dot_product  jax.nn.dot_product_attention, XLA implementation (the library's reference form)
    cudnn        jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's fused flash attention (GPU,
                 bf16 / fp16 inputs; float32 inputs take the XLA implementation, which cuDNN does not cover)
    splash       the Pallas splash-attention kernel (TPU; block-sparse over the causal / sliding-window mask,
                 padding and packed documents as segment ids), under shard_map on the activation mesh
    auto         xla on CPU, cudnn on GPU, splash on TPU: chosen when the step is lowered for its platform
                 (``lax.platform_dependent``), so one traced model serves all three

Every form computes softmax(q k^T / sqrt(H) + mask) v with the same masks: padding keys, packed documents (segment
ids; 0 is padding), causal, a sliding window; grouped-query attention (K < N key/value heads, query head n reads
head n // (N / K)). Callers give the mask twice: dense (``mask``, bool, broadcastable to (B, 1, Q, L)) for the XLA
forms, and structured (``segment_ids_BxL``, ``causal``, ``window``) for splash, which needs a static block mask
(segment ids not given are read off the dense mask: ``segments_from_mask``).
Splash applies where its tiling does (self-attention, Q = L a multiple of 128); other shapes take the XLA form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from jaxfound.sharding import current_activation_mesh

IMPLEMENTATIONS = ("auto", "xla", "dot_product", "cudnn", "splash")
SPLASH_BLOCK = 128  # sequence tiling unit of the splash kernel
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention(q_BxQxNxH, k_BxLxKxH, v_BxLxKxH, mask=None, causal: bool = False, *, impl: str = "xla",
              segment_ids_BxL=None, window: int = 0, interpret: bool = False):
    """softmax(q k^T / sqrt(H), masked) v per head -> (B, Q, N, H) with the kernel ``impl`` (see the module doc).

    mask: bool, broadcastable to (B, 1, Q, L), or None; causal: also mask keys after the query (Q == L);
    segment_ids_BxL (int, 0 = padding) and window (> 0: a query sees the last `window` keys): the same mask in
    the structured form splash needs. interpret: run splash in Pallas' interpreter (CPU tests).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    args = (q_BxQxNxH, k_BxLxKxH, v_BxLxKxH)
    xla = functools.partial(xla_attention, mask=mask, causal=causal)
    if impl == "xla":
        return xla(*args)
    if impl == "dot_product":
        return dot_product_attention(*args, mask=mask, causal=causal, implementation=None)
    if impl == "cudnn":
        return dot_product_attention(*args, mask=mask, causal=causal, implementation="cudnn")
    if segment_ids_BxL is None and mask is not None:
        segment_ids_BxL = segments_from_mask(mask, q_BxQxNxH.shape[0], k_BxLxKxH.shape[1])
    splash = functools.partial(splash_attention, segment_ids_BxL=segment_ids_BxL, causal=causal, window=window,
                               interpret=interpret, fallback=xla)
    if impl == "splash":
        return splash(*args)
    cudnn = functools.partial(dot_product_attention, mask=mask, causal=causal, implementation="cudnn", strict=False)
    return lax.platform_dependent(*args, cpu=xla, cuda=cudnn, tpu=splash, default=xla)


def xla_attention(q_BxQxNxH, k_BxLxKxH, v_BxLxKxH, mask=None, causal: bool = False):
    """jax.nn.dot_product_attention's XLA path, written out.

    Grouped-query attention without copying the keys. Logits and softmax in float32 whatever the compute dtype;
    masked logits get a large negative value (rows that mask every key are the caller's to avoid). The scale is
    applied to q (Q x H) rather than to the logits (Q x L). Written out because XLA:CPU runs this form faster
    than the library's grouped-query vmap (same math).
    """
    B, Q, N, H = q_BxQxNxH.shape
    K = k_BxLxKxH.shape[2]
    q_BxQxNxH = q_BxQxNxH * jnp.asarray(H ** -0.5, q_BxQxNxH.dtype)
    if causal:
        L = k_BxLxKxH.shape[1]
        tril_QxL = jnp.tril(jnp.ones((Q, L), bool))
        mask = tril_QxL if mask is None else mask & tril_QxL
    neg = jnp.float32(_NEG)
    if K == N:
        logits_BxNxQxL = jnp.einsum("bqnh,blnh->bnql", q_BxQxNxH, k_BxLxKxH, preferred_element_type=jnp.float32)
        if mask is not None:
            logits_BxNxQxL = jnp.where(mask, logits_BxNxQxL, neg)
        probs_BxNxQxL = jax.nn.softmax(logits_BxNxQxL, axis=-1).astype(v_BxLxKxH.dtype)
        return jnp.einsum("bnql,blnh->bqnh", probs_BxNxQxL, v_BxLxKxH)
    q_BxQxKxGxH = q_BxQxNxH.reshape(B, Q, K, N // K, H)
    logits = jnp.einsum("bqkgh,blkh->bkgql", q_BxQxKxGxH, k_BxLxKxH, preferred_element_type=jnp.float32)
    if mask is not None:
        mask = mask[:, :, None] if mask.ndim == 4 else mask  # (B, 1, Q|1, L) -> (B, 1, 1, Q|1, L)
        logits = jnp.where(mask, logits, neg)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxLxKxH.dtype)
    return jnp.einsum("bkgql,blkh->bqkgh", probs, v_BxLxKxH).reshape(B, Q, N, H)


def dot_product_attention(q_BxQxNxH, k_BxLxKxH, v_BxLxKxH, mask=None, causal: bool = False,
                          implementation: str | None = None, strict: bool = True):
    """jax.nn.dot_product_attention (GQA native); cuDNN only takes bf16 / fp16, so float32 stays on XLA.

    strict=False (the 'auto' GPU branch, traced on every platform though lowered only on GPU): where cuDNN is not
    there to trace against, the XLA implementation stands in; strict: the caller asked for cuDNN, so say it is
    missing."""
    if implementation == "cudnn" and q_BxQxNxH.dtype not in (jnp.bfloat16, jnp.float16):
        implementation = None
    if mask is not None:
        mask = jnp.broadcast_to(mask, (q_BxQxNxH.shape[0], 1, q_BxQxNxH.shape[1], k_BxLxKxH.shape[1]))
    call = functools.partial(jax.nn.dot_product_attention, q_BxQxNxH, k_BxLxKxH, v_BxLxKxH, mask=mask,
                             is_causal=causal)
    if implementation != "cudnn":
        return call(implementation=implementation)
    try:
        return call(implementation="cudnn")
    except (RuntimeError, ValueError, NotImplementedError) as e:
        if strict:
            raise ValueError(f"model.attention=cudnn: {e} (it needs a CUDA GPU with cuDNN; use 'auto' or 'xla' "
                             "elsewhere)") from None
        return call(implementation=None)


def segments_from_mask(mask, B: int, L: int):
    """Segment ids (B, L) (0 = padding) equivalent to a self-attention mask of padding and contiguous packed
    documents (with or without causal / a window of >= 2): a key-padding mask (B, 1, 1, L) is its own segment ids;
    in a full (B, 1, L, L) mask, token j is real when it sees itself and starts a document when it cannot see j - 1.
    Only which tokens share a segment matters, so the numbering is free."""
    if mask.shape[-2] == 1:
        return jnp.broadcast_to(mask[:, 0, 0, :], (B, L)).astype(jnp.int32)
    j = jnp.arange(L)
    real_BxL = mask[:, 0, j, j]
    sees_previous_BxL = jnp.concatenate([jnp.zeros_like(real_BxL[:, :1]), mask[:, 0, j[1:], j[1:] - 1]], axis=1)
    starts = real_BxL & ~sees_previous_BxL
    return jnp.broadcast_to(jnp.cumsum(starts, axis=1) * real_BxL, (B, L)).astype(jnp.int32)


def splash_applies(q_BxQxNxH, k_BxLxKxH) -> bool:
    Q, L = q_BxQxNxH.shape[1], k_BxLxKxH.shape[1]
    return Q == L and L % SPLASH_BLOCK == 0


def _splash_kernel(L: int, N: int, K: int, causal: bool, window: int, interpret: bool):
    if window:
        one = sm.LocalMask((L, L), window_size=(window - 1, 0 if causal else window - 1), offset=0)
    elif causal:
        one = sm.CausalMask((L, L))
    else:
        one = sm.FullMask((L, L))
    heads = N if K == N else N // K  # grouped-query: one MQA kernel per key/value head
    block = min(512, L) if L % 512 == 0 else SPLASH_BLOCK
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([one] * heads)
    make = sk.make_splash_mha if K == N else sk.make_splash_mqa
    return make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret), sk.SegmentIds


def splash_attention(q_BxQxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL=None, causal: bool = False, window: int = 0,
                     interpret: bool = False, fallback=None):
    """The Pallas splash kernel per example (and per key/value head for GQA), sharded like the activations:
    batch over (data, fsdp), heads over tensor, by shard_map on the mesh of ``sharding.activation_sharding``."""
    if not splash_applies(q_BxQxNxH, k_BxLxKxH):
        return (fallback or xla_attention)(q_BxQxNxH, k_BxLxKxH, v_BxLxKxH)
    B, L, N, H = q_BxQxNxH.shape
    K = k_BxLxKxH.shape[2]
    if segment_ids_BxL is None:
        segment_ids_BxL = jnp.ones((B, L), jnp.int32)
    scale = jnp.asarray(H ** -0.5, q_BxQxNxH.dtype)

    def local(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg_BxL):
        n, kv = q_BxLxNxH.shape[2], k_BxLxKxH.shape[2]
        kernel, segment_ids = _splash_kernel(L, n, kv, causal, window, interpret)
        q = jnp.swapaxes(q_BxLxNxH * scale, 1, 2)  # (B, N, L, H)
        k, v = jnp.swapaxes(k_BxLxKxH, 1, 2), jnp.swapaxes(v_BxLxKxH, 1, 2)  # (B, K, L, H)
        seg = segment_ids(q=seg_BxL, kv=seg_BxL)
        if kv == n:
            out = jax.vmap(lambda q1, k1, v1, s: kernel(q1, k1, v1, segment_ids=s))(q, k, v, seg)
        else:  # (B, K, G, L, H): each key/value head serves its group of query heads
            q = q.reshape(q.shape[0], kv, n // kv, L, H)
            per_head = jax.vmap(lambda qg, k1, v1, s: kernel(qg, k1, v1, segment_ids=s), in_axes=(0, 0, 0, None))
            out = jax.vmap(per_head)(q, k, v, seg).reshape(q.shape[0], n, L, H)
        return jnp.swapaxes(out, 1, 2).astype(v_BxLxKxH.dtype)

    mesh = current_activation_mesh()
    if mesh is None or mesh.size == 1:
        return local(q_BxQxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)
    batch = ("data", "fsdp")
    heads = "tensor" if N % mesh.shape["tensor"] == 0 and K % mesh.shape["tensor"] == 0 else None
    act = P(batch, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(act, act, act, P(batch, None)), out_specs=act,
                         check_vma=False)(q_BxQxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)
