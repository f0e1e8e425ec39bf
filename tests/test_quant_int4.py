"""4-bit weights (quant/int4.py, int4_dense.cc): every native path the CPU has equals an integer reference exactly on
every tail (both ISA families on an AVX-512 machine), and the XLA path on real scales; the quantizer reproduces a
kernel already on a 4-bit grid and stays within its error otherwise; the layout round-trips; a w4 decoder decodes over
its KV cache as its own full forward passes choose; `jaxfound quantize --mode w4` writes a run generate reads."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfound import runs
from jaxfound.cli import main
from jaxfound.config import ModelConfig
from jaxfound.generation import decoding_params, generate, generate_text
from jaxfound.models import build_model
from jaxfound.quant import int4, kernel
from jaxfound.quant.checkpoint import flatten
from jaxfound.quant.int8 import quantize_tied_embedding
from jaxfound.quant.packed import fuse_projections


def _native(path):
    reason = kernel.why_unsupported(path)
    if reason:
        pytest.skip(f"{path} kernel: {reason}")
    return kernel.load_w4(path)


def _activations_int8(x):
    """The kernel's per-token quantization, in numpy float32: q = clip(rint(x * (127 / amax))), scale = amax / 127."""
    amax = np.abs(x).max(axis=1, keepdims=True)
    inv = np.where(amax == 0, np.float32(0), np.float32(127) / np.where(amax == 0, 1, amax)).astype(np.float32)
    q = np.clip(np.rint(x * inv), -127, 127).astype(np.int64)
    return q, np.where(amax == 0, np.float32(1), amax / np.float32(127)).astype(np.float32)


# M: one row (4-panel tiles), 2..4-row tiles and their tails, a second 64-row block; N: 16-column panel tails and
# uneven column chunks; K: one group and several, G 32 and 64
SHAPES = [(1, 32, 1, 32), (1, 64, 17, 32), (2, 64, 70, 64), (3, 96, 40, 32), (5, 128, 100, 64), (7, 64, 33, 32),
          (9, 576, 192, 32), (70, 64, 50, 32)]


@pytest.mark.parametrize("path", list(kernel.PATHS))
@pytest.mark.parametrize("M,K,N,G", SHAPES)
def test_w4_kernel_equals_integer_reference_exactly(path, M, K, N, G):
    dense = _native(path)
    rng = np.random.default_rng(M * 1000 + K + N)
    u = rng.integers(0, 16, (K, N)).astype(np.uint8)
    u[rng.integers(0, K), :] = 15  # extremes: 15 * 127 per product
    x = rng.normal(size=(M, K)).astype(np.float32)
    x[0, :] = 0.0 if M > 1 else x[0, :]  # an all-zero row: scale 1, output 0
    kernel_q = u[0::2] | (u[1::2] << 4)
    ones, zeros = np.ones((K // G, N), np.float16), np.zeros((K // G, N), np.float16)
    got = np.asarray(jax.jit(lambda x, p: dense(x, p, N, G))(x, int4.pack_w4(kernel_q, ones, zeros)))
    q, xs = _activations_int8(x)
    np.testing.assert_array_equal(got, (q @ u.astype(np.int64)).astype(np.float32) * xs)
    # offsets only: each group's activation sum times its offset
    got = np.asarray(dense(x, int4.pack_w4(kernel_q, zeros, ones), N, G))
    sums = q.reshape(M, K // G, G).sum(axis=-1).sum(axis=-1, keepdims=True)
    np.testing.assert_array_equal(got, np.broadcast_to(sums.astype(np.float32) * xs, (M, N)))


@pytest.mark.parametrize("path", list(kernel.PATHS))
def test_w4_kernel_equals_the_xla_path_on_real_scales(path):
    dense = _native(path)
    rng = np.random.default_rng(3)
    for M, K, N, G in ((1, 576, 200, 32), (8, 128, 48, 64)):
        q = int4.quantize_w4(rng.normal(size=(K, N)).astype(np.float32), G)
        x = rng.normal(size=(M, K)).astype(np.float32)
        want = np.asarray(int4.w4_dot_xla(x, q["kernel"], q["scale"], q["offset"]))
        got = np.asarray(dense(x, int4.pack_w4(q["kernel"], q["scale"], q["offset"]), N, G))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_quantizer_reproduces_a_4bit_grid_and_bounds_its_error():
    rng = np.random.default_rng(0)
    K, N, G = 128, 24, 32
    s = rng.uniform(0.01, 0.1, (K // G, N)).astype(np.float16)
    o = rng.uniform(-1, 0, (K // G, N)).astype(np.float16)
    u = rng.integers(0, 16, (K, N))
    u[::G] = 0
    u[1::G] = 15  # each group spans its whole range
    w = u * np.repeat(s.astype(np.float32), G, axis=0) + np.repeat(o.astype(np.float32), G, axis=0)
    q = int4.quantize_w4(w, G)
    np.testing.assert_array_equal(np.asarray(int4.unpack_nibbles(q["kernel"])), u)
    np.testing.assert_allclose(np.asarray(int4.dequantize_w4(q["kernel"], q["scale"], q["offset"])), w, atol=1e-6)
    # a Gaussian kernel: no worse than min / max rounding (at most half a step of the group's range per weight)
    w = rng.normal(size=(K, N)).astype(np.float32)
    q = int4.quantize_w4(w, G)
    err = np.asarray(int4.dequantize_w4(q["kernel"], q["scale"], q["offset"])) - w
    groups = w.reshape(K // G, G, N)
    half_step = np.repeat((groups.max(axis=1) - groups.min(axis=1)) / 15 / 2, G, axis=0)
    assert np.sqrt(np.mean(err ** 2)) <= np.sqrt(np.mean(half_step ** 2 / 3)) * 1.01  # uniform rounding's rms
    packed = int4.pack_w4(q["kernel"], q["scale"], q["offset"])
    assert packed.shape == (2, (K // G) * (64 + 8 * G)) and int4.packed_group(packed, K) == G
    for a, b in zip(int4.unpack_w4(packed, K, N), (q["kernel"], q["scale"], q["offset"])):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.fixture(scope="module")
def w4_llama():
    cfg = ModelConfig(arch="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=4, max_position=64, tie_embeddings=True, dropout=0.0)  # k / v: 64 outputs, quantized
    params = nn.unbox(jax.jit(build_model(cfg, "lm").init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    qparams = quantize_tied_embedding(int4.quantize_params(params, "w4"), "llama")
    return cfg, params, qparams


def test_w4_decoder_params_match_its_init_and_decode_as_its_forward_chooses(w4_llama):
    cfg, params, qparams = w4_llama
    qmodel = build_model(dataclasses.replace(cfg, quant="w4"), "lm")
    init = nn.unbox(jax.eval_shape(qmodel.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    shapes = lambda t: {"/".join(str(getattr(k, "key", k)) for k in path): (tuple(v.shape), str(v.dtype))  # noqa: E731
                        for path, v in jax.tree_util.tree_leaves_with_path(t)}
    got, want = shapes(qparams), shapes(init)
    w4_layers = {k.rsplit("/", 1)[0] for k, (_, dtype) in got.items() if dtype == "uint8"}
    assert len(w4_layers) == 2 * 7  # every block Dense
    for layer in w4_layers:  # a quantized layer has the params a w4 model's init makes
        assert {k: v for k, v in got.items() if k.startswith(layer + "/")} == {
            k: v for k, v in want.items() if k.startswith(layer + "/")}
    mlp = qparams["llama"]["layer_0"]["mlp"]
    assert mlp["up"]["kernel"].dtype == np.uint8 and mlp["up"]["kernel"].shape == (32, 96)
    assert mlp["down"]["scale"].shape == (3, 64)  # 96 rows in groups of 32
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 101, (2, 9)), jnp.int32)
    ref = np.asarray(jax.jit(build_model(cfg, "lm").apply)({"params": params}, ids))
    got = np.asarray(jax.jit(qmodel.apply)({"params": qparams}, ids))
    assert np.sqrt(np.mean((got - ref) ** 2)) <= 0.15 * np.sqrt(np.mean(ref ** 2))  # 4-bit weights, int8 acts
    ready = decoding_params(qmodel, qparams)
    native = jax.default_backend() == "cpu" and kernel.w4_available()
    assert ("w4_packed" in ready["llama"]["layer_0"]["mlp"]["gate_up"]) == native
    np.testing.assert_allclose(np.asarray(jax.jit(qmodel.apply)({"params": ready}, ids)), got, rtol=1e-4,
                               atol=1e-4 * np.abs(got).max())  # packed + fused (native) = the XLA path
    fused = fuse_projections(qparams)["llama"]["layer_1"]["attention"]["qkv"]
    assert fused["kernel"].shape == (32, 3 * 64) and fused["offset"].shape == (2, 3 * 64)
    prompt = [3, 5, 7, 9, 11]
    out = generate(qmodel, qparams, [prompt], max_new_tokens=5).tokens[0]
    logits = np.asarray(jax.jit(qmodel.apply)({"params": ready}, jnp.asarray([prompt + out[:-1]], jnp.int32)))
    assert np.argmax(logits[0, len(prompt) - 1:], axis=-1).tolist() == out


def test_quantize_cli_writes_a_w4_decoder_that_generates(smollm2_tokenizer, tmp_path, capsys):
    from tests.test_sft import tiny_llama_dir

    base, out = tiny_llama_dir(tmp_path / "base", smollm2_tokenizer, hidden=64, intermediate=128), tmp_path / "q"
    assert main(["quantize", "--checkpoint", str(base), "--mode", "w4", "--out", str(out)]) == 0
    run = runs.open_run(out)
    assert run.config.model.quant == "w4"
    want = flatten(quantize_tied_embedding(int4.quantize_params(runs.open_run(base).params, "w4"), "llama"))
    got = flatten(run.params)  # read tensor by tensor into 4-bit: the same params as quantizing the float model
    assert sorted(got) == sorted(want) and all(np.array_equal(np.asarray(got[k]), np.asarray(want[k])) for k in want)
    assert got["llama/layer_0/mlp/down/kernel"].dtype == np.uint8
    report = json.loads((out / "quant_report.json").read_text())  # quantized bytes: codes, scales, offsets, the table
    layers = {k.rsplit("/", 1)[0] for k in got if k.endswith("/scale") and not k.endswith("norm/scale")}
    assert report["quantized_bytes_after"] == sum(v.nbytes for k, v in got.items() if k.rsplit("/", 1)[0] in layers)
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "the river", "--max-new-tokens", "4"]) == 0
    ref = generate_text(run.model, run.params, run.tokenizer, ["the river"], max_new_tokens=4)
    assert ref.texts[0].strip() and ref.texts[0] in capsys.readouterr().out


def test_dequantize_turns_w4_layers_back_into_float_kernels(w4_llama):
    _, params, qparams = w4_llama
    back = int4.dequantize(qparams)  # also what quant.dequantize is
    up = qparams["llama"]["layer_0"]["mlp"]["up"]
    assert sorted(back["llama"]["layer_0"]["mlp"]["up"]) == ["kernel"]
    np.testing.assert_array_equal(np.asarray(back["llama"]["layer_0"]["mlp"]["up"]["kernel"]),
                                  np.asarray(int4.dequantize_w4(up["kernel"], up["scale"], up["offset"])))
    assert jax.tree.structure(back) == jax.tree.structure(params)
