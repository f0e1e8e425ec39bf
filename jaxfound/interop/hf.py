"""Hugging Face transformers <-> jaxfound: load a local BERT / RoBERTa / GPT-2 / Llama-family directory (or a
llama.cpp GGUF file), save one transformers loads unchanged.

    model, params = from_pretrained("path/to/hf_dir")          # head from config.json "architectures"
    model, params = from_pretrained("SmolLM2-135M.gguf")       # GGUF: dequantised to float32 (interop.gguf)
    info = load_hf_config("path/to/hf_dir")                     # ModelConfig, head, id2label
    save_pretrained("out_dir", model, params, tokenizer=tok, id2label={0: "O", 1: "B-PER"})

Llama, Mistral, Qwen2 and Qwen3 (model_type llama / mistral / qwen2 / qwen3) all load into jaxfound's Llama decoder;
RoBERTa and XLM-RoBERTa (model_type roberta / xlm-roberta: the same modelling code and weight names in transformers)
into the BERT encoder's RoBERTa variant, saved back as model_type roberta.
Weights are read from ``model.safetensors`` (or its sharded index); ``pytorch_model.bin`` only through
``torch.load(weights_only=True)``, so nothing is ever unpickled. torch kernels are (out, in), ours (in, out);
GPT-2's Conv1D already is (in, out) and its fused ``c_attn`` is split into query / key / value.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxfound.config import ModelConfig
from jaxfound.errors import JaxfoundError
from jaxfound.interop.gguf import read_gguf, read_gguf_config
from jaxfound.models import abstract_params, build_model
from jaxfound.models.llama import head_dims
from jaxfound.models.scan import unstack_layers

# model_type -> jaxfound arch
MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "gpt2": "gpt", "llama": "llama",
               "mistral": "llama", "qwen2": "llama", "qwen3": "llama"}
LLAMA_CLASSES = {"none": "Model", "lm": "ForCausalLM", "token_cls": "ForTokenClassification",
                 "seq_cls": "ForSequenceClassification"}
# (model_type, head) -> transformers class
CLASS_FOR = {
    ("bert", "none"): "BertModel",
    ("bert", "mlm"): "BertForMaskedLM",
    ("bert", "token_cls"): "BertForTokenClassification",
    ("bert", "seq_cls"): "BertForSequenceClassification",
    **{(model_type, head): family + suffix
       for model_type, family in (("roberta", "Roberta"), ("xlm-roberta", "XLMRoberta"))
       for head, suffix in (("none", "Model"), ("mlm", "ForMaskedLM"), ("token_cls", "ForTokenClassification"),
                            ("seq_cls", "ForSequenceClassification"))},
    ("gpt2", "none"): "GPT2Model",
    ("gpt2", "lm"): "GPT2LMHeadModel",
    ("gpt2", "token_cls"): "GPT2ForTokenClassification",
    ("gpt2", "seq_cls"): "GPT2ForSequenceClassification",
    **{(model_type, head): family + suffix
       for model_type, family in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"))
       for head, suffix in LLAMA_CLASSES.items()},
}
CLASS_MODEL_TYPE = {cls: model_type for (model_type, _), cls in CLASS_FOR.items()}
# transformers class -> (jaxfound arch, head)
ARCHITECTURES = {cls: (MODEL_TYPES[model_type], head) for (model_type, head), cls in CLASS_FOR.items()}
HEADS = {"bert": ("none", "mlm", "token_cls", "seq_cls"), "roberta": ("none", "mlm", "token_cls", "seq_cls"),
         "gpt": ("none", "lm", "token_cls", "seq_cls"),
         "llama": ("none", "lm", "token_cls", "seq_cls")}
TRUNK_PREFIX = {"bert": "bert.", "roberta": "roberta.", "gpt": "transformer.", "llama": "model."}
WORD_EMBEDDING = {"bert": "embeddings.word_embeddings.weight", "roberta": "embeddings.word_embeddings.weight",
                  "gpt": "wte.weight", "llama": "embed_tokens.weight"}
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
                  "relu": "relu"}
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu"}
ROPE_TYPES = ("default", "linear", "llama3")
MISTRAL_WINDOW = 4096  # MistralConfig's sliding_window when config.json has none (null means no window)
MAX_POSITION = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768}  # transformers' defaults
# checkpoint entries that carry no information for jaxfound: buffers, tied copies, heads we do not build
HARMLESS = re.compile(r"(position_ids|token_type_ids|\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$"
                      r"|^pooler\.|^cls\.seq_relationship\.|^cls\.predictions\.decoder\.bias$|^lm_head\.decoder\.bias$")
TIED_COPIES = ("cls.predictions.decoder.weight", "lm_head.weight", "lm_head.decoder.weight")


@dataclass(frozen=True)
class HFConfig:
    """What a transformers config.json means for jaxfound."""

    model: ModelConfig
    head: str  # 'none', 'mlm', 'lm', 'token_cls' or 'seq_cls'
    architecture: str  # the transformers class name, e.g. 'BertForTokenClassification'
    id2label: dict[int, str]  # label names of classification heads ({} otherwise)
    pad_token_id: int | None = None


# ---------------------------------------------------------------- config


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise JaxfoundError(f"{file}: not found; a transformers directory needs config.json and model.safetensors")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise JaxfoundError(f"{file}: not valid JSON ({e})") from e


def _get(hf: dict, source: str, *keys, default=None):
    for k in keys:
        if k in hf:
            return hf[k]
    if default is None:
        raise JaxfoundError(f"{source}: missing key '{keys[0]}'")
    return default


def _activation(name: str, source: str, key: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise JaxfoundError(f"{source}: '{key}' is {name!r}; supported: {', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def _bert_config(hf: dict, source: str, common: dict, arch: str = "bert") -> ModelConfig:
    """BERT, or RoBERTa (arch 'roberta': one token type and 514 positions by default, positions after pad_token_id)."""
    roberta = arch == "roberta"
    pad = hf.get("pad_token_id")
    extra = {"pad_token_id": 1 if pad is None else int(pad)} if roberta else {}
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise JaxfoundError(f"{source}: position_embedding_type {hf['position_embedding_type']!r} not supported; "
                            "only 'absolute'")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise JaxfoundError(f"{source}: is_decoder / add_cross_attention must be false for a BERT encoder")
    return ModelConfig(
        arch=arch, hidden_size=int(_get(hf, source, "hidden_size")),
        num_layers=int(_get(hf, source, "num_hidden_layers")), num_heads=int(_get(hf, source, "num_attention_heads")),
        intermediate_size=int(_get(hf, source, "intermediate_size")),
        max_position=int(_get(hf, source, "max_position_embeddings", default=514 if roberta else 512)),
        type_vocab_size=int(_get(hf, source, "type_vocab_size", default=1 if roberta else 2)),
        dropout=float(_get(hf, source, "hidden_dropout_prob", default=0.1)),
        layer_norm_eps=float(_get(hf, source, "layer_norm_eps", default=1e-12)),
        activation=_activation(_get(hf, source, "hidden_act", default="gelu"), source, "hidden_act"), **extra, **common)


def _gpt_config(hf: dict, source: str, common: dict) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise JaxfoundError(f"{source}: scale_attn_by_inverse_layer_idx must be false and scale_attn_weights true")
    if not hf.get("tie_word_embeddings", True):
        raise JaxfoundError(f"{source}: tie_word_embeddings is false; jaxfound's GPT-2 LM head is tied")
    hidden = int(_get(hf, source, "n_embd", "hidden_size"))
    return ModelConfig(
        arch="gpt", hidden_size=hidden, num_layers=int(_get(hf, source, "n_layer", "num_hidden_layers")),
        num_heads=int(_get(hf, source, "n_head", "num_attention_heads")),
        intermediate_size=int(hf.get("n_inner") or 4 * hidden),
        max_position=int(_get(hf, source, "n_positions", "max_position_embeddings", default=1024)),
        dropout=float(_get(hf, source, "resid_pdrop", default=0.1)),
        layer_norm_eps=float(_get(hf, source, "layer_norm_epsilon", default=1e-5)),
        activation=_activation(_get(hf, source, "activation_function", default="gelu_new"), source,
                               "activation_function"), **common)


def _rope(hf: dict, source: str) -> dict:
    """ModelConfig's rope fields from 'rope_parameters' (transformers 5) or 'rope_theta' + 'rope_scaling' (before)."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    type_key = f"{key}.{'type' if 'rope_type' not in params and 'type' in params else 'rope_type'}"
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise JaxfoundError(f"{source}: '{type_key}' is {kind!r}; supported rope types: {', '.join(ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise JaxfoundError(f"{source}: 'partial_rotary_factor' is {partial}; jaxfound rotates whole heads (1.0)")
    out = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "default":
        return out
    needed = ("factor",) if kind == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    for k in needed:
        if params.get(k) is None:
            raise JaxfoundError(f"{source}: '{key}' of rope type {kind!r} lacks '{k}' (needs {', '.join(needed)})")
    out |= {"rope_scaling": kind, "rope_factor": float(params["factor"])}
    if kind == "llama3":
        out |= {"rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"]),
                "rope_original_max_position": int(params["original_max_position_embeddings"])}
    return out


def _sliding_window(hf: dict, source: str, model_type: str, num_layers: int) -> int:
    """Mistral slides on every layer; Qwen2 / Qwen3 only with use_sliding_window, on the layers layer_types says."""
    window = int(hf.get("sliding_window", MISTRAL_WINDOW if model_type == "mistral" else None) or 0)
    if model_type == "mistral" or not window:
        return window
    if model_type == "llama" or not hf.get("use_sliding_window"):
        return 0
    first = int(hf.get("max_window_layers", 28))  # transformers' default
    kinds = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                      for i in range(num_layers)]
    sliding = sum(k == "sliding_attention" for k in kinds)
    if 0 < sliding < len(kinds):
        raise JaxfoundError(f"{source}: 'layer_types' / 'max_window_layers' give {sliding} of {len(kinds)} layers a "
                            "sliding window; jaxfound applies the window to every layer or to none")
    return window if sliding else 0


def _llama_config(hf: dict, source: str, model_type: str, common: dict) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise JaxfoundError(f"{source}: 'hidden_act' is {act!r}; the Llama family's SwiGLU MLP supports 'silu' only")
    if hf.get("mlp_bias"):
        raise JaxfoundError(f"{source}: 'mlp_bias' is true; jaxfound's Llama MLP has no biases (supported: false)")
    hidden, heads = int(_get(hf, source, "hidden_size")), int(_get(hf, source, "num_attention_heads"))
    num_layers = int(_get(hf, source, "num_hidden_layers"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise JaxfoundError(f"{source}: 'num_attention_heads' {heads} is not a multiple of 'num_key_value_heads' "
                            f"{kv_heads}")
    head_dim = int(hf.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads))
    # Qwen2 always has q/k/v biases; Llama / Qwen3 when attention_bias (then o_proj has one too); Mistral never
    bias = model_type == "qwen2" or (model_type != "mistral" and bool(hf.get("attention_bias", False)))
    return ModelConfig(
        arch="llama", hidden_size=hidden, num_layers=num_layers, num_heads=heads,
        num_kv_heads=0 if kv_heads == heads else kv_heads, head_dim=0 if head_dim == hidden // heads else head_dim,
        intermediate_size=int(_get(hf, source, "intermediate_size")),
        max_position=int(hf.get("max_position_embeddings") or MAX_POSITION[model_type]), dropout=0.0,
        layer_norm_eps=float(hf.get("rms_norm_eps") or 1e-6), activation="silu", **_rope(hf, source),
        attention_bias=bias, qk_norm=model_type == "qwen3",
        sliding_window=_sliding_window(hf, source, model_type, num_layers),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **common)


def hf_config_from_dict(hf: dict, source: str, head: str | None = None) -> HFConfig:
    """A transformers config dict as a ModelConfig, the head (given, or from "architectures") and label names.

    source: where the dict came from (config.json, a .gguf file), named in every error.
    """
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    if model_type not in MODEL_TYPES:
        if not known:
            raise JaxfoundError(f"{source}: model_type {model_type!r} / architectures {archs} not supported; "
                                f"supported: model_type {', '.join(MODEL_TYPES)}, architectures "
                                f"{', '.join(ARCHITECTURES)}")
        model_type = CLASS_MODEL_TYPE[known[0]]
    arch = MODEL_TYPES[model_type]
    if head is None:
        heads = [ARCHITECTURES[a][1] for a in known if ARCHITECTURES[a][0] == arch]
        head = heads[0] if heads else "none"
    if head not in HEADS[arch]:
        raise JaxfoundError(f"head {head!r} is not available for {model_type}; choose one of {', '.join(HEADS[arch])}")
    id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
    num_labels = len(id2label) or int(hf.get("num_labels", 2))
    if head in ("token_cls", "seq_cls") and not id2label:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    common = dict(vocab_size=int(_get(hf, source, "vocab_size")),
                  num_labels=num_labels if head in ("token_cls", "seq_cls") else 0)
    if arch == "llama":
        cfg = _llama_config(hf, source, model_type, common)
    elif arch == "gpt":
        cfg = _gpt_config(hf, source, common)
    else:
        cfg = _bert_config(hf, source, common, arch)
    if arch != "llama":
        if cfg.hidden_size % cfg.num_heads:
            raise JaxfoundError(f"{source}: hidden size {cfg.hidden_size} is not divisible by {cfg.num_heads} heads")
    return HFConfig(cfg, head, CLASS_FOR[(model_type, head)], id2label, hf.get("pad_token_id"))


def _is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def load_hf_config(path, head: str | None = None) -> HFConfig:
    """Read ``path/config.json`` (or a .gguf file's metadata) into a ModelConfig, the head and label names."""
    path = Path(path)
    if _is_gguf(path):
        return hf_config_from_dict(read_gguf_config(path), str(path), head)
    file = path / "config.json"
    return hf_config_from_dict(_read_json(file), str(file), head)


# ---------------------------------------------------------------- name mapping


def _linear(hf: str, ours: tuple, transpose=True):
    return [(f"{hf}.weight", (ours + ("kernel",),), "T" if transpose else "copy"),
            (f"{hf}.bias", (ours + ("bias",),), "copy")]


def _ln(hf: str, ours: tuple):
    return [(f"{hf}.weight", (ours + ("scale",),), "copy"), (f"{hf}.bias", (ours + ("bias",),), "copy")]


def _bert_entries(cfg: ModelConfig, head: str):
    """BERT's names, or RoBERTa's (the same trunk; heads lm_head / classifier.dense + classifier.out_proj)."""
    t = (cfg.arch,)
    out = [("embeddings.word_embeddings.weight", (t + ("word", "embedding"),), "copy"),
           ("embeddings.position_embeddings.weight", (t + ("position", "embedding"),), "copy"),
           ("embeddings.token_type_embeddings.weight", (t + ("token_type", "embedding"),), "copy"),
           *_ln("embeddings.LayerNorm", t + ("embed_ln",))]
    for i in range(cfg.num_layers):
        hf, ours = f"encoder.layer.{i}.", t + (f"layer_{i}",)
        for name in ("query", "key", "value"):
            out += _linear(f"{hf}attention.self.{name}", ours + ("attention", name))
        out += _linear(f"{hf}attention.output.dense", ours + ("attention", "out"))
        out += _ln(f"{hf}attention.output.LayerNorm", ours + ("attention_ln",))
        out += _linear(f"{hf}intermediate.dense", ours + ("mlp", "up"))
        out += _linear(f"{hf}output.dense", ours + ("mlp", "down"))
        out += _ln(f"{hf}output.LayerNorm", ours + ("mlp_ln",))
    if cfg.arch == "roberta":
        if head == "mlm":
            out += _linear("lm_head.dense", ("transform",)) + _ln("lm_head.layer_norm", ("transform_ln",))
            out += [("lm_head.bias", (("mlm_bias",),), "copy")]
        if head == "seq_cls":
            out += _linear("classifier.dense", ("pooler",)) + _linear("classifier.out_proj", ("classifier",))
        if head == "token_cls":
            out += _linear("classifier", ("classifier",))
        return out
    if head == "mlm":
        out += _linear("cls.predictions.transform.dense", ("transform",))
        out += _ln("cls.predictions.transform.LayerNorm", ("transform_ln",))
        out += [("cls.predictions.bias", (("mlm_bias",),), "copy")]
    if head == "seq_cls":
        out += _linear("pooler.dense", ("pooler",))
    if head in ("token_cls", "seq_cls"):
        out += _linear("classifier", ("classifier",))
    return out


def _gpt_entries(cfg: ModelConfig, head: str):
    t = ("gpt",)
    out = [("wte.weight", (t + ("word", "embedding"),), "copy"),
           ("wpe.weight", (t + ("position", "embedding"),), "copy")]
    for i in range(cfg.num_layers):
        hf, ours = f"h.{i}.", t + (f"layer_{i}",)
        qkv = tuple(ours + ("attention", n) for n in ("query", "key", "value"))
        out += _ln(f"{hf}ln_1", ours + ("ln_1",))
        out += [(f"{hf}attn.c_attn.weight", tuple(p + ("kernel",) for p in qkv), "split3"),
                (f"{hf}attn.c_attn.bias", tuple(p + ("bias",) for p in qkv), "split3")]
        out += _linear(f"{hf}attn.c_proj", ours + ("attention", "out"), transpose=False)
        out += _ln(f"{hf}ln_2", ours + ("ln_2",))
        out += _linear(f"{hf}mlp.c_fc", ours + ("mlp", "up"), transpose=False)
        out += _linear(f"{hf}mlp.c_proj", ours + ("mlp", "down"), transpose=False)
    out += _ln("ln_f", t + ("ln_f",))
    if head == "token_cls":
        out += _linear("classifier", ("classifier",))
    if head == "seq_cls":  # transformers' score layer has no bias; ours stays zero
        out += [("score.weight", (("classifier", "kernel"),), "T")]
    return out


def _llama_entries(cfg: ModelConfig, head: str, model_type: str):
    t = ("llama",)
    out = [("embed_tokens.weight", (t + ("word", "embedding"),), "copy"),
           ("norm.weight", (t + ("norm", "scale"),), "copy")]
    for i in range(cfg.num_layers):
        hf, ours = f"layers.{i}.", t + (f"layer_{i}",)
        out += [(f"{hf}input_layernorm.weight", (ours + ("input_norm", "scale"),), "copy"),
                (f"{hf}post_attention_layernorm.weight", (ours + ("post_attention_norm", "scale"),), "copy")]
        for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out += _linear(f"{hf}self_attn.{proj}", ours + ("attention", name))[:1 + cfg.attention_bias]
        out += [(f"{hf}self_attn.o_proj.weight", (ours + ("attention", "out", "kernel"),), "T")]
        if cfg.attention_bias and model_type in ("llama", "qwen3"):  # their attention_bias covers o_proj too
            out += [(f"{hf}self_attn.o_proj.bias", (ours + ("attention", "out", "kernel"),), "zero")]
        if cfg.qk_norm:
            out += [(f"{hf}self_attn.{n}.weight", (ours + ("attention", n, "scale"),), "copy")
                    for n in ("q_norm", "k_norm")]
        out += [(f"{hf}mlp.{n}_proj.weight", (ours + ("mlp", n, "kernel"),), "T") for n in ("gate", "up", "down")]
    if head == "lm" and not cfg.tie_embeddings:
        out += [("lm_head.weight", (("lm_head", "kernel"),), "T")]
    if head == "token_cls":
        out += _linear("score", ("classifier",))
    if head == "seq_cls":  # transformers' score layer has no bias; ours stays zero
        out += [("score.weight", (("classifier", "kernel"),), "T")]
    return out


def _entries(cfg: ModelConfig, head: str, model_type: str):
    """(transformers name without the trunk prefix, our param paths, conversion) for every HF tensor.

    Conversions: 'copy', 'T' (transpose), 'split3' (GPT-2's fused q/k/v), 'zero' (a bias jaxfound lacks, so it must
    be zero; the path names the kernel whose output size it has).
    """
    if cfg.arch == "llama":
        return _llama_entries(cfg, head, model_type)
    return (_gpt_entries if cfg.arch == "gpt" else _bert_entries)(cfg, head)


def _normalise(name: str, arch: str) -> str:
    """'bert.embeddings.LayerNorm.gamma' -> 'embeddings.LayerNorm.weight' (old names, trunk prefix dropped)."""
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    prefix = TRUNK_PREFIX[arch]
    return name[len(prefix):] if name.startswith(prefix) else name


def _is_trunk(name: str) -> bool:
    return not name.startswith(("cls.", "classifier.", "score.", "lm_head."))


# ---------------------------------------------------------------- weights on disk


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:

    try:
        with safe_open(str(file), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (TypeError, ValueError):  # bfloat16 has no numpy dtype: go through torch
        import torch

        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k).to(torch.float32).numpy() for k in f.keys()}


def weights_file(path) -> Path:
    """The file that holds a transformers directory's weights: model.safetensors, its shard index or a .bin."""
    path = Path(path)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    raise JaxfoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def read_weights(path) -> dict[str, np.ndarray]:
    """All tensors of a transformers directory by name: safetensors (single or sharded), else a weights-only .bin;
    or of a .gguf file, dequantised, with transformers' names and layouts."""
    path = Path(path)
    if _is_gguf(path):
        return read_gguf(path).tensors
    file = weights_file(path)
    if file.name == "model.safetensors":
        return _read_safetensors(file)
    if file.name == "model.safetensors.index.json":
        shards = sorted(set(_read_json(file).get("weight_map", {}).values()))
        return {k: v for shard in shards for k, v in _read_safetensors(path / shard).items()}
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors: never fall back to unpickling
        raise JaxfoundError(f"{file}: not a plain weights file ({e})") from e
    return {k: v.to(torch.float32).numpy() for k, v in state.items()}


# ---------------------------------------------------------------- load


def _set(tree: dict, path: tuple, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _lookup(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _to_ours(arr: np.ndarray, kind: str) -> list[np.ndarray]:
    if kind == "T":
        return [arr.T]
    if kind == "split3":
        return np.split(arr, 3, axis=-1)
    return [arr]


def _expected_shapes(shapes: dict, ours: tuple, kind: str) -> list[tuple]:
    expect = [tuple(_lookup(shapes, p).shape) for p in ours]
    return [expect[0][-1:]] if kind == "zero" else expect


def _torch_shape(expect: list[tuple], kind: str) -> tuple:
    """The transformers tensor shape that our param shapes `expect` imply."""
    if kind == "split3":
        return expect[0][:-1] + (3 * expect[0][-1],)
    return expect[0][::-1] if kind == "T" else expect[0]


def params_from_weights(info: HFConfig, raw: Mapping[str, np.ndarray], source: str,
                        convert: Callable | None = None) -> tuple[nn.Module, dict]:
    """(model, params) from transformers-named tensors (torch layouts) and what their config means.

    source: where the tensors came from, named in every error. raw is read one tensor at a time, each once (a lazy
    mapping, gguf.LazyTensors, then never holds the model in float32). convert(path, array) -> {name: array} | None:
    what to store in place of param ``path`` (a tuple) in its parent, e.g. an int8 kernel and its scale
    (interop.int8_import); None stores the array.
    """
    cfg, head = info.model, info.head
    model = build_model(cfg, head)
    shapes = nn.unbox(abstract_params(model))
    stored_name = {}  # normalised name -> the name in raw (the first one, where names normalise alike)
    for name in raw:  # names only: a lazy mapping reads a tensor when it is looked up
        stored_name.setdefault(_normalise(name, cfg.arch), name)
    state = stored_name
    params, missing, used = {}, [], set()
    for hf_name, ours, kind in _entries(cfg, head, CLASS_MODEL_TYPE[info.architecture]):
        if hf_name not in state:
            missing.append(hf_name)
            continue
        used.add(hf_name)
        arr = np.asarray(raw[state[hf_name]], dtype=np.float32)
        expect = _expected_shapes(shapes, ours, kind)
        parts = _to_ours(arr, kind) if kind != "split3" or arr.shape[-1] % 3 == 0 else [arr]
        if [p.shape for p in parts] != expect:
            raise JaxfoundError(
                f"{source}: weight '{stored_name[hf_name]}' has shape {tuple(arr.shape)} but the config implies "
                f"{_torch_shape(expect, kind)} (jaxfound param '{'/'.join(ours[0])}' {expect[0]}); check vocab_size, "
                "hidden_size, intermediate_size, the head counts and head_dim, max_position_embeddings, "
                "type_vocab_size and num_labels / id2label")
        if kind == "zero":
            if np.any(arr):
                raise JaxfoundError(f"{source}: weight '{stored_name[hf_name]}' is non-zero, but jaxfound has no "
                                    "such bias (its Llama's attention_bias covers query / key / value only)")
            continue
        for p, part in zip(ours, parts):
            converted = convert(p, part) if convert is not None else None
            if converted is None:
                _set(params, p, jnp.asarray(part))
            for name, value in (converted or {}).items():
                _set(params, (*p[:-1], name), value)
        del arr, parts
    if missing:
        raise JaxfoundError(f"{source}: {len(missing)} weights needed for {info.architecture} (head {head!r}) are "
                            f"missing: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if cfg.arch in ("gpt", "llama") and head == "seq_cls":
        _set(params, ("classifier", "bias"), jnp.zeros((cfg.num_labels,), jnp.float32))
    tied = cfg.arch != "llama" or cfg.tie_embeddings
    copies = [c for c in TIED_COPIES if tied and c in state]
    word = raw[state[WORD_EMBEDDING[cfg.arch]]] if copies else None
    for copy in copies:
        other = raw[state[copy]]
        if other.shape != word.shape or not np.allclose(other, word):
            raise JaxfoundError(f"{source}: '{copy}' differs from the word embeddings; this config ties the output "
                                "weights to them (tie_word_embeddings)")
    unexpected = sorted(k for k in state if k not in used and not (tied and k in TIED_COPIES)
                        and not HARMLESS.search(k))
    if unexpected:
        warnings.warn(f"{source}: ignoring {len(unexpected)} weights that head {head!r} does not use: "
                      f"{', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}", stacklevel=3)
    return model, params


def from_pretrained(path, head: str | None = None, convert: Callable | None = None):
    """(model, params) for a local transformers directory or a .gguf file; ``model.apply`` returns what the
    transformers class does.

    head: 'none', 'mlm' / 'lm', 'token_cls', 'seq_cls'; None takes it from config.json "architectures".
    Label names: ``load_hf_config(path).id2label``. convert: see ``params_from_weights``; with it a GGUF file is
    read one tensor at a time (interop.int8_import.int8_from_pretrained: int8 params, one float tensor alive).
    """
    path = Path(path)
    if _is_gguf(path):
        gguf = read_gguf(path, lazy=convert is not None)
        return params_from_weights(hf_config_from_dict(gguf.config, str(path), head), gguf.tensors, str(path),
                                   convert)
    return params_from_weights(load_hf_config(path, head), read_weights(path), str(weights_file(path)), convert)


# ---------------------------------------------------------------- save


def model_type_of(cfg: ModelConfig) -> str:
    """The transformers model_type that holds a jaxfound config: a Llama-family one by its distinguishing feature."""
    if cfg.arch != "llama":
        return {"bert": "bert", "roberta": "roberta", "gpt": "gpt2"}[cfg.arch]
    if cfg.qk_norm:
        return "qwen3"
    if cfg.attention_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def _rope_scaling(cfg: ModelConfig) -> dict | None:
    """transformers' older 'rope_scaling' key (transformers 5 still reads it into rope_parameters)."""
    if cfg.rope_scaling == "none":
        return None
    out = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
    if cfg.rope_scaling == "llama3":
        out |= {"low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_position}
    return out


def _llama_hf_config(cfg: ModelConfig, model_type: str) -> dict:
    heads, kv_heads, head_dim = head_dims(cfg)
    out = {"model_type": model_type, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
           "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_position,
           "rms_norm_eps": cfg.layer_norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
           "attention_dropout": 0.0, "initializer_range": 0.02}
    if cfg.rope_scaling != "none":
        out["rope_scaling"] = _rope_scaling(cfg)
    if model_type in ("llama", "qwen3"):
        out["attention_bias"] = cfg.attention_bias
    if model_type == "llama":
        out["mlp_bias"] = False
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if model_type in ("qwen2", "qwen3"):  # a window, when there is one, on every layer (from layer 0)
        out |= {"use_sliding_window": bool(cfg.sliding_window), "sliding_window": cfg.sliding_window or None,
                "max_window_layers": 0 if cfg.sliding_window else cfg.num_layers}
    return out


def _hf_config(cfg: ModelConfig, head: str, id2label: dict[int, str], tokenizer) -> dict:
    tok = _token_ids(tokenizer)
    model_type = model_type_of(cfg)
    out = {"architectures": [CLASS_FOR[(model_type, head)]], "vocab_size": cfg.vocab_size, "torch_dtype": "float32"}
    if cfg.arch in ("bert", "roberta"):
        out |= {"model_type": model_type, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
                "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
                "hidden_act": TO_HF_ACTIVATION[cfg.activation], "hidden_dropout_prob": cfg.dropout,
                "attention_probs_dropout_prob": 0.0,  # jaxfound applies no attention-probability dropout
                "max_position_embeddings": cfg.max_position, "type_vocab_size": cfg.type_vocab_size,
                "layer_norm_eps": cfg.layer_norm_eps, "initializer_range": 0.02,
                "position_embedding_type": "absolute", "pad_token_id": tok["pad_token_id"] or 0}
        if cfg.arch == "roberta":  # its positions are counted from the model's pad id, whatever the tokenizer says
            out |= {"pad_token_id": cfg.pad_token_id, "bos_token_id": tok["bos_token_id"],
                    "eos_token_id": tok["eos_token_id"]}
    elif cfg.arch == "gpt":
        out |= {"model_type": "gpt2", "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
                "n_inner": cfg.intermediate_size, "n_positions": cfg.max_position,
                "activation_function": TO_HF_ACTIVATION[cfg.activation], "resid_pdrop": cfg.dropout,
                "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0, "layer_norm_epsilon": cfg.layer_norm_eps,
                "initializer_range": 0.02, "tie_word_embeddings": True}
        out |= tok  # None rather than GPT2Config's defaults (50256), which a small vocabulary lacks
    else:
        out |= _llama_hf_config(cfg, model_type) | tok  # None rather than LlamaConfig's defaults (1, 2)
    if id2label:
        out |= {"id2label": {str(i): n for i, n in id2label.items()}, "label2id": {n: i for i, n in id2label.items()}}
    return out


def _token_ids(tokenizer) -> dict:
    return {k: getattr(tokenizer, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}


def _labels(id2label, num_labels: int) -> dict[int, str]:
    if id2label is None:
        return {i: f"LABEL_{i}" for i in range(num_labels)}
    labels = dict(id2label) if isinstance(id2label, dict) else dict(enumerate(id2label))
    labels = {int(k): str(v) for k, v in labels.items()}
    if sorted(labels) != list(range(num_labels)):
        raise JaxfoundError(f"id2label has ids {sorted(labels)}; the classifier needs exactly 0..{num_labels - 1}")
    return labels


def _write_weights(path: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int | None):
    """model.safetensors, or shards of at most max_shard_bytes each (a larger tensor gets a shard of its own) listed
    in model.safetensors.index.json, as transformers writes them."""
    total = sum(a.nbytes for a in tensors.values())
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if max_shard_bytes is None or total <= max_shard_bytes:
        index.unlink(missing_ok=True)  # read_weights would prefer model.safetensors anyway; transformers too
        save_file(tensors, str(single), metadata={"format": "pt"})
        return
    shards, size = [{}], 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name] = arr
        size += arr.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    single.unlink(missing_ok=True)  # a stale single file would shadow the shards
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def save_pretrained(path, model, params, tokenizer=None, id2label=None, max_shard_bytes: int | None = None) -> Path:
    """Write config.json + model.safetensors (+ the tokenizer) that ``transformers`` loads unchanged.

    id2label: a {id: name} dict or a list of names for classification heads (default LABEL_i).
    max_shard_bytes: above this many bytes of weights, write shards and model.safetensors.index.json.
    Head 'none' of BERT becomes a BertModel without pooler weights (transformers initialises that pooler; the
    last hidden state is unaffected). GPT-2 / Llama 'seq_cls' need a zero classifier bias (transformers' score has
    none) and pool the last token that is not ``pad_token_id``: pass the tokenizer so config.json records it.
    A Llama-family model is saved as Qwen3 when it has qk_norm, Qwen2 when it has attention_bias, Mistral when it
    has a sliding window, else Llama, with a generation_config.json of the tokenizer's bos / eos / pad ids.
    Params of a scanned model (model.scan_layers) are unstacked first: the same files as the unrolled model's.
    """

    cfg, head = model.cfg, model.head
    model_type = model_type_of(cfg)
    if cfg.quant != "none":
        raise JaxfoundError(f"model.quant is {cfg.quant!r}; save_pretrained needs float weights (quant 'none')")
    if (model_type, head) not in CLASS_FOR:
        raise JaxfoundError(f"no transformers class for arch {cfg.arch!r} with head {head!r}")
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
        raise JaxfoundError(f"max_shard_bytes is {max_shard_bytes!r}; give a positive number of bytes or None")
    cls = CLASS_FOR[(model_type, head)]
    params = jax.device_get(nn.unbox(params))
    params = unstack_layers(params.get("params", params))  # a scanned model's trunk: the same tensors per layer
    if head == "seq_cls" and cfg.arch in ("gpt", "llama") and np.any(np.asarray(params["classifier"]["bias"]) != 0):
        raise JaxfoundError(f"{cls}: param 'classifier/bias' is non-zero, but transformers' score layer has no bias; "
                            "train with a zero bias")
    tensors = {}
    for hf_name, ours, kind in _entries(cfg, head, model_type):
        try:
            parts = [np.asarray(_lookup(params, p), dtype=np.float32) for p in ours]
        except (KeyError, TypeError) as e:
            raise JaxfoundError(f"params lack '{'/'.join(ours[0])}' needed for '{hf_name}' ({cls})") from e
        if kind == "zero":
            arr = np.zeros(parts[0].shape[-1:], np.float32)
        else:
            arr = parts[0].T if kind == "T" else np.concatenate(parts, axis=-1) if kind == "split3" else parts[0]
        full = TRUNK_PREFIX[cfg.arch] + hf_name if head != "none" and _is_trunk(hf_name) else hf_name
        tensors[full] = np.ascontiguousarray(arr)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    labels = _labels(id2label, cfg.num_labels) if head in ("token_cls", "seq_cls") else {}
    (path / "config.json").write_text(json.dumps(_hf_config(cfg, head, labels, tokenizer), indent=2) + "\n")
    _write_weights(path, tensors, max_shard_bytes)
    if cfg.arch == "llama":
        generation = {k: v for k, v in _token_ids(tokenizer).items() if v is not None}
        (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def transformers_names(model) -> dict[str, str]:
    """{jaxfound param path ('llama/layer_0/attention/query/kernel'): the transformers tensor name save_pretrained
    writes for it ('model.layers.0.self_attn.q_proj.weight')}; GPT-2's query / key / value all name c_attn."""
    cfg, head = model.cfg, model.head
    out = {}
    for hf_name, ours, kind in _entries(cfg, head, model_type_of(cfg)):
        if kind != "zero":
            full = TRUNK_PREFIX[cfg.arch] + hf_name if head != "none" and _is_trunk(hf_name) else hf_name
            out |= dict.fromkeys(("/".join(p) for p in ours), full)
    return out


__all__ = ["ARCHITECTURES", "HFConfig", "from_pretrained", "hf_config_from_dict", "load_hf_config", "model_type_of",
           "params_from_weights", "read_weights", "save_pretrained", "transformers_names", "weights_file"]
