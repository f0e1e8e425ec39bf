"""The GGUF reader against transformers' own GGUF load (SmolLM2-135M Q4_1) and tiny models written as llama.cpp does."""

import json
import math

import gguf
import numpy as np
import pytest

from jaxfound.errors import JaxfoundError
from jaxfound.interop.gguf import (
    gguf_tokenizer,
    read_gguf,
    read_gguf_config,
    save_transformers_dir,
    write_transformers_dir,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT_TEXT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
               "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", "ab"]
TINY = dict(vocab_size=len(TOKENS), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def logits_of(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def relative_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------- SmolLM2 against transformers' GGUF load


@pytest.fixture(scope="module")
def smollm2_model(smollm2_gguf):
    return read_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_gguf_tokenizer(smollm2_gguf):
    return gguf_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_written(smollm2_model, smollm2_gguf_tokenizer, tmp_path_factory):
    return save_transformers_dir(smollm2_model, smollm2_gguf_tokenizer, tmp_path_factory.mktemp("smollm2_from_gguf"))


def test_smollm2_tensors_equal_transformers_gguf_load(smollm2_model, smollm2_hf):
    reference = {k: v.numpy() for k, v in smollm2_hf.state_dict().items()}
    assert smollm2_model.config["tie_word_embeddings"] and "lm_head.weight" not in smollm2_model.tensors
    assert np.array_equal(reference.pop("lm_head.weight"), reference["model.embed_tokens.weight"])  # tied
    assert smollm2_model.tensors.keys() == reference.keys()
    assert len(reference) == 2 + 9 * 30  # embed_tokens, norm, 9 per layer
    for name, ref in reference.items():
        ours = smollm2_model.tensors[name]
        assert ours.dtype == np.float32 and ours.shape == ref.shape, name
        assert np.abs(ours - ref).max() <= 1e-6, name
    assert smollm2_model.tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert smollm2_model.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (3 * 64, 576)  # (out, in)
    assert smollm2_model.tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


def test_smollm2_config_matches_transformers(smollm2_model, smollm2_hf):
    ours, ref = smollm2_model.config, smollm2_hf.config
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "model_type")
    assert {k: ours[k] for k in keys} == {k: getattr(ref, k) for k in keys}
    assert ours["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert ours["rope_scaling"] is None and ref.rope_parameters["rope_type"] == "default"
    assert (ours["num_hidden_layers"], ours["hidden_size"], ours["num_attention_heads"], ours["num_key_value_heads"]) \
        == (30, 576, 9, 3)  # the model card
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["attention_bias"] is False


def test_smollm2_tokenizer_encodes_chat_like_transformers(smollm2_gguf_tokenizer, smollm2_tokenizer, smollm2_written):
    reloaded = transformers.AutoTokenizer.from_pretrained(smollm2_written)
    ids = {name: list(tok.apply_chat_template(PROMPT, add_generation_prompt=True)["input_ids"])
           for name, tok in [("ours", smollm2_gguf_tokenizer), ("transformers", smollm2_tokenizer),
                             ("written dir", reloaded)]}
    assert ids["ours"] == ids["transformers"] == ids["written dir"]
    assert smollm2_gguf_tokenizer.decode(ids["ours"]) == PROMPT_TEXT
    assert ids["ours"][0] == 1 and ids["ours"].count(2) == 2  # <|im_start|>, <|im_end|>
    assert "<|im_start|>" in smollm2_gguf_tokenizer.chat_template
    assert reloaded.chat_template == smollm2_gguf_tokenizer.chat_template


def test_smollm2_written_dir_logits_equal_gguf_reference(smollm2_written, smollm2_hf, smollm2_tokenizer):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_written).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and next(model.parameters()).dtype == torch.float32
    ids = smollm2_tokenizer("The capital of France is")["input_ids"]
    ours, ref = logits_of(model, ids), logits_of(smollm2_hf, ids)
    assert relative_diff(ours, ref) <= 1e-5
    generation = json.loads((smollm2_written / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


# ---------------------------------------------------------------- tiny models written the way llama.cpp writes them


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute: interleave the rotary halves of each head's rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch: str, config: dict, tensors: dict[str, np.ndarray], permute: bool,
               extra_tensors: dict[str, np.ndarray] | None = None, skip=()):
    """A GGUF as llama.cpp's converter writes it from transformers tensors (its own tensor-name map)."""
    writer = gguf.GGUFWriter(str(path), arch)
    add = {"block_count": config["num_hidden_layers"], "context_length": config["max_position_embeddings"],
           "embedding_length": config["hidden_size"], "feed_forward_length": config["intermediate_size"],
           "head_count": config["num_attention_heads"], "head_count_kv": config["num_key_value_heads"],
           "layer_norm_rms_eps": config["rms_norm_eps"], "rope_freq_base": config.get("rope_theta", 10000.0),
           "key_length": config.get("head_dim"), "bos_token_id": 1, "eos_token_id": 2,
           "tokenizer_model": "gpt2", "tokenizer_pre": "default", "token_list": TOKENS,
           "token_types": [3, 3, 3] + [1] * (len(TOKENS) - 3), "token_merges": ["a b"],
           "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"}
    if config.get("rope_scaling"):
        add |= {"rope_scaling_type": gguf.RopeScalingType(config["rope_scaling"]["rope_type"]),
                "rope_scaling_factor": config["rope_scaling"]["factor"]}
    for key, value in add.items():
        if key not in skip and value is not None:
            getattr(writer, f"add_{key}")(value)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for name, w in tensors.items():
        proj = name.split(".")[-2]
        w = llama_cpp_permute(w, heads[proj]) if permute and proj in heads else w
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), w)
    for name, w in (extra_tensors or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model(model_class: str, **config):
    """A tiny transformers model with weights large enough that a misplaced row shows in the logits."""
    torch.manual_seed(0)
    cfg = getattr(transformers, model_class.replace("ForCausalLM", "Config"))(**TINY | config)
    model = getattr(transformers, model_class)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))  # norms near 1
    return model


def tensors_of(model) -> dict[str, np.ndarray]:
    tied = model.config.tie_word_embeddings
    return {k: v.numpy().copy() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


@pytest.mark.parametrize("arch, model_class, config", [
    ("llama", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    ("llama", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    ("qwen2", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    ("qwen3", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=32)),
])
def test_tiny_gguf_written_dir_logits_equal_original(tmp_path, arch, model_class, config):
    original = tiny_model(model_class, **config)
    file = write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, TINY | config, tensors_of(original),
                      permute=arch == "llama")
    out = write_transformers_dir(file, tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    assert written.pop("torch_dtype") == "float32" and written == read_gguf_config(file)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == model_class
    assert loaded.config.tie_word_embeddings == config["tie_word_embeddings"]
    ids = [1, 3, 4, 5, 30, 29, 6, 2, 7, 8, 9, 10]
    ours, ref = logits_of(loaded, ids), logits_of(original, ids)
    assert relative_diff(ours, ref) <= 1e-5
    assert np.abs(ref).max() > 1.0  # the weights are not the tiny init: a permuted row would show
    assert transformers.AutoTokenizer.from_pretrained(out)("ab c")["input_ids"] == [30, 29, 5]


def test_reader_undoes_llama_cpp_qk_row_order(tmp_path):
    # hand-computed: a head of 8 rows is stored [0, 4, 1, 5, 2, 6, 3, 7] (the two rows of one rotation side by side)
    stored = [0, 4, 1, 5, 2, 6, 3, 7]
    q_rows, k_rows = np.arange(16, dtype=np.float32), np.arange(8, dtype=np.float32)  # 2 heads, 1 kv head
    tensors = tensors_of(tiny_model("LlamaForCausalLM", tie_word_embeddings=True))
    q_stored = stored + [8 + r for r in stored]
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = np.repeat(q_rows[q_stored, None], 16, 1)
        tensors[f"model.layers.{i}.self_attn.k_proj.weight"] = np.repeat(k_rows[stored, None], 16, 1)
    read = read_gguf(write_gguf(tmp_path / "rows.gguf", "llama", TINY, tensors, permute=False)).tensors
    assert np.array_equal(read["model.layers.1.self_attn.q_proj.weight"], np.repeat(q_rows[:, None], 16, 1))
    assert np.array_equal(read["model.layers.1.self_attn.k_proj.weight"], np.repeat(k_rows[:, None], 16, 1))
    assert np.array_equal(read["model.layers.0.self_attn.v_proj.weight"],
                          tensors["model.layers.0.self_attn.v_proj.weight"])  # V is never permuted
    assert "lm_head.weight" not in read


def test_f16_tensor_is_dequantized(tmp_path):
    tensors = tensors_of(tiny_model("LlamaForCausalLM", tie_word_embeddings=True))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].astype(np.float16)
    read = read_gguf(write_gguf(tmp_path / "f16.gguf", "llama", TINY, tensors, permute=True)).tensors
    assert read["model.embed_tokens.weight"].dtype == np.float32
    assert np.array_equal(read["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"].astype(np.float32))


def llama3_divisors(head_dim, theta, factor, low, high, old_len):
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors: rope_freqs of "llama3" rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_rope_freqs_become_llama3_rope_scaling(tmp_path):
    # Llama 3.2's parameters with head_dim 64
    config = TINY | dict(hidden_size=128, rope_theta=500000.0, max_position_embeddings=131072)
    model = tiny_model("LlamaForCausalLM", hidden_size=128, tie_word_embeddings=True)
    freqs = {"rope_freqs.weight": llama3_divisors(64, 500000.0, 32.0, 1.0, 4.0, 8192)}
    file = write_gguf(tmp_path / "llama3.gguf", "llama", config, tensors_of(model), True, extra_tensors=freqs)
    read = read_gguf(file)
    assert read.config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in read.tensors and read.config["head_dim"] == 64
    assert read_gguf_config(file) == read.config


# ---------------------------------------------------------------- errors


def test_missing_file_names_it(tmp_path):
    with pytest.raises(JaxfoundError, match="nope.gguf: not found"):
        read_gguf(tmp_path / "nope.gguf")


def test_non_gguf_file_names_it(tmp_path):
    (tmp_path / "notes.gguf").write_text("not a model\n")
    with pytest.raises(JaxfoundError, match=r"notes\.gguf: not a readable GGUF file"):
        read_gguf(tmp_path / "notes.gguf")


def test_unknown_architecture_names_it_and_the_supported(tmp_path):
    file = write_gguf(tmp_path / "falcon.gguf", "falcon", TINY, {}, permute=False)
    with pytest.raises(JaxfoundError, match=r"falcon\.gguf: general\.architecture 'falcon' is not supported; "
                                            r"supported: \['llama', 'mistral', 'qwen2', 'qwen3'\]"):
        read_gguf(file)


def test_missing_metadata_key_names_it(tmp_path):
    tensors = tensors_of(tiny_model("LlamaForCausalLM", tie_word_embeddings=True))
    file = write_gguf(tmp_path / "nolayers.gguf", "llama", TINY, tensors, permute=True, skip=("block_count",))
    with pytest.raises(JaxfoundError, match=r"nolayers\.gguf: metadata key llama\.block_count is missing"):
        read_gguf(file)


def test_missing_tensor_names_it(tmp_path):
    tensors = tensors_of(tiny_model("LlamaForCausalLM", tie_word_embeddings=True))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    file = write_gguf(tmp_path / "holes.gguf", "llama", TINY, tensors, permute=True)
    with pytest.raises(JaxfoundError, match=r"holes\.gguf: 1 tensors .*model\.layers\.1\.mlp\.up_proj\.weight"):
        read_gguf(file)


def test_tensor_type_without_dequantize_names_tensor_and_type(tmp_path):
    tensors = tensors_of(tiny_model("LlamaForCausalLM", tie_word_embeddings=True))
    tensors["model.layers.0.post_attention_layernorm.weight"] = np.arange(16, dtype=np.int32)
    file = write_gguf(tmp_path / "ints.gguf", "llama", TINY, tensors, permute=True)
    with pytest.raises(JaxfoundError, match=r"ints\.gguf: tensor blk\.0\.ffn_norm\.weight has type I32"):
        read_gguf(file)


@pytest.mark.parametrize("arch, model_class", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_int8_params_streamed_from_a_q8_0_gguf_equal_quantizing_its_float_params(tmp_path, arch, model_class):
    from jaxfound.interop.hf import from_pretrained
    from jaxfound.interop.int8_import import int8_from_pretrained
    from jaxfound.quant.checkpoint import flatten
    from jaxfound.quant.int8 import quantize, quantize_tied_embedding

    config = TINY | dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=True)
    tensors = tensors_of(tiny_model(model_class, **config))
    q8 = gguf.GGMLQuantizationType.Q8_0
    quantized = {k: v for k, v in tensors.items() if v.ndim == 2}  # every matrix as llama.cpp's Q8_0 blocks

    class Q8Writer(gguf.GGUFWriter):
        def add_tensor(self, name, tensor, *args, **kwargs):
            if tensor.ndim == 2 and tensor.dtype == np.float32:
                return super().add_tensor(name, gguf.quants.quantize(tensor, q8), raw_dtype=q8)
            return super().add_tensor(name, tensor, *args, **kwargs)

    original, gguf.GGUFWriter = gguf.GGUFWriter, Q8Writer
    try:
        file = write_gguf(tmp_path / f"q8-{arch}.gguf", arch, config, tensors, permute=arch == "llama")
    finally:
        gguf.GGUFWriter = original
    reader = gguf.GGUFReader(file)
    assert sum(t.tensor_type == q8 for t in reader.tensors) == len(quantized)
    _, params = from_pretrained(file)  # the float route: every tensor dequantized, then quantized
    want = flatten(quantize_tied_embedding(quantize(params), "llama"))  # Qwen2 is a jaxfound Llama
    _, streamed = int8_from_pretrained(file)  # one tensor at a time
    got = flatten(streamed)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
    assert got["llama/word/embedding"].dtype == np.int8 and got["llama/word/lookup"].dtype == np.float16
    assert got["llama/layer_0/attention/query/kernel"].dtype == np.int8
