"""int8 weights packed once for decoding (quant/packed.py) and the tied int8 word table: every native path on packed
weights equals an integer reference exactly on every tail (both ISA families on an AVX-512 machine), the layout
round-trips, the tied table serves lookup and head, packed decoding equals the unpacked model, checkpoints /1 and /2."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfound.config import ModelConfig
from jaxfound.generation import decoding_params, generate
from jaxfound.models import build_model
from jaxfound.quant import kernel
from jaxfound.quant.checkpoint import META_FILE, flatten, load_quantized, save_quantized
from jaxfound.quant.int8 import (
    dequantize,
    dequantize_kernel,
    quantize,
    quantize_kernel,
    quantize_tied_embedding,
    w8a8_dot_xla,
)
from jaxfound.quant.packed import (
    fuse_projections,
    pack_kernel,
    pack_params,
    packed_dot,
    packed_dot_xla,
    packed_rows,
    unpack_kernel,
)
from jaxfound.quant.report import size_report


@pytest.fixture(params=[(path, mode) for path in kernel.PATHS for mode in ("w8a8", "w8")], ids="-".join)
def packed_dense(request):
    """The packed dense of one kernel path and mode (on an AVX-512 machine both paths run; a path the CPU lacks is
    skipped). With integer activations whose row absmax is 127 and scales 1, w8a8 and w8 compute the same integers."""
    path, mode = request.param
    reason = kernel.why_unsupported(path)
    if reason:
        pytest.skip(f"{path} kernel: {reason}")
    return jax.jit(kernel.load_packed(path, mode))


# M = 1..16 (the decode tiles: 4 x 4 panels, AVX2 3 rows) and prefill-sized M (96-row blocks); K not a multiple of
# 4, N not of the 16-column panels or 64-column tiles; 49 x 70 x 130 splits into uneven column chunks
SHAPES = [(1, 1, 1), (1, 33, 17), (2, 64, 64), (3, 7, 40), (4, 5, 100), (5, 100, 33), (7, 31, 65), (8, 576, 192),
          (11, 9, 130), (13, 99, 1541), (16, 130, 48), (97, 31, 9), (200, 99, 70)]


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_packed_kernel_equals_integer_reference_exactly(packed_dense, M, K, N):
    rng = np.random.default_rng(M * 1000 + K + N)
    qx = rng.integers(-127, 128, (M, K)).astype(np.int32)
    qx[:, rng.integers(0, K)] = 127  # activation scale 1: qx = x
    qw = rng.integers(-127, 128, (K, N)).astype(np.int8)
    packed, comp = pack_kernel(qw)
    got = np.asarray(packed_dense(jnp.asarray(qx, jnp.float32), packed, comp, jnp.ones(N)))
    np.testing.assert_array_equal(got, (qx @ qw.astype(np.int32)).astype(np.float32))


def test_packed_kernel_extremes_do_not_overflow(packed_dense):
    for value in (-127.0, 127.0):
        x = np.full((2, 1024), value, np.float32)
        packed, comp = pack_kernel(np.full((1024, 20), -127, np.int8))
        got = np.asarray(packed_dense(jnp.asarray(x), packed, comp, jnp.ones(20)))
        np.testing.assert_array_equal(got, np.float32(-value * 127 * 1024))


@pytest.mark.parametrize("mode", ["w8a8", "w8"])
def test_packed_dot_equals_the_unpacked_xla_path_on_real_scales(mode):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3, 96)).astype(np.float32)).at[0, 0].set(0.0)  # an all-zero token
    q, s = quantize_kernel(jnp.asarray(rng.standard_normal((96, 40)).astype(np.float32)))
    packed, comp = pack_kernel(q)
    got = np.asarray(jax.jit(packed_dot, static_argnums=4)(x, packed, comp, s, mode))  # native where it runs
    ref = np.asarray(w8a8_dot_xla(x, q, s) if mode == "w8a8" else jnp.dot(x, dequantize_kernel(q, s)))
    assert got.shape == (2, 3, 40)
    np.testing.assert_array_equal(got[0, 0], 0.0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(packed_dot_xla(x, packed, comp, s, mode)), ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max())


def test_layout_round_trips_and_rows_gather_columns():
    q = np.random.default_rng(0).integers(-127, 128, (37, 50)).astype(np.int8)
    packed, comp = pack_kernel(q)
    assert packed.shape == (4, 10 * 64) and comp.shape == (64,)
    np.testing.assert_array_equal(np.asarray(unpack_kernel(packed, 37, 50)), q)
    np.testing.assert_array_equal(comp[:50], 128 * q.astype(np.int32).sum(0))
    np.testing.assert_array_equal(comp[50:], 0)
    ids = jnp.asarray([[0, 49], [17, 16]])
    np.testing.assert_array_equal(np.asarray(packed_rows(packed, ids, 37)), q.T[np.asarray(ids)])


@pytest.fixture(scope="module")
def tied_llama():
    cfg = ModelConfig(arch="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position=64, tie_embeddings=True, dropout=0.0)
    model = build_model(cfg, "lm")
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    qparams = quantize_tied_embedding(quantize(params), "llama")
    return cfg, model, params, qparams


def _without_lookup(qparams):
    word = {k: v for k, v in qparams["llama"]["word"].items() if k != "lookup"}
    return {**qparams, "llama": {**qparams["llama"], "word": word}}


def test_tied_table_is_int8_rows_serving_lookup_and_head(tied_llama):
    cfg, model, params, qparams = tied_llama
    word = qparams["llama"]["word"]
    table = np.asarray(params["llama"]["word"]["embedding"])
    assert word["embedding"].dtype == jnp.int8 and word["embedding"].shape == (101, 64)
    assert word["scale"].shape == (101,)
    deq = np.asarray(word["embedding"], np.float32) * np.asarray(word["scale"])[:, None]
    assert np.all(np.abs(deq - table) <= np.asarray(word["scale"])[:, None] / 2 + 1e-7)  # per row: half a step
    np.testing.assert_allclose(np.asarray(dequantize(qparams)["llama"]["word"]["embedding"]), deq, rtol=1e-6)
    assert word["lookup"].dtype == jnp.float16  # the lookup's copy: float16 rounding of the float table
    np.testing.assert_array_equal(np.asarray(word["lookup"]), table.astype(np.float16))
    # without the lookup copy (earlier files) the int8 model's logits equal those of its float twin (the same int8
    # weights dequantized): w8 to float rounding, w8a8 within its activation-rounding bound; packed (native kernel
    # on CPU) = unpacked (XLA ops)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 101, (2, 9)), jnp.int32)
    ref = np.asarray(jax.jit(model.apply)({"params": dequantize(qparams)}, ids))
    # with it, they equal those of an untied float twin: word table = the float16 copy, lm_head = the int8 head
    untied = build_model(dataclasses.replace(cfg, tie_embeddings=False), "lm")
    twin = dequantize(qparams)
    twin = {**twin, "llama": {**twin["llama"], "word": {"embedding": np.asarray(word["lookup"], np.float32)}},
            "lm_head": {"kernel": deq.T}}
    ref_lookup = np.asarray(jax.jit(untied.apply)({"params": twin}, ids))
    for mode, bound in (("w8", 1e-5), ("w8a8", 0.04)):
        apply_q = jax.jit(build_model(dataclasses.replace(cfg, quant=mode), "lm").apply)
        for q, r in ((_without_lookup(qparams), ref), (qparams, ref_lookup)):
            got = np.asarray(apply_q({"params": q}, ids))
            assert np.sqrt(np.mean((got - r) ** 2)) <= bound * np.sqrt(np.mean(r ** 2))
            packed = np.asarray(apply_q({"params": pack_params(q)}, ids))
            np.testing.assert_allclose(packed, got, rtol=1e-5, atol=1e-5 * np.abs(got).max())
    report = size_report(params, qparams)
    assert report["quantized_layers"] == 2 * 5 + 1  # block Denses but key / value (32 outputs < 64), the tied table
    dense = sum(v.size for p, v in flatten(params).items() if p.endswith("kernel") and
                flatten(qparams)[p].dtype == np.int8)
    outs = sum(flatten(params)[p].shape[1] for p in flatten(qparams) if p.endswith("kernel") and
               flatten(qparams)[p].dtype == np.int8)
    # int8 kernels + float32 scales; the table: int8 rows + a float32 scale per row + its float16 copy
    assert report["quantized_bytes_after"] == dense + 4 * outs + 101 * 64 * (1 + 2) + 4 * 101
    assert report["quantized_bytes_before"] == 4 * (dense + 101 * 64)


def test_packed_decoding_follows_its_own_full_forward(tied_llama):
    cfg, _, _, qparams = tied_llama
    qmodel = build_model(dataclasses.replace(cfg, quant="w8a8"), "lm")
    ready = decoding_params(qmodel, qparams)
    assert ("packed" in ready["llama"]["word"]) == (jax.default_backend() == "cpu" and kernel.available())
    assert decoding_params(qmodel, qparams) is ready  # packed once per params tree
    prompt = [3, 5, 7, 9, 11]
    out = generate(qmodel, qparams, [prompt], max_new_tokens=5).tokens[0]
    # greedy decoding over the KV cache = the argmax of one causal forward pass over prompt + output, position by
    # position (the last token's logits are not needed)
    logits = np.asarray(jax.jit(qmodel.apply)({"params": ready}, jnp.asarray([prompt + out[:-1]], jnp.int32)))
    assert np.argmax(logits[0, len(prompt) - 1:], axis=-1).tolist() == out


@pytest.mark.parametrize("mode", ["w8", "w8a8"])
def test_fused_projections_equal_the_separate_ones(mode):
    # Qwen2-style q / k / v biases; k / v wide enough (64 outputs) for the default rules to quantize them
    cfg = ModelConfig(arch="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=4, max_position=64, tie_embeddings=True, dropout=0.0, attention_bias=True)
    params = nn.unbox(jax.jit(build_model(cfg, "lm").init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])
    params = jax.tree.map(lambda x: x + 0.01 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) / x.size, params)
    qparams = quantize_tied_embedding(quantize(params), "llama")
    fused = fuse_projections(qparams)
    for i in range(2):
        attention, mlp = fused["llama"][f"layer_{i}"]["attention"], fused["llama"][f"layer_{i}"]["mlp"]
        assert sorted(attention) == ["out", "qkv"] and sorted(mlp) == ["down", "gate_up"]
        separate = qparams["llama"][f"layer_{i}"]["attention"]
        np.testing.assert_array_equal(attention["qkv"]["kernel"], np.concatenate(
            [separate[k]["kernel"] for k in ("query", "key", "value")], axis=1))
        np.testing.assert_array_equal(attention["qkv"]["bias"], np.concatenate(
            [separate[k]["bias"] for k in ("query", "key", "value")]))
    # a group with a float member stays apart
    half = {**qparams, "llama": {**qparams["llama"], "layer_0": {**qparams["llama"]["layer_0"], "attention": {
        **qparams["llama"]["layer_0"]["attention"], "value": params["llama"]["layer_0"]["attention"]["value"]}}}}
    assert "qkv" not in fuse_projections(half)["llama"]["layer_0"]["attention"]
    qmodel = build_model(dataclasses.replace(cfg, quant=mode), "lm")
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 7)), jnp.int32)
    apply = jax.jit(qmodel.apply)
    want = np.asarray(apply({"params": qparams}, ids))
    for tree in (fused, pack_params(fused)):  # XLA ops and, on CPU, the native kernel on the packed form
        np.testing.assert_allclose(np.asarray(apply({"params": tree}, ids)), want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())
    ready = decoding_params(qmodel, qparams)
    assert ("qkv" in ready["llama"]["layer_1"]["attention"]) == (jax.default_backend() == "cpu" and kernel.available())


def test_checkpoint_keeps_the_int8_table_and_reads_version_1(tied_llama, tmp_path):
    _, _, _, qparams = tied_llama
    save_quantized(tmp_path / "v2", qparams, {"mode": "w8a8"})
    loaded, meta = load_quantized(tmp_path / "v2")
    assert loaded["llama"]["word"]["embedding"].dtype == np.int8 and meta == {"mode": "w8a8"}
    np.testing.assert_array_equal(loaded["llama"]["word"]["scale"], np.asarray(qparams["llama"]["word"]["scale"]))
    assert loaded["llama"]["word"]["lookup"].dtype == np.float16
    # a /1 file (int8 Dense kernels only, float table) still reads
    v1 = quantize(dequantize(qparams))
    save_quantized(tmp_path / "v1", v1, {"mode": "w8"})
    meta_path = tmp_path / "v1" / META_FILE
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format": "jaxfound-int8/1"}))
    loaded, meta = load_quantized(tmp_path / "v1")
    assert meta == {"mode": "w8"} and loaded["llama"]["word"]["embedding"].dtype == np.float32
