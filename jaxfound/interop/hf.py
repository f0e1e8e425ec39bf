"""Hugging Face transformers <-> jaxfound: load a local BERT / GPT-2 directory, save one transformers loads unchanged.

    model, params = from_pretrained("path/to/hf_dir")          # head from config.json "architectures"
    info = load_hf_config("path/to/hf_dir")                     # ModelConfig, head, id2label
    save_pretrained("out_dir", model, params, tokenizer=tok, id2label={0: "O", 1: "B-PER"})

Weights are read from ``model.safetensors`` (or its sharded index); ``pytorch_model.bin`` only through
``torch.load(weights_only=True)``, so nothing is ever unpickled. torch kernels are (out, in), ours (in, out);
GPT-2's Conv1D already is (in, out) and its fused ``c_attn`` is split into query / key / value.
"""

from __future__ import annotations

import json
import re
import warnings
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
from jaxfound.models import abstract_params, build_model

# transformers class -> (jaxfound arch, head)
ARCHITECTURES = {
    "BertModel": ("bert", "none"),
    "BertForMaskedLM": ("bert", "mlm"),
    "BertForTokenClassification": ("bert", "token_cls"),
    "BertForSequenceClassification": ("bert", "seq_cls"),
    "GPT2Model": ("gpt", "none"),
    "GPT2LMHeadModel": ("gpt", "lm"),
    "GPT2ForTokenClassification": ("gpt", "token_cls"),
    "GPT2ForSequenceClassification": ("gpt", "seq_cls"),
}
CLASS_FOR = {v: k for k, v in ARCHITECTURES.items()}
HEADS = {"bert": ("none", "mlm", "token_cls", "seq_cls"), "gpt": ("none", "lm", "token_cls", "seq_cls")}
TRUNK_PREFIX = {"bert": "bert.", "gpt": "transformer."}
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
                  "relu": "relu"}
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu"}
# checkpoint entries that carry no information for jaxfound: buffers, tied copies, heads we do not build
HARMLESS = re.compile(r"(position_ids|token_type_ids|\.attn\.bias|\.attn\.masked_bias)$"
                      r"|^pooler\.|^cls\.seq_relationship\.|^cls\.predictions\.decoder\.bias$")
TIED_COPIES = ("cls.predictions.decoder.weight", "lm_head.weight")


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


def _get(hf: dict, file: Path, *keys, default=None):
    for k in keys:
        if k in hf:
            return hf[k]
    if default is None:
        raise JaxfoundError(f"{file}: missing key '{keys[0]}'")
    return default


def _activation(name: str, file: Path, key: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise JaxfoundError(f"{file}: '{key}' is {name!r}; supported: {', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def load_hf_config(path, head: str | None = None) -> HFConfig:
    """Read ``path/config.json`` into a ModelConfig, the head (given, or from "architectures") and label names."""
    file = Path(path) / "config.json"
    hf = _read_json(file)
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    if model_type in ("bert", "gpt2"):
        arch = "bert" if model_type == "bert" else "gpt"
    elif known:
        arch = ARCHITECTURES[known[0]][0]
    else:
        raise JaxfoundError(f"{file}: model_type {model_type!r} / architectures {archs} not supported; "
                            f"supported: model_type 'bert' or 'gpt2', architectures {', '.join(ARCHITECTURES)}")
    if head is None:
        heads = [ARCHITECTURES[a][1] for a in known if ARCHITECTURES[a][0] == arch]
        head = heads[0] if heads else "none"
    if head not in HEADS[arch]:
        raise JaxfoundError(f"head {head!r} is not available for {model_type}; choose one of {', '.join(HEADS[arch])}")
    id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
    num_labels = len(id2label) or int(hf.get("num_labels", 2))
    if head in ("token_cls", "seq_cls") and not id2label:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    common = dict(vocab_size=int(_get(hf, file, "vocab_size")),
                  num_labels=num_labels if head in ("token_cls", "seq_cls") else 0)
    if arch == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise JaxfoundError(f"{file}: position_embedding_type {hf['position_embedding_type']!r} not supported; "
                                "only 'absolute'")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise JaxfoundError(f"{file}: is_decoder / add_cross_attention must be false for a BERT encoder")
        cfg = ModelConfig(
            arch="bert", hidden_size=int(_get(hf, file, "hidden_size")),
            num_layers=int(_get(hf, file, "num_hidden_layers")), num_heads=int(_get(hf, file, "num_attention_heads")),
            intermediate_size=int(_get(hf, file, "intermediate_size")),
            max_position=int(_get(hf, file, "max_position_embeddings", default=512)),
            type_vocab_size=int(_get(hf, file, "type_vocab_size", default=2)),
            dropout=float(_get(hf, file, "hidden_dropout_prob", default=0.1)),
            layer_norm_eps=float(_get(hf, file, "layer_norm_eps", default=1e-12)),
            activation=_activation(_get(hf, file, "hidden_act", default="gelu"), file, "hidden_act"), **common)
    else:
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise JaxfoundError(f"{file}: scale_attn_by_inverse_layer_idx must be false and scale_attn_weights true")
        hidden = int(_get(hf, file, "n_embd", "hidden_size"))
        cfg = ModelConfig(
            arch="gpt", hidden_size=hidden, num_layers=int(_get(hf, file, "n_layer", "num_hidden_layers")),
            num_heads=int(_get(hf, file, "n_head", "num_attention_heads")),
            intermediate_size=int(hf.get("n_inner") or 4 * hidden),
            max_position=int(_get(hf, file, "n_positions", "max_position_embeddings", default=1024)),
            dropout=float(_get(hf, file, "resid_pdrop", default=0.1)),
            layer_norm_eps=float(_get(hf, file, "layer_norm_epsilon", default=1e-5)),
            activation=_activation(_get(hf, file, "activation_function", default="gelu_new"), file,
                                   "activation_function"), **common)
        if not hf.get("tie_word_embeddings", True):
            raise JaxfoundError(f"{file}: tie_word_embeddings is false; jaxfound's GPT-2 LM head is tied")
    if cfg.hidden_size % cfg.num_heads:
        raise JaxfoundError(f"{file}: hidden size {cfg.hidden_size} is not divisible by {cfg.num_heads} heads")
    return HFConfig(cfg, head, CLASS_FOR[(arch, head)], id2label, hf.get("pad_token_id"))


# ---------------------------------------------------------------- name mapping


def _linear(hf: str, ours: tuple, transpose=True):
    return [(f"{hf}.weight", (ours + ("kernel",),), "T" if transpose else "copy"),
            (f"{hf}.bias", (ours + ("bias",),), "copy")]


def _ln(hf: str, ours: tuple):
    return [(f"{hf}.weight", (ours + ("scale",),), "copy"), (f"{hf}.bias", (ours + ("bias",),), "copy")]


def _bert_entries(cfg: ModelConfig, head: str):
    t = ("bert",)
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


def _entries(cfg: ModelConfig, head: str):
    """(transformers name without the trunk prefix, our param paths, conversion) for every HF tensor."""
    return (_bert_entries if cfg.arch == "bert" else _gpt_entries)(cfg, head)


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


def read_weights(path) -> dict[str, np.ndarray]:
    """All tensors of a transformers directory by name: safetensors (single or sharded), else a weights-only .bin."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return {k: v for shard in shards for k, v in _read_safetensors(path / shard).items()}
    if (path / "pytorch_model.bin").is_file():
        import torch

        try:
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors: never fall back to unpickling
            raise JaxfoundError(f"{path / 'pytorch_model.bin'}: not a plain weights file ({e})") from e
        return {k: v.to(torch.float32).numpy() for k, v in state.items()}
    raise JaxfoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


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


def from_pretrained(path, head: str | None = None):
    """(model, params) for a local transformers directory; ``model.apply`` returns what the transformers class does.

    head: 'none', 'mlm' / 'lm', 'token_cls', 'seq_cls'; None takes it from config.json "architectures".
    Label names: ``load_hf_config(path).id2label``.
    """
    path = Path(path)
    info = load_hf_config(path, head)
    cfg, head = info.model, info.head
    model = build_model(cfg, head)
    shapes = nn.unbox(abstract_params(model))
    raw = read_weights(path)
    state = {}
    for name, arr in raw.items():
        state.setdefault(_normalise(name, cfg.arch), arr)
    params, missing, used = {}, [], set()
    for hf_name, ours, kind in _entries(cfg, head):
        if hf_name not in state:
            missing.append(hf_name)
            continue
        used.add(hf_name)
        arr = np.asarray(state[hf_name], dtype=np.float32)
        expect = [tuple(_lookup(shapes, p).shape) for p in ours]
        parts = _to_ours(arr, kind) if kind != "split3" or arr.shape[-1] % 3 == 0 else [arr]
        if [p.shape for p in parts] != expect:
            want = expect[0] if kind != "split3" else expect[0][:-1] + (3 * expect[0][-1],)
            want = want[::-1] if kind == "T" else want
            raise JaxfoundError(
                f"{path}: weight '{hf_name}' has shape {tuple(arr.shape)} but config.json implies {want} "
                f"(jaxfound param '{'/'.join(ours[0])}' {expect[0]}); check vocab_size, hidden_size, "
                "intermediate_size, max_position_embeddings, type_vocab_size and num_labels / id2label")
        for p, part in zip(ours, parts):
            _set(params, p, jnp.asarray(part))
    if missing:
        raise JaxfoundError(f"{path}: {len(missing)} weights needed for {info.architecture} (head {head!r}) are "
                            f"missing: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if cfg.arch == "gpt" and head == "seq_cls":
        _set(params, ("classifier", "bias"), jnp.zeros((cfg.num_labels,), jnp.float32))
    word = state["embeddings.word_embeddings.weight" if cfg.arch == "bert" else "wte.weight"]
    for tied in TIED_COPIES:
        if tied in state and (state[tied].shape != word.shape or not np.allclose(state[tied], word)):
            raise JaxfoundError(f"{path}: '{tied}' differs from the word embeddings; jaxfound ties output weights")
    unexpected = sorted(k for k in state if k not in used and k not in TIED_COPIES and not HARMLESS.search(k))
    if unexpected:
        warnings.warn(f"{path}: ignoring {len(unexpected)} weights that head {head!r} does not use: "
                      f"{', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}", stacklevel=2)
    return model, params


# ---------------------------------------------------------------- save


def _hf_config(cfg: ModelConfig, head: str, id2label: dict[int, str], tokenizer) -> dict:
    tok = {k: getattr(tokenizer, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    out = {"architectures": [CLASS_FOR[(cfg.arch, head)]], "vocab_size": cfg.vocab_size, "torch_dtype": "float32"}
    if cfg.arch == "bert":
        out |= {"model_type": "bert", "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
                "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
                "hidden_act": TO_HF_ACTIVATION[cfg.activation], "hidden_dropout_prob": cfg.dropout,
                "attention_probs_dropout_prob": 0.0,  # jaxfound applies no attention-probability dropout
                "max_position_embeddings": cfg.max_position, "type_vocab_size": cfg.type_vocab_size,
                "layer_norm_eps": cfg.layer_norm_eps, "initializer_range": 0.02,
                "position_embedding_type": "absolute", "pad_token_id": tok["pad_token_id"] or 0}
    else:
        out |= {"model_type": "gpt2", "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
                "n_inner": cfg.intermediate_size, "n_positions": cfg.max_position,
                "activation_function": TO_HF_ACTIVATION[cfg.activation], "resid_pdrop": cfg.dropout,
                "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0, "layer_norm_epsilon": cfg.layer_norm_eps,
                "initializer_range": 0.02, "tie_word_embeddings": True}
        out |= tok  # None rather than GPT2Config's defaults (50256), which a small vocabulary lacks
    if id2label:
        out |= {"id2label": {str(i): n for i, n in id2label.items()}, "label2id": {n: i for i, n in id2label.items()}}
    return out


def _labels(id2label, num_labels: int) -> dict[int, str]:
    if id2label is None:
        return {i: f"LABEL_{i}" for i in range(num_labels)}
    labels = dict(id2label) if isinstance(id2label, dict) else dict(enumerate(id2label))
    labels = {int(k): str(v) for k, v in labels.items()}
    if sorted(labels) != list(range(num_labels)):
        raise JaxfoundError(f"id2label has ids {sorted(labels)}; the classifier needs exactly 0..{num_labels - 1}")
    return labels


def save_pretrained(path, model, params, tokenizer=None, id2label=None) -> Path:
    """Write config.json + model.safetensors (+ the tokenizer) that ``transformers`` loads unchanged.

    id2label: a {id: name} dict or a list of names for classification heads (default LABEL_i).
    Head 'none' of BERT becomes a BertModel without pooler weights (transformers initialises that pooler; the
    last hidden state is unaffected). GPT-2 'seq_cls' needs a zero classifier bias (transformers' score has none)
    and pools the last token that is not ``pad_token_id``: pass the tokenizer so config.json records it.
    """

    cfg, head = model.cfg, model.head
    if cfg.quant != "none":
        raise JaxfoundError(f"model.quant is {cfg.quant!r}; save_pretrained needs float weights (quant 'none')")
    if (cfg.arch, head) not in CLASS_FOR:
        raise JaxfoundError(f"no transformers class for arch {cfg.arch!r} with head {head!r}")
    params = jax.device_get(nn.unbox(params))
    params = params.get("params", params)
    if cfg.arch == "gpt" and head == "seq_cls" and np.any(np.asarray(params["classifier"]["bias"]) != 0):
        raise JaxfoundError("GPT-2 seq_cls: param 'classifier/bias' is non-zero, but transformers' "
                            "GPT2ForSequenceClassification score layer has no bias; train with a zero bias")
    tensors = {}
    for hf_name, ours, kind in _entries(cfg, head):
        try:
            parts = [np.asarray(_lookup(params, p), dtype=np.float32) for p in ours]
        except (KeyError, TypeError) as e:
            raise JaxfoundError(f"params lack '{'/'.join(ours[0])}' needed for '{hf_name}' "
                                f"({CLASS_FOR[(cfg.arch, head)]})") from e
        arr = parts[0].T if kind == "T" else np.concatenate(parts, axis=-1) if kind == "split3" else parts[0]
        full = TRUNK_PREFIX[cfg.arch] + hf_name if head != "none" and _is_trunk(hf_name) else hf_name
        tensors[full] = np.ascontiguousarray(arr)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    labels = _labels(id2label, cfg.num_labels) if head in ("token_cls", "seq_cls") else {}
    (path / "config.json").write_text(json.dumps(_hf_config(cfg, head, labels, tokenizer), indent=2) + "\n")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


__all__ = ["ARCHITECTURES", "HFConfig", "from_pretrained", "load_hf_config", "read_weights", "save_pretrained"]
