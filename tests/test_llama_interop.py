"""jaxfound.interop.hf for the Llama family (Llama, Mistral, Qwen2, Qwen3) against PyTorch transformers: loaded and
saved models give transformers' logits; a GGUF file loads as transformers loads it."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxfound.config import ModelConfig
from jaxfound.errors import JaxfoundError
from jaxfound.interop.hf import from_pretrained, hf_config_from_dict, load_hf_config, read_weights, save_pretrained
from jaxfound.models import abstract_params, build_model
from jaxfound.models.llama import head_dims

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max |ours - theirs| / max |theirs|, float32
ROUND_TRIP_TOL = 1e-5
LENGTHS = (20, 13, 6)  # right padding: zeros at the end of the attention mask
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
SMALL = dict(vocab_size=101, num_hidden_layers=2, max_position_embeddings=64)

# family, transformers config kwargs, the ModelConfig fields they must give
VARIANTS = {
    "llama_llama3_rope_untied_gqa3": (
        "Llama", dict(hidden_size=96, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
                      rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
        dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_position=16, num_kv_heads=2,
             tie_embeddings=False)),
    "llama_linear_rope_tied_mha": (
        "Llama", dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                      rope_parameters={"rope_type": "linear", "rope_theta": 300.0, "factor": 2.5},
                      tie_word_embeddings=True, rms_norm_eps=1e-5),
        dict(rope_scaling="linear", rope_factor=2.5, rope_theta=300.0, num_kv_heads=0, tie_embeddings=True,
             layer_norm_eps=1e-5)),
    "mistral_window4_h80_5heads_1kv": (
        "Mistral", dict(hidden_size=80, intermediate_size=72, num_attention_heads=5, num_key_value_heads=1,
                        sliding_window=4, tie_word_embeddings=False),
        dict(sliding_window=4, num_kv_heads=1, head_dim=0, tie_embeddings=False)),
    "qwen2_qkv_bias_tied": (
        "Qwen2", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True),
        dict(attention_bias=True, sliding_window=0, num_kv_heads=2, tie_embeddings=True)),
    "qwen3_qk_norm_head_dim24_1kv": (
        "Qwen3", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                      tie_word_embeddings=False),
        dict(qk_norm=True, head_dim=24, num_kv_heads=1, attention_bias=False, tie_embeddings=False)),
}


def _hf_config(family, kwargs, **extra):
    return getattr(transformers, f"{family}Config")(**SMALL, **kwargs, **extra, attn_implementation="eager")


def _torch_model(cls_name, hf_cfg, seed=0):
    """A random transformers model with every weight (biases, norm scales too) perturbed, in eval mode."""
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _batch(vocab_size, seed=0):
    """ids (B, L) with pad id 0 after each length, mask (B, L)."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(max(LENGTHS))[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
    return rng.integers(1, vocab_size, mask.shape) * mask, mask


def _ours(model, params, ids, mask):
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))


def _theirs(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits).numpy()


def _rel_diff(ours, theirs, mask=None):
    """max |ours - theirs| / max |theirs| over the real (unpadded) positions."""
    assert ours.shape == theirs.shape
    if mask is not None:
        ours, theirs = ours[mask.astype(bool)], theirs[mask.astype(bool)]
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _params_equal(a, b):
    return jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, a, b))


# ---------------------------------------------------------------- transformers -> jaxfound


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_causal_lm_logits_match_transformers(variant, tmp_path):
    family, kwargs, fields = VARIANTS[variant]
    torch_model = _torch_model(f"{family}ForCausalLM", _hf_config(family, kwargs))
    torch_model.save_pretrained(tmp_path)
    model, params = from_pretrained(tmp_path)
    assert model.head == "lm"
    assert {k: getattr(model.cfg, k) for k in fields} == fields
    ids, mask = _batch(SMALL["vocab_size"])
    diff = _rel_diff(_ours(model, params, ids, mask), _theirs(torch_model, ids, mask), mask)
    print(f"{variant}: max|diff| / max|logit| = {diff:.2e}")
    assert diff <= TOL


def test_sliding_window_changes_the_logits(tmp_path):
    """The Mistral case really tests the window: without it the logits past the window differ."""
    family, kwargs, _ = VARIANTS["mistral_window4_h80_5heads_1kv"]
    torch_model = _torch_model("MistralForCausalLM", _hf_config(family, kwargs))
    torch_model.save_pretrained(tmp_path)
    model, params = from_pretrained(tmp_path)
    unwindowed = build_model(dataclasses.replace(model.cfg, sliding_window=0), "lm")
    ids, mask = _batch(SMALL["vocab_size"])
    theirs = _theirs(torch_model, ids, mask)
    assert _rel_diff(_ours(model, params, ids, mask), theirs, mask) <= TOL
    assert _rel_diff(_ours(unwindowed, params, ids, mask), theirs, mask) > 100 * TOL


@pytest.mark.parametrize(("cls_name", "family"), [("LlamaModel", "Llama"), ("Qwen2ForTokenClassification", "Qwen2"),
                                                  ("Qwen3ForSequenceClassification", "Qwen3"),
                                                  ("MistralForSequenceClassification", "Mistral")])
def test_other_heads_match_transformers(cls_name, family, tmp_path):
    variant = next(v for v in VARIANTS.values() if v[0] == family)
    hf_cfg = _hf_config(family, variant[1], num_labels=3, pad_token_id=0)
    torch_model = _torch_model(cls_name, hf_cfg, seed=1)
    torch_model.save_pretrained(tmp_path)
    model, params = from_pretrained(tmp_path)
    ids, mask = _batch(SMALL["vocab_size"], seed=1)
    seq = "Sequence" in cls_name
    diff = _rel_diff(_ours(model, params, ids, mask), _theirs(torch_model, ids, mask), None if seq else mask)
    print(f"{cls_name}: max|diff| / max|out| = {diff:.2e}")
    assert diff <= TOL


def test_attention_bias_of_llama_loads_when_o_proj_bias_is_zero(tmp_path):
    """Llama's attention_bias also puts a bias on o_proj, which jaxfound lacks: zero loads, non-zero is refused."""
    hf_cfg = _hf_config("Llama", VARIANTS["llama_linear_rope_tied_mha"][1], attention_bias=True)
    torch_model = _torch_model("LlamaForCausalLM", hf_cfg)
    torch_model.save_pretrained(tmp_path / "nonzero")
    with pytest.raises(JaxfoundError, match=r"model\.safetensors: weight 'model\.layers\.0\.self_attn\.o_proj\.bias'"
                                            r" is non-zero"):
        from_pretrained(tmp_path / "nonzero")
    with torch.no_grad():
        for layer in torch_model.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    torch_model.save_pretrained(tmp_path / "zero")
    model, params = from_pretrained(tmp_path / "zero")
    assert model.cfg.attention_bias
    ids, mask = _batch(SMALL["vocab_size"])
    assert _rel_diff(_ours(model, params, ids, mask), _theirs(torch_model, ids, mask), mask) <= TOL


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    family, kwargs, _ = VARIANTS["qwen3_qk_norm_head_dim24_1kv"]
    torch_model = _torch_model("Qwen3ForCausalLM", _hf_config(family, kwargs))
    torch_model.save_pretrained(tmp_path / "single")
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    _, single = from_pretrained(tmp_path / "single")
    _, sharded = from_pretrained(tmp_path / "sharded")
    assert _params_equal(single, sharded)


def test_tied_checkpoint_with_lm_head_copy(tmp_path):
    """A tied checkpoint may carry lm_head.weight: equal to the embeddings it loads, different it is refused."""
    family, kwargs, _ = VARIANTS["qwen2_qkv_bias_tied"]
    _torch_model("Qwen2ForCausalLM", _hf_config(family, kwargs)).save_pretrained(tmp_path)
    _, plain = from_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    assert "lm_head.weight" not in tensors
    save_file(tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"]}, file, metadata={"format": "pt"})
    _, with_copy = from_pretrained(tmp_path)
    assert _params_equal(plain, with_copy)
    save_file(tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"] + 1}, file, metadata={"format": "pt"})
    with pytest.raises(JaxfoundError, match=r"model\.safetensors: 'lm_head\.weight' differs from the word embeddings"):
        from_pretrained(tmp_path)


def test_bf16_checkpoint_loads_as_float32(tmp_path):
    family, kwargs, _ = VARIANTS["llama_llama3_rope_untied_gqa3"]
    torch_model = _torch_model("LlamaForCausalLM", _hf_config(family, kwargs)).to(torch.bfloat16)
    torch_model.save_pretrained(tmp_path)
    model, params = from_pretrained(tmp_path)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    expected = torch_model.model.embed_tokens.weight.detach().float().numpy()
    assert np.array_equal(np.asarray(params["llama"]["word"]["embedding"]), expected)


# ---------------------------------------------------------------- config.json


CONFIGS = {
    "mistral_window_null": dict(model_type="mistral", sliding_window=None),
    "mistral_default_window": dict(model_type="mistral"),
    "qwen2_no_bias_key": dict(model_type="qwen2"),
    "qwen2_window_every_layer": dict(model_type="qwen2", use_sliding_window=True, sliding_window=6,
                                     max_window_layers=0),
    "qwen2_window_no_layer": dict(model_type="qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=2),
    "qwen3_default_head_dim": dict(model_type="qwen3"),
    "llama_old_rope_keys": dict(model_type="llama", rope_theta=500.0,
                                rope_scaling={"type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                                              "high_freq_factor": 8.0, "original_max_position_embeddings": 32}),
    "llama_rope_parameters": dict(model_type="llama", rope_parameters=LLAMA3_ROPE, head_dim=12),
    "llama_defaults": dict(model_type="llama", num_key_value_heads=None),
    "llama_ignores_sliding_window": dict(model_type="llama", sliding_window=5),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_json_reads_as_transformers_reads_it(name):
    """Every field against transformers' own reading of the same dict (its defaults included)."""
    raw = dict(vocab_size=50, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2) | CONFIGS[name]
    ref = transformers.AutoConfig.for_model(**raw)
    cfg = hf_config_from_dict(raw, "config.json").model
    head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads  # as Qwen2's attention
    assert head_dims(cfg) == (ref.num_attention_heads, ref.num_key_value_heads, head_dim)
    layer_types = getattr(ref, "layer_types", None)  # Qwen: a window on these layers; Mistral: on all; Llama: none
    every_layer = all(t == "sliding_attention" for t in layer_types or ["sliding_attention"])
    window = (ref.sliding_window or 0) if every_layer and raw["model_type"] != "llama" else 0
    assert cfg.sliding_window == window
    rope = ref.rope_parameters
    assert (cfg.rope_scaling if cfg.rope_scaling != "none" else "default", cfg.rope_theta) == (
        rope["rope_type"], rope["rope_theta"])
    if cfg.rope_scaling == "llama3":
        assert (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                cfg.rope_original_max_position) == (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                                                    rope["original_max_position_embeddings"])
    assert (cfg.max_position, cfg.layer_norm_eps, cfg.tie_embeddings, cfg.dropout) == (
        ref.max_position_embeddings, ref.rms_norm_eps, ref.tie_word_embeddings, 0.0)
    assert cfg.attention_bias == (raw["model_type"] == "qwen2" or getattr(ref, "attention_bias", False))


def _tiny_llama_dir(tmp_path):
    family, kwargs, _ = VARIANTS["llama_llama3_rope_untied_gqa3"]
    _torch_model("LlamaForCausalLM", _hf_config(family, kwargs)).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


ERRORS = {
    "model_type": ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]},
                   r"config\.json: model_type 'gemma' / architectures \['GemmaForCausalLM'\] not supported; "
                   r"supported: model_type .*qwen3"),
    "rope_parameters": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
                        r"config\.json: 'rope_parameters\.rope_type' is 'yarn'; supported rope types: default, "
                        r"linear, llama3"),
    "rope_scaling": ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
                     r"config\.json: 'rope_scaling\.type' is 'dynamic'; supported rope types"),
    "llama3_incomplete": ({"rope_parameters": {"rope_type": "llama3", "factor": 2.0}},
                          r"config\.json: 'rope_parameters' of rope type 'llama3' lacks 'low_freq_factor'"),
    "hidden_act": ({"hidden_act": "gelu"}, r"config\.json: 'hidden_act' is 'gelu'; .* 'silu' only"),
    "mlp_bias": ({"mlp_bias": True}, r"config\.json: 'mlp_bias' is true"),
    "kv_heads": ({"num_key_value_heads": 4}, r"config\.json: 'num_attention_heads' 6 is not a multiple of "
                                             r"'num_key_value_heads' 4"),
    "partial_sliding": ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
                         "sliding_window": 4, "max_window_layers": 1},
                        r"config\.json: 'layer_types' / 'max_window_layers' give 1 of 2 layers a sliding window"),
}


@pytest.mark.parametrize("key", sorted(ERRORS))
def test_unsupported_config_is_named(key, tmp_path):
    cfg = _tiny_llama_dir(tmp_path)
    edit, message = ERRORS[key]
    (tmp_path / "config.json").write_text(json.dumps(cfg | edit))
    with pytest.raises(JaxfoundError, match=message):
        load_hf_config(tmp_path)


def test_weight_shape_mismatch_names_file_key_and_shapes(tmp_path):
    cfg = _tiny_llama_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 81}))
    with pytest.raises(JaxfoundError, match=r"model\.safetensors: weight 'model\.layers\.0\.mlp\.gate_proj\.weight' "
                                            r"has shape \(80, 96\) but the config implies \(81, 96\)"):
        from_pretrained(tmp_path)


# ---------------------------------------------------------------- jaxfound -> transformers

ROUND_TRIPS = {
    "LlamaForCausalLM": ModelConfig(
        arch="llama", vocab_size=83, hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=80,
        max_position=64, dropout=0.0, layer_norm_eps=1e-5, activation="silu", rope_theta=200.0, rope_scaling="llama3",
        rope_factor=4.0, rope_low_freq_factor=2.0, rope_high_freq_factor=8.0, rope_original_max_position=24,
        tie_embeddings=False),
    "LlamaForCausalLM_linear_tied": ModelConfig(
        arch="llama", vocab_size=83, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=64,
        max_position=64, dropout=0.0, layer_norm_eps=1e-6, activation="silu", rope_scaling="linear", rope_factor=3.0),
    "MistralForCausalLM": ModelConfig(
        arch="llama", vocab_size=83, hidden_size=80, num_layers=2, num_heads=5, num_kv_heads=1, intermediate_size=72,
        max_position=64, dropout=0.0, layer_norm_eps=1e-6, activation="silu", sliding_window=4, tie_embeddings=False),
    "Qwen2ForCausalLM": ModelConfig(
        arch="llama", vocab_size=83, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
        max_position=64, dropout=0.0, layer_norm_eps=1e-6, activation="silu", attention_bias=True),
    "Qwen2ForCausalLM_window": ModelConfig(
        arch="llama", vocab_size=83, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
        max_position=64, dropout=0.0, layer_norm_eps=1e-6, activation="silu", attention_bias=True, sliding_window=5,
        tie_embeddings=False),
    "Qwen3ForCausalLM": ModelConfig(
        arch="llama", vocab_size=83, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=24,
        intermediate_size=96, max_position=64, dropout=0.0, layer_norm_eps=1e-6, activation="silu", qk_norm=True,
        tie_embeddings=False),
    "Qwen3ForCausalLM_bias_window": ModelConfig(
        arch="llama", vocab_size=83, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
        max_position=64, dropout=0.0, layer_norm_eps=1e-6, activation="silu", qk_norm=True, attention_bias=True,
        sliding_window=3),
}


def _random_params(model, seed=0):
    """Random params of the model's shapes: norm scales near 1, every kernel, bias and embedding near 0 (not 0)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        return (float(path[-1].key == "scale") + rng.normal(0, 0.05, leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params(model)))


def _tokenizer(vocab_size):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_save_pretrained_round_trips_through_transformers(name, tmp_path):
    cfg, cls_name = ROUND_TRIPS[name], name.split("_")[0]
    model = build_model(cfg, "lm")
    params = _random_params(model)
    save_pretrained(tmp_path, model, params)
    torch_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True)
    assert type(torch_model).__name__ == cls_name
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = _batch(cfg.vocab_size, seed=2)
    diff = _rel_diff(_ours(model, params, ids, mask), _theirs(torch_model.eval(), ids, mask), mask)
    print(f"round trip {name}: max|diff| / max|logit| = {diff:.2e}")
    assert diff <= ROUND_TRIP_TOL
    assert load_hf_config(tmp_path).model == cfg
    _, reloaded = from_pretrained(tmp_path)
    assert _params_equal(params, reloaded)


def test_save_pretrained_shards_and_writes_tokenizer_and_generation_config(tmp_path):
    cfg = ROUND_TRIPS["Qwen3ForCausalLM"]
    model = build_model(cfg, "lm")
    params = _random_params(model, seed=3)
    tok = _tokenizer(cfg.vocab_size)
    save_pretrained(tmp_path, model, params, tokenizer=tok, max_shard_bytes=25_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(params))
    assert all(sum(a.nbytes for a in load_file(tmp_path / s).values()) <= 25_000 for s in shards)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)("w5 w7")["input_ids"] == [5, 7]
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch_model.config.pad_token_id == 0
    ids, mask = _batch(cfg.vocab_size, seed=3)
    assert _rel_diff(_ours(model, params, ids, mask), _theirs(torch_model, ids, mask), mask) <= ROUND_TRIP_TOL
    _, reloaded = from_pretrained(tmp_path)
    assert _params_equal(params, reloaded)
    assert set(read_weights(tmp_path)) == set(index["weight_map"])


def test_seq_cls_round_trips_with_the_pad_id(tmp_path):
    """transformers pools the last non-pad token, ours the last token of the attention mask: the same on right pads."""
    cfg = dataclasses.replace(ROUND_TRIPS["MistralForCausalLM"], num_labels=3)
    model = build_model(cfg, "seq_cls")
    params = _random_params(model, seed=4)
    params["classifier"]["bias"] = np.zeros_like(params["classifier"]["bias"])
    save_pretrained(tmp_path, model, params, tokenizer=_tokenizer(cfg.vocab_size), id2label=["a", "b", "c"])
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    assert type(torch_model).__name__ == "MistralForSequenceClassification"
    ids, mask = _batch(cfg.vocab_size, seed=4)
    assert _rel_diff(_ours(model, params, ids, mask), _theirs(torch_model, ids, mask)) <= ROUND_TRIP_TOL
    assert load_hf_config(tmp_path).id2label == {0: "a", 1: "b", 2: "c"}


# ---------------------------------------------------------------- GGUF (SmolLM2-135M-Instruct, Q4_1)


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_gguf):
    return from_pretrained(smollm2_gguf)


def test_smollm2_gguf_logits_match_transformers(smollm2_ours, smollm2_hf, smollm2_tokenizer):
    model, params = smollm2_ours
    assert model.cfg.num_layers == 30 and model.cfg.tie_embeddings
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = np.asarray(smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"])[None]
    mask = np.ones_like(ids)
    diff = _rel_diff(_ours(model, params, ids, mask), _theirs(smollm2_hf, ids, mask))
    print(f"SmolLM2 GGUF ({ids.shape[1]} tokens): max|diff| / max|logit| = {diff:.2e}")
    assert diff <= TOL


def test_smollm2_transformers_dir_loads_like_the_gguf(smollm2_ours, smollm2_dir):
    model, params = smollm2_ours
    dir_model, dir_params = from_pretrained(smollm2_dir)
    assert dir_model.cfg == model.cfg
    assert _params_equal(params, dir_params)
