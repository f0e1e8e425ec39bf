"""int8 quantization: kernel rounding, exact int8 matmul, the W8A8 error bound, BERT logits, checkpoints."""

import dataclasses

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxfound.config import ModelConfig
from jaxfound.errors import JaxfoundError
from jaxfound.models import build_model
from jaxfound.quant import (
    Rule,
    dequantize,
    int8_matmul,
    load_quantized,
    quantize,
    quantize_activations,
    quantize_kernel,
    quantize_plan,
    quantized_dot,
    save_quantized,
    size_report,
)
from jaxfound.quant.checkpoint import PARAMS_FILE, flatten

CFG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256, num_labels=5,
                  dropout=0.0)
IDS = np.random.default_rng(0).integers(0, 128, (4, 12))
EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def float_params():
    params = build_model(CFG, "token_cls").init(jax.random.key(0), IDS)["params"]
    params = nn.unbox(params)
    # trained-like spread: scale each kernel so that logits are not vanishingly small at init
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * 3.0 if p[-1].key == "kernel" else x, params)


def apply(params, quant="none", head="token_cls"):
    model = build_model(dataclasses.replace(CFG, quant=quant), head)
    return np.asarray(jax.jit(model.apply)({"params": params}, IDS))


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=24), elements=finite))
def test_kernel_round_trip_error_is_at_most_half_a_step(w):
    q, scale = quantize_kernel(jnp.asarray(w))
    q, scale = np.asarray(q), np.asarray(scale)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (w.shape[1],)
    assert np.abs(q).max() <= 127
    # q = round(w / s): |w - q s| <= s/2, plus float32 rounding of w / s and q * s (a few ulp of |w|)
    err = np.abs(w - q.astype(np.float32) * scale)
    assert np.all(err <= scale / 2 * (1 + 4 * EPS) + 4 * EPS * np.abs(w))


def test_int8_matmul_equals_integer_reference_exactly():
    rng = np.random.default_rng(1)
    a = rng.integers(-127, 128, (3, 17, 301), dtype=np.int8)  # leading batch dims, odd contraction length
    b = rng.integers(-127, 128, (301, 45), dtype=np.int8)
    got = np.asarray(int8_matmul(jnp.asarray(a), jnp.asarray(b)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, a.astype(np.int32) @ b.astype(np.int32))


def test_int8_matmul_extremes_do_not_overflow():
    a = np.full((2, 4096), -127, np.int8)
    b = np.full((4096, 3), -127, np.int8)
    np.testing.assert_array_equal(np.asarray(int8_matmul(jnp.asarray(a), jnp.asarray(b))), 127 * 127 * 4096)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.integers(1, 96), st.integers(1, 16), st.integers(0, 2**31 - 1), st.booleans())
def test_w8a8_dot_error_within_rounding_bound(tokens, inputs, outputs, seed, outliers):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, tokens, inputs)).astype(np.float32)
    if outliers:  # a few large activations, as after LayerNorm in trained transformers
        x[..., rng.integers(0, inputs)] *= 40
    w = (rng.standard_normal((inputs, outputs)) * 0.05).astype(np.float32)
    q, sw = quantize_kernel(jnp.asarray(w))
    _, sx = quantize_activations(jnp.asarray(x))
    got = np.asarray(quantized_dot(jnp.asarray(x), q, sw, "w8a8"))
    ref = x.astype(np.float64) @ w.astype(np.float64)
    # x = qx sx + ex, w = qw sw + ew with |ex| <= sx/2, |ew| <= sw/2, so per output o
    # |x.w - (qx sx).(qw sw)| = |sum_i x_i ew_i + w_i ex_i - ex_i ew_i| <= sum_i |x_i| sw/2 + |w_i| sx/2 + sx sw/4;
    # the int32 product is exact and the rescale adds a few float32 ulp of sum_i |x_i w_i|.
    sx, sw = np.asarray(sx, np.float64), np.asarray(sw, np.float64)
    ax, aw = np.abs(x).astype(np.float64), np.abs(w).astype(np.float64)
    bound = (ax.sum(-1, keepdims=True) * sw / 2 + sx / 2 * aw.sum(0) + inputs * sx * sw / 4
             + 8 * EPS * (ax @ aw) + 1e-30)
    assert np.all(np.abs(got - ref) <= bound)


def test_w8_dot_equals_float_dot_with_dequantized_kernel():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 40)).astype(np.float32)
    q, s = quantize_kernel(jnp.asarray(rng.standard_normal((40, 7)).astype(np.float32)))
    ref = x.astype(np.float64) @ (np.asarray(q, np.float64) * np.asarray(s, np.float64))
    np.testing.assert_allclose(np.asarray(quantized_dot(jnp.asarray(x), q, s, "w8")), ref, rtol=1e-5, atol=1e-5)


def test_unknown_mode_raises_project_error():
    q, s = quantize_kernel(jnp.ones((4, 2)))
    with pytest.raises(JaxfoundError, match="w8a8"):
        quantized_dot(jnp.ones((1, 4)), q, s, "int4")


def test_qparams_match_init_of_quantized_model_for_included_layers(float_params):
    qparams = quantize(float_params)
    model = build_model(dataclasses.replace(CFG, quant="w8a8"), "token_cls")
    init = nn.unbox(model.init(jax.random.key(0), IDS)["params"])
    q_flat, init_flat = flatten(qparams), flatten(init)
    for path, kept in quantize_plan(float_params).items():
        layer = path[: -len("/kernel")]
        if kept:
            for leaf in ("kernel", "scale", "bias"):
                a, b = q_flat[f"{layer}/{leaf}"], init_flat[f"{layer}/{leaf}"]
                assert (a.shape, a.dtype) == (b.shape, b.dtype), f"{layer}/{leaf}"
    added = {p[: -len("kernel")] + "scale" for p, kept in quantize_plan(float_params).items() if kept}
    assert set(q_flat) == set(flatten(float_params)) | added


def test_default_rules_keep_small_heads_layernorm_and_embeddings_float(float_params):
    plan = quantize_plan(float_params)
    assert plan.pop("classifier/kernel") is False  # 5 labels < 64 output features
    assert plan and all(plan.values()) and len(plan) == 6 * CFG.num_layers
    qparams = quantize(float_params)
    assert qparams["classifier"]["kernel"].dtype == jnp.float32 and "scale" not in qparams["classifier"]
    assert qparams["bert"]["word"]["embedding"].dtype == jnp.float32
    assert qparams["bert"]["layer_0"]["attention_ln"]["scale"].dtype == jnp.float32
    assert qparams["bert"]["layer_0"]["mlp"]["up"]["bias"].dtype == jnp.float32


def test_rules_first_match_wins_and_bad_rules_raise(float_params):
    rules = [Rule(r"/mlp/", "exclude"), Rule(r"layer_0/.*kernel$", "include")]
    plan = quantize_plan(float_params, rules)
    attention = {f"bert/layer_0/attention/{n}/kernel" for n in ("query", "key", "value", "out")}
    assert {p for p, q in plan.items() if q} == attention
    with pytest.raises(JaxfoundError, match="include, exclude"):
        quantize_plan(float_params, [Rule("kernel", "yes")])
    with pytest.raises(JaxfoundError, match="regex"):
        quantize_plan(float_params, [Rule("(", "include")])
    with pytest.raises(JaxfoundError, match="already int8"):
        quantize(quantize(float_params))


def test_dequantize_restores_float_tree_within_half_step(float_params):
    back = dequantize(quantize(float_params))
    assert jax.tree.structure(back) == jax.tree.structure(float_params)
    w = float_params["bert"]["layer_1"]["mlp"]["down"]["kernel"]
    _, scale = quantize_kernel(w)
    assert np.all(np.abs(back["bert"]["layer_1"]["mlp"]["down"]["kernel"] - w) <= scale / 2 * (1 + 1e-5))


def test_w8_model_equals_float_model_on_dequantized_weights(float_params):
    qparams = quantize(float_params)
    # weight-only int8 is exactly the float model with the rounded weights: only float32 reordering differs
    np.testing.assert_allclose(apply(qparams, "w8"), apply(dequantize(qparams)), rtol=1e-4, atol=1e-4)
    # an int8 tree applied with quant 'none' runs weight-only
    np.testing.assert_allclose(apply(qparams, "none"), apply(qparams, "w8"), rtol=0, atol=0)


@pytest.mark.parametrize("mode,rel_bound", [("w8", 0.02), ("w8a8", 0.04)])
def test_quantized_bert_logits_close_to_float(float_params, mode, rel_bound):
    # int8 rounding noise is uniform with std step/sqrt(12) ~ 0.3% of a channel's max weight, ~1% of its
    # rms for Gaussian weights; summed over I inputs it stays ~1% of each Dense output, and LayerNorm keeps
    # it from compounding, so 12 Dense layers give a few %: bound the rms error by 2% (w8) / 4% (w8a8,
    # the activations round too) of the rms logit, and the worst logit by 5x that.
    ref, got = apply(float_params), apply(quantize(float_params), mode)
    rms = np.sqrt(np.mean(ref**2))
    assert np.sqrt(np.mean((got - ref) ** 2)) <= rel_bound * rms
    assert np.abs(got - ref).max() <= 5 * rel_bound * rms
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.95


def test_mixed_tree_applies_and_quantized_layers_differ_from_float(float_params):
    rules = [Rule(r"layer_0/", "include")]  # layer_1 and the classifier stay float
    qparams = quantize(float_params, rules)
    assert qparams["bert"]["layer_1"]["mlp"]["up"]["kernel"].dtype == jnp.float32
    got = apply(qparams, "w8a8")
    ref = apply(float_params)
    assert got.shape == ref.shape and 0 < np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_float_init_and_apply_unchanged_by_quant_support():
    model = build_model(CFG, "token_cls")
    params = nn.unbox(model.init(jax.random.key(0), IDS)["params"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert "scale" not in params["bert"]["layer_0"]["mlp"]["up"]


def test_size_report_quantized_tensors_shrink_about_4x(float_params):
    report = size_report(float_params, quantize(float_params))
    assert report["quantized_layers"] == 6 * CFG.num_layers
    assert report["quantized_ratio"] >= 3.75  # 4 I / (I + 4) with I = 64 or 256: 3.76..3.94
    big = {"kernel": np.zeros((384, 1536), np.float32), "bias": np.zeros(1536, np.float32)}
    assert size_report({"up": big}, quantize({"up": big}))["quantized_ratio"] >= 3.9
    assert report["bytes_before"] - report["bytes_after"] == report["quantized_bytes_before"] - report[
        "quantized_bytes_after"]


def test_checkpoint_round_trip_is_exact_and_stays_int8_on_disk(float_params, tmp_path):
    qparams = quantize(float_params)
    meta = {"mode": "w8a8", "model": CFG, "rules": [Rule(r"(^|/)kernel$", "include")]}
    save_quantized(tmp_path / "q", qparams, meta)
    loaded, got_meta = load_quantized(tmp_path / "q")
    assert got_meta["mode"] == "w8a8" and got_meta["model"]["hidden_size"] == CFG.hidden_size
    assert got_meta["rules"][0]["action"] == "include"
    a, b = flatten(qparams), flatten(loaded)
    assert set(a) == set(b)
    for k in a:
        assert b[k].dtype == np.asarray(a[k]).dtype, k
        np.testing.assert_array_equal(b[k], np.asarray(a[k]))
    on_disk = (tmp_path / "q" / PARAMS_FILE).stat().st_size
    after = size_report(float_params, qparams)["bytes_after"]
    assert after <= on_disk <= after + 16_384  # only the safetensors JSON header on top
    np.testing.assert_array_equal(apply(loaded, "w8a8"), apply(qparams, "w8a8"))


def test_load_quantized_names_missing_or_corrupt_file(float_params, tmp_path):
    with pytest.raises(JaxfoundError, match="not found"):
        load_quantized(tmp_path / "nowhere")
    save_quantized(tmp_path / "q", quantize(float_params), {"mode": "w8"})
    (tmp_path / "q" / PARAMS_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(JaxfoundError, match=PARAMS_FILE):
        load_quantized(tmp_path / "q")
    with pytest.raises(JaxfoundError, match="mode"):
        save_quantized(tmp_path / "r", {}, {"mode": "int4"})
