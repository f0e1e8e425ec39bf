"""The generation engine against transformers' generate, hand-computed sampling filters, stops, streaming, the CLI."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from jaxfound import cli, generation
from jaxfound.config import MeshConfig, ModelConfig
from jaxfound.data.tokenizer import train_tokenizer
from jaxfound.errors import JaxfoundError
from jaxfound.interop.hf import from_pretrained
from jaxfound.models import build_model
from jaxfound.sharding import make_mesh

MAX_NEW = 12
FILTER = jax.jit(generation.filter_top_k_top_p)  # top_k and top_p traced: one compile per shape
# different lengths, one bucket (16), 4 rows (they split over data x fsdp on the mesh): the tests share the compiles
LLAMA_PROMPTS = [[3, 5, 7, 9, 11], [4, 8], [10, 20, 30, 40, 50, 60, 70, 80, 90, 15, 25, 35, 45, 55], [7, 7, 7]]
TEXTS = ["the cat sat on the mat", "a dog", "once upon a time there was a small"]
CORPUS = [f"{a} {b} sat on the {c} and said {d} to the {b}." for a in ("the", "a", "one", "that", "my")
          for b in ("cat", "dog", "bird", "fox", "king") for c in ("mat", "hill", "road", "roof") for d in
          ("hello", "goodbye", "yes", "no", "naïve café")]


def _llama_params(sd: dict, num_layers: int) -> dict:
    """transformers LlamaForCausalLM state dict -> jaxfound params (kernels transposed to (in, out))."""
    params = {"llama": {"word": {"embedding": sd["model.embed_tokens.weight"]},
                        "norm": {"scale": sd["model.norm.weight"]}},
              "lm_head": {"kernel": sd["lm_head.weight"].T}}
    for i in range(num_layers):
        pre = f"model.layers.{i}."
        names = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "o_proj"))
        attention = {ours: {"kernel": sd[f"{pre}self_attn.{theirs}.weight"].T} for ours, theirs in names}
        params["llama"][f"layer_{i}"] = {
            "attention": attention, "input_norm": {"scale": sd[pre + "input_layernorm.weight"]},
            "post_attention_norm": {"scale": sd[pre + "post_attention_layernorm.weight"]},
            "mlp": {n: {"kernel": sd[f"{pre}mlp.{n}_proj.weight"].T} for n in ("gate", "up", "down")}}
    return jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def llama():
    """A tiny random Llama with grouped-query attention (4 query heads, 2 key/value heads): (torch, model, params)."""
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
    torch_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    cfg = ModelConfig(arch="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, activation="silu", layer_norm_eps=hf_cfg.rms_norm_eps, tie_embeddings=False,
                      dropout=0.0, max_position=128)
    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    return torch_model, build_model(cfg, "lm"), _llama_params(sd, cfg.num_layers)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A transformers GPT-2 dir (random weights) with a byte-level BPE tokenizer trained on a small corpus."""
    out = tmp_path_factory.mktemp("gpt2")
    tokenizer = train_tokenizer(CORPUS, "gpt", 400, str(out))
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     initializer_range=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    transformers.GPT2LMHeadModel(hf_cfg).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    """(torch model, our model, params, tokenizer) of gpt2_dir."""
    model, params = from_pretrained(gpt2_dir, head="lm")
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    return torch_model, model, params, transformers.AutoTokenizer.from_pretrained(gpt2_dir)


def _transformers_greedy(torch_model, ids: list[int], eos: int | None) -> list[int]:
    out = torch_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


# ---------------------------------------------------------------- greedy parity with transformers


def test_greedy_batch_equals_transformers_and_single_prompts_llama_gqa(llama):
    torch_model, model, params = llama
    result = generation.generate(model, params, LLAMA_PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=(2,))
    for b, ids in enumerate(LLAMA_PROMPTS):
        expected = _transformers_greedy(torch_model, ids, eos=2)
        assert result.tokens[b] == expected, f"row {b}"
        assert result.finish_reasons[b] == ("stop" if expected[-1] == 2 else "length")
        single = generation.generate(model, params, [ids], max_new_tokens=MAX_NEW, stop_token_ids=(2,))
        assert single.tokens[0] == result.tokens[b]
    assert result.compile_seconds > 0
    assert generation.generate(model, params, LLAMA_PROMPTS, max_new_tokens=MAX_NEW).compile_seconds == 0.0


def test_greedy_batch_equals_transformers_and_single_prompts_gpt2(gpt2):
    torch_model, model, params, tokenizer = gpt2
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    result = generation.generate(model, params, prompts, max_new_tokens=MAX_NEW)
    for b, ids in enumerate(prompts):
        assert result.tokens[b] == _transformers_greedy(torch_model, ids, eos=None), f"row {b}"
        assert generation.generate(model, params, [ids], max_new_tokens=MAX_NEW).tokens[0] == result.tokens[b]
    assert result.finish_reasons == ["length"] * 3


def test_greedy_on_an_8_device_mesh_equals_one_device(llama):
    _, model, params = llama
    assert len(jax.devices()) >= 8, "tests/conftest.py simulates 8 CPU devices"
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # rows over data x fsdp, heads and mlp over tensor
    on_mesh = generation.generate(model, params, LLAMA_PROMPTS, max_new_tokens=MAX_NEW, mesh=mesh)
    assert on_mesh.tokens == generation.generate(model, params, LLAMA_PROMPTS, max_new_tokens=MAX_NEW).tokens


# ---------------------------------------------------------------- sampling


def test_sampling_is_a_function_of_the_key_and_top_k_1_is_greedy(llama):
    _, model, params = llama
    def run(seed, **options):
        return generation.generate(model, params, LLAMA_PROMPTS, max_new_tokens=MAX_NEW, key=jax.random.key(seed),
                                   **{"temperature": 1.0, **options})
    assert generation.warmup(model, params, len(LLAMA_PROMPTS), 14, MAX_NEW, greedy=False) > 0
    first = run(1)
    assert first.compile_seconds == 0.0  # warmup compiled these shapes
    assert run(1).tokens == first.tokens
    assert run(2).tokens != first.tokens
    top1 = run(3, top_k=1, temperature=0.7)
    assert top1.compile_seconds == 0.0  # temperature and top_k are traced, not compiled in
    assert top1.tokens == generation.generate(model, params, LLAMA_PROMPTS, max_new_tokens=MAX_NEW).tokens


def test_nucleus_and_top_k_filters_by_hand():
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15])
    logits_1xV = jnp.asarray(np.log(probs))[None]
    kept = lambda k, p: np.isfinite(np.asarray(FILTER(logits_1xV, k, p)))[0]  # noqa: E731
    # top-p 0.75: 0.5 (nothing before it), 0.2 (0.5 before), 0.15 (0.7 before); not 0.1 (0.85 before)
    assert kept(0, 0.75).tolist() == [False, True, False, True, True]
    assert kept(0, 0.3).tolist() == [False, True, False, False, False]  # the most likely token always stays
    assert kept(2, 1.0).tolist() == [False, True, False, True, False]
    # top-k first, then top-p over the renormalised two: 0.5 / 0.7 = 0.71 >= 0.6 already
    assert kept(2, 0.6).tolist() == [False, True, False, False, False]
    assert kept(0, 1.0).all()
    filtered = np.asarray(FILTER(logits_1xV, 0, 0.75))[0]
    np.testing.assert_array_equal(filtered[[1, 3, 4]], np.asarray(logits_1xV)[0, [1, 3, 4]])


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.9), (7, 1.0), (12, 0.6), (0, 0.05)])
def test_filters_equal_transformers_warpers(top_k, top_p):
    logits_BxV = np.random.RandomState(top_k).randn(4, 50).astype(np.float32) * 2
    expected = torch.tensor(logits_BxV)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    expected = TopPLogitsWarper(top_p)(None, expected).numpy() if top_p < 1 else expected.numpy()
    ours = np.asarray(FILTER(jnp.asarray(logits_BxV), top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))


def test_sampled_frequencies_follow_the_filtered_tempered_softmax():
    logits_V = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    N, temperature, top_p = 20000, 0.8, 0.9
    sampling = {"temperature": jnp.float32(temperature), "top_k": jnp.int32(0), "top_p": jnp.float32(top_p)}
    sample = jax.jit(generation.sample, static_argnames="greedy")
    tokens = sample(jnp.tile(jnp.asarray(logits_V), (N, 1)), jax.random.key(0), 5, sampling, greedy=False)
    probs = np.exp(logits_V / temperature) / np.exp(logits_V / temperature).sum()  # [.58 .17 .09 .05 .01]...
    before = np.cumsum(probs) - probs
    probs = np.where(before < top_p, probs, 0.0)
    probs /= probs.sum()
    np.testing.assert_allclose(np.bincount(np.asarray(tokens), minlength=5) / N, probs, atol=0.015)


# ---------------------------------------------------------------- decode chunks


def test_chunked_decoding_equals_one_step_per_call_greedy_and_sampled(llama):
    _, model, params = llama
    assert (MAX_NEW - 1) % generation.DECODE_CHUNK != 0  # the last chunk runs steps whose tokens are dropped
    for options, chunks in (({}, (None, 3)), ({"temperature": 1.0, "top_p": 0.9, "key": jax.random.key(4)}, (None,))):
        per_token = generation.generate(model, params, LLAMA_PROMPTS, max_new_tokens=MAX_NEW, decode_chunk=1,
                                        **options)
        for chunk in chunks:
            chunked = generation.generate(model, params, LLAMA_PROMPTS, max_new_tokens=MAX_NEW, decode_chunk=chunk,
                                          **options)
            assert chunked.tokens == per_token.tokens, (options, chunk)
            assert chunked.finish_reasons == per_token.finish_reasons == ["length"] * len(LLAMA_PROMPTS)
    with pytest.raises(JaxfoundError, match="decode_chunk must be >= 1"):
        generation.generate(model, params, LLAMA_PROMPTS, max_new_tokens=MAX_NEW, decode_chunk=0)


def test_a_stop_inside_a_chunk_cuts_the_row_and_streams_what_one_step_per_call_streams(gpt2):
    _, model, params, tokenizer = gpt2
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    full = generation.generate(model, params, prompts, max_new_tokens=MAX_NEW, tokenizer=tokenizer)
    stop = full.tokens[0][4]  # the 4th token of the first chunk (token 0 is prefill's)
    results, calls = {}, {}
    for chunk in (1, None):
        calls[chunk] = []
        results[chunk] = generation.generate(model, params, prompts, max_new_tokens=MAX_NEW, tokenizer=tokenizer,
                                             stop_token_ids=(stop,), decode_chunk=chunk,
                                             on_token=lambda *c, chunk=chunk: calls[chunk].append(c))
    result = results[None]
    assert result.tokens[0] == full.tokens[0][:full.tokens[0].index(stop) + 1] and result.finish_reasons[0] == "stop"
    for b, tokens in enumerate(full.tokens):
        expected = tokens[:tokens.index(stop) + 1] if stop in tokens else tokens
        assert result.tokens[b] == expected
        assert result.finish_reasons[b] == ("stop" if stop in tokens else "length")
    assert (result.tokens, result.texts, result.finish_reasons) == (results[1].tokens, results[1].texts,
                                                                    results[1].finish_reasons)
    assert calls[None] == calls[1]  # the same (row, token, piece) in the same order
    assert [t for row, t, _ in calls[None] if row == 0] == result.tokens[0]


def test_the_cache_holds_every_step_run_and_the_chunk_shrinks_at_the_last_positions():
    cfg = ModelConfig(arch="gpt", max_position=64)
    assert generation.steps_run(12, 8) == 16 and generation.steps_run(9, 8) == 8 and generation.steps_run(1, 8) == 0
    assert generation.fitting_chunk(cfg, 5, 12, 8) == 8
    assert generation.fitting_chunk(cfg, 5, 4, 8) == 3  # never longer than the 3 decode steps
    assert generation.fitting_chunk(cfg, 50, 14, 8) == 7  # 13 steps: 2 x 8 would write slot 65; 2 x 7 ends at 63
    assert generation.fitting_chunk(cfg, 60, 4, 8) == 3
    for longest in range(1, 64):
        for max_new in range(1, 65 - longest):
            for chunk in (1, 2, 5, 8):
                K = generation.fitting_chunk(cfg, longest, max_new, chunk)
                _, S = generation.shapes(cfg, longest, max_new, K)
                assert 1 <= K <= chunk and longest + generation.steps_run(max_new, K) <= S <= 64


def test_a_chunk_shortened_at_the_last_positions_gives_the_same_tokens(gpt2):
    _, model, params, _ = gpt2
    prompt, max_new = [int(t) for t in np.random.default_rng(0).integers(0, model.cfg.vocab_size, 50)], 14
    assert generation.decode_plan(model.cfg, len(prompt), max_new, None) == (64, 64, 7)
    chunked = generation.generate(model, params, [prompt], max_new_tokens=max_new)
    assert chunked.tokens == generation.generate(model, params, [prompt], max_new_tokens=max_new,
                                                 decode_chunk=1).tokens
    assert len(chunked.tokens[0]) == max_new


# ---------------------------------------------------------------- stops, streaming


def test_stop_token_ids_end_rows_and_max_new_tokens_gives_length(gpt2):
    _, model, params, tokenizer = gpt2
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    full = generation.generate(model, params, prompts, max_new_tokens=MAX_NEW, tokenizer=tokenizer)
    stop = full.tokens[0][4]
    result = generation.generate(model, params, prompts, max_new_tokens=MAX_NEW, tokenizer=tokenizer,
                                 stop_token_ids=(stop,))
    for b, tokens in enumerate(full.tokens):
        if stop in tokens:
            assert result.tokens[b] == tokens[:tokens.index(stop) + 1]
            assert result.finish_reasons[b] == "stop"
            assert result.texts[b] == tokenizer.decode(result.tokens[b][:-1], skip_special_tokens=True)
        else:
            assert (result.tokens[b], result.finish_reasons[b]) == (tokens, "length")
    assert len(result.tokens[0]) <= 5 and result.finish_reasons[0] == "stop"


def test_generate_text_stops_at_the_tokenizers_eos(gpt2):
    _, model, params, tokenizer = gpt2
    full = generation.generate_text(model, params, tokenizer, TEXTS, max_new_tokens=MAX_NEW)
    eos_tokenizer = copy.deepcopy(tokenizer)
    eos_tokenizer.eos_token = tokenizer.convert_ids_to_tokens(full.tokens[1][2])
    result = generation.generate_text(model, params, eos_tokenizer, TEXTS, max_new_tokens=MAX_NEW)
    assert result.tokens[1] == full.tokens[1][:full.tokens[1].index(eos_tokenizer.eos_token_id) + 1]
    assert result.finish_reasons[1] == "stop"


def _stop_string(text: str) -> str:
    """Two characters from the middle of text, neither a replaced broken byte (a stop string that surely occurs)."""
    for i in range(len(text) // 3, len(text) - 1):
        if "\ufffd" not in text[i:i + 2]:
            return text[i:i + 2]
    raise AssertionError(f"no two whole characters in {text!r}")


def test_stop_strings_cut_the_text_and_the_stream_adds_up_to_it(gpt2):
    _, model, params, tokenizer = gpt2
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    full = generation.generate(model, params, prompts, max_new_tokens=MAX_NEW, tokenizer=tokenizer)
    stop = _stop_string(full.texts[2])
    calls = []
    result = generation.generate(model, params, prompts, max_new_tokens=MAX_NEW, tokenizer=tokenizer,
                                 stop_strings=(stop, "never appears"), on_token=lambda *c: calls.append(c))
    for b, text in enumerate(full.texts):
        assert result.texts[b] == text[:text.find(stop)] if stop in text else text
        assert result.finish_reasons[b] == ("stop" if stop in text else "length")
        assert result.tokens[b] == full.tokens[b][:len(result.tokens[b])]
        assert [t for row, t, _ in calls if row == b] == result.tokens[b]
        assert "".join(piece for row, _, piece in calls if row == b) == result.texts[b]
    assert len(result.tokens[2]) < MAX_NEW


def test_streamed_pieces_add_up_to_the_text_without_stops(gpt2):
    _, model, params, tokenizer = gpt2
    calls = []
    result = generation.generate_text(model, params, tokenizer, TEXTS, max_new_tokens=MAX_NEW,
                                      on_token=lambda *c: calls.append(c))
    for b in range(len(TEXTS)):
        assert [t for row, t, _ in calls if row == b] == result.tokens[b]
        assert "".join(piece for row, _, piece in calls if row == b) == result.texts[b]


def test_held_back_keeps_incomplete_characters_and_stop_string_starts():
    assert generation.held_back("caf\ufffd", ()) == 1
    assert generation.held_back("hello wor", ["world"]) == 3
    assert generation.held_back("hello w", ["world", "w"]) == 1
    assert generation.held_back("hello", ["world"]) == 0
    assert generation.held_back("ab\ufffd\ufffd", ["\ufffd\ufffdx"]) == 2


def test_buckets_hold_the_prompt_and_every_decode_write_within_the_positions():
    cfg = ModelConfig(arch="gpt", max_position=64)
    assert generation.shapes(cfg, 5, 12) == (16, 32)  # 5 + 12 slots -> 32
    assert generation.shapes(cfg, 17, 8) == (32, 32)
    assert generation.shapes(cfg, 40, 24) == (64, 64)  # capped at the 64 learned positions
    assert generation.shapes(ModelConfig(arch="llama", max_position=100), 70, 20) == (100, 100)
    assert [generation.bucket(n) for n in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, 128]


def test_requests_the_model_cannot_serve_are_refused_by_name(gpt2):
    _, model, params, _ = gpt2
    with pytest.raises(JaxfoundError, match="exceeds the model's 64 positions"):
        generation.generate(model, params, [[1] * 60], max_new_tokens=8)
    with pytest.raises(JaxfoundError, match="prompt 1 is empty"):
        generation.generate(model, params, [[1], []], max_new_tokens=4)
    with pytest.raises(JaxfoundError, match="valid ids are 0 .. "):
        generation.generate(model, params, [[model.cfg.vocab_size]], max_new_tokens=4)
    with pytest.raises(JaxfoundError, match="top_p"):
        generation.generate(model, params, [[1]], max_new_tokens=4, temperature=1.0, top_p=0.0)
    with pytest.raises(JaxfoundError, match="head 'lm'"):
        generation.generate(build_model(model.cfg, "none"), params, [[1]], max_new_tokens=4)


# ---------------------------------------------------------------- the CLI


def test_cli_generates_from_a_transformers_dir(gpt2, gpt2_dir, capsys):
    _, model, params, tokenizer = gpt2
    expected = generation.generate_text(model, params, tokenizer, TEXTS, max_new_tokens=MAX_NEW).texts
    assert cli.main(["generate", "--model", str(gpt2_dir), TEXTS[0], "--max-new-tokens", str(MAX_NEW)]) == 0
    out, err = capsys.readouterr()
    assert out == expected[0] + "\n"
    assert "tok/s decode" in err and "first token" in err
    assert cli.main(["generate", "--model", str(gpt2_dir), *TEXTS, "--max-new-tokens", str(MAX_NEW)]) == 0
    out, _ = capsys.readouterr()
    assert out == "".join(f"--- [{i}] {prompt}\n{text}\n" for i, (prompt, text) in enumerate(zip(TEXTS, expected)))


def test_cli_refuses_an_encoder_with_one_line(tmp_path, capsys):
    hf_cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    transformers.BertForMaskedLM(hf_cfg).save_pretrained(tmp_path)
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(tmp_path), "hello"]) == 2
    err = capsys.readouterr().err
    assert "generation needs a decoder LM" in err and str(tmp_path) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("gpt", True)])
def test_vocab_major_logits_are_the_transposed_logits(arch, tie):
    import flax.linen as nn

    extra = dict(num_kv_heads=1, activation="silu", tie_embeddings=tie) if arch == "llama" else {}
    cfg = ModelConfig(arch=arch, vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48,
                      max_position=16, dropout=0.0, **extra)
    model = build_model(cfg, "lm")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (3, 5)), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(1), ids)["params"])
    positions = jnp.array([[4], [2], [0]])
    logits_Bx1xV = model.apply({"params": params}, ids, masked_positions=positions)
    logits_VxB = model.apply({"params": params}, ids, masked_positions=positions, vocab_major=True)
    np.testing.assert_allclose(np.asarray(logits_VxB), np.asarray(logits_Bx1xV[:, 0]).T, rtol=1e-5, atol=1e-6)
