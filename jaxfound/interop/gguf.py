"""llama.cpp GGUF -> transformers: config, float32 weights in torch names and layouts, tokenizer, a directory.

    model = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")      # GGUFModel(config, tensors)
    config = read_gguf_config("SmolLM2-135M-Instruct.Q4_1.gguf")  # model.config, nothing dequantized
    tokenizer = gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    write_transformers_dir("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")   # what AutoModelForCausalLM loads

Every tensor is dequantized to float32 with ``gguf.quants.dequantize``. GGUF lists a tensor's dimensions fastest
first (ggml's ``ne``); reversed, they are numpy's shape, so a linear layer comes out (out, in) as in torch. llama.cpp's
converter reorders the rows of Q and K of llama / mistral models for its rotary kernel; ``read_gguf`` puts them back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from jaxfound.errors import JaxfoundError
from jaxfound.quant.kernel import cache_dir


class Family(NamedTuple):
    """How one GGUF ``general.architecture`` maps onto transformers."""

    model_type: str
    architecture: str  # the transformers class
    permuted_qk: bool  # llama.cpp interleaved the rotary halves of each Q / K head
    qkv_bias: bool  # the transformers class has q / k / v biases
    qk_norm: bool  # the transformers class normalises q and k per head


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", permuted_qk=True, qkv_bias=False, qk_norm=False),
    "mistral": Family("mistral", "MistralForCausalLM", permuted_qk=True, qkv_bias=False, qk_norm=False),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", permuted_qk=False, qkv_bias=True, qk_norm=False),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", permuted_qk=False, qkv_bias=False, qk_norm=True),
}
TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
QK_NORM_TENSORS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
QKV = ("attn_q", "attn_k", "attn_v")
TENSOR_NAME = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<part>\w+)\.(?P<kind>weight|bias)")
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency divisors of Llama 3.1+ ("llama3" rope scaling)
READER_ERRORS = (ValueError, IndexError, KeyError, OverflowError)


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF model in transformers terms."""

    config: dict  # a transformers config.json
    tensors: Mapping[str, np.ndarray]  # float32, transformers names, torch layouts (a dict, or LazyTensors)


# ---------------------------------------------------------------- reading


def _gguf_file(path) -> Path:
    file = Path(path)
    if not file.is_file():
        raise JaxfoundError(f"{file}: not found; expected a llama.cpp .gguf model file")
    return file


def _open(file: Path) -> gguf.GGUFReader:
    """The parsed file (memory-mapped); the last two opened are kept, since the config, the weights and a check
    often read the same file one after the other (parsing a 49k-token vocabulary takes seconds)."""
    stat = file.stat()
    return _open_cached(file.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_cached(file: Path, size: int, mtime_ns: int) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(file)
    except READER_ERRORS as e:
        raise JaxfoundError(f"{file}: not a readable GGUF file ({e}); expected a llama.cpp .gguf model") from e


def field_value(field):
    """The value of a scalar or string GGUF metadata field."""
    part = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part[0].item()


def scalar_metadata(reader: gguf.GGUFReader) -> dict:
    """Every scalar and string metadata field (arrays such as the vocabulary are left out)."""
    return {name: field_value(f) for name, f in reader.fields.items() if f.types[0] != gguf.GGUFValueType.ARRAY}


def family_of(meta: dict, file: Path) -> Family:
    arch = meta.get("general.architecture")
    if arch not in FAMILIES:
        raise JaxfoundError(f"{file}: general.architecture {arch!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[arch]


def dequantized(tensor, file: Path) -> np.ndarray:
    """One GGUF tensor as float32 in numpy order (ggml's ``ne`` reversed)."""
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise JaxfoundError(f"{file}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the installed "
                            f"gguf cannot dequantize ({e}); a newer gguf may (pip install -U gguf)") from e
    return np.array(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order of a Q or K weight / bias.

    Per head, llama.cpp stores rows [0, d/2, 1, d/2+1, ...] (pairs rotated together, interleaved); transformers'
    ``rotate_half`` wants the halves split, [0, 1, ..., d/2-1, d/2, ...]."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str, family: Family, file: Path) -> str:
    """The transformers name of a GGUF tensor: ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    match = TENSOR_NAME.fullmatch(name)
    layer, part, kind = (match["layer"], match["part"], match["kind"]) if match else (None, None, None)
    parts = BLOCK_TENSORS | (QK_NORM_TENSORS if family.qk_norm else {})
    if match and layer is None and part in TOP_TENSORS and kind == "weight":
        return f"{TOP_TENSORS[part]}.weight"
    if match and layer is not None and part in parts and (kind == "weight" or (family.qkv_bias and part in QKV)):
        return f"model.layers.{layer}.{parts[part]}.{kind}"
    raise JaxfoundError(f"{file}: tensor {name} has no place in a dense {family.architecture}; expected token_embd, "
                        f"output_norm, output and blk.N.{{{', '.join(parts)}}}.weight"
                        + (" and q / k / v biases" if family.qkv_bias else ""))


def _require(meta: dict, key: str, file: Path):
    if key not in meta:
        raise JaxfoundError(f"{file}: metadata key {key} is missing; a {meta['general.architecture']} GGUF needs it")
    return meta[key]


def llama3_rope_scaling(rope_freqs: np.ndarray, rope_theta: float, head_dim: int, file: Path) -> dict:
    """transformers' "llama3" rope parameters that reproduce llama.cpp's ``rope_freqs`` divisors.

    Between the two cut-offs a divisor r is 1 / ((1 - s) / factor + s), s = (L / wavelength - low) / (high - low),
    which is linear in the frequency; the fit fixes low = 1 (Llama 3's value; any other scales L and high alike)."""
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(rope_freqs.max())
    medium = (rope_freqs > 1 + 1e-4) & (rope_freqs < factor * (1 - 1e-4))
    if inv_freq.shape != rope_freqs.shape or medium.sum() < 2:
        raise JaxfoundError(f"{file}: tensor {ROPE_FREQS} (shape {rope_freqs.shape}) is not llama3 rope scaling for "
                            f"head_dim {head_dim}; expected {head_dim // 2} divisors, two or more between 1 and max")
    smooth = (1 / rope_freqs[medium] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_freq[medium], smooth, 1)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
               "high_freq_factor": round(1 - 1 / intercept, 4),
               "original_max_position_embeddings": round(-2 * math.pi * slope / intercept)}
    if not np.allclose(llama3_divisors(inv_freq, scaling), rope_freqs, rtol=1e-3):
        raise JaxfoundError(f"{file}: tensor {ROPE_FREQS} does not follow llama3 rope scaling (best fit {scaling})")
    return scaling


def llama3_divisors(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """What llama3 rope scaling divides each rotary frequency by (transformers' ``_compute_llama3_parameters``)."""
    old_len, low, high = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                               "high_freq_factor"))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    return np.where(wavelen < old_len / high, 1.0, np.where(wavelen > old_len / low, scaling["factor"], medium))


def rope_scaling(meta: dict, arch: str, file: Path) -> dict | None:
    """transformers' ``rope_scaling`` from the GGUF metadata (linear or yarn), or None."""
    kind = meta.get(f"{arch}.rope.scaling.type", "linear" if f"{arch}.rope.scale_linear" in meta else "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 1.0))
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        key = f"{arch}.rope.scaling."
        yarn = {"rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": _require(meta, key + "original_context_length", file)}
        betas = {"beta_fast": key + "yarn_beta_fast", "beta_slow": key + "yarn_beta_slow"}
        return yarn | {k: meta[v] for k, v in betas.items() if v in meta}
    raise JaxfoundError(f"{file}: metadata {arch}.rope.scaling.type is {kind!r}; supported: none, linear, yarn")


def hf_config(meta: dict, family: Family, shapes: dict[str, tuple], rope_freqs: np.ndarray | None, file: Path) -> dict:
    """A transformers config.json for the model (shapes: numpy shape of each GGUF tensor by its GGUF name)."""
    arch = meta["general.architecture"]
    if "token_embd.weight" not in shapes:
        raise JaxfoundError(f"{file}: tensor token_embd.weight is missing; every {arch} GGUF has the token embedding")
    hidden, n_head = (_require(meta, f"{arch}.{k}", file) for k in ("embedding_length", "attention.head_count"))
    head_dim = meta.get(f"{arch}.attention.key_length",
                        meta.get(f"{arch}.rope.dimension_count") if family.permuted_qk else None) or hidden // n_head
    rope_theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))  # llama.cpp's default when absent
    scaling = rope_scaling(meta, arch, file)
    if rope_freqs is not None:
        scaling = llama3_rope_scaling(rope_freqs.astype(np.float64), rope_theta, head_dim, file)
    config = {
        "model_type": family.model_type,
        "architectures": [family.architecture],
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": _require(meta, f"{arch}.feed_forward_length", file),
        "num_hidden_layers": _require(meta, f"{arch}.block_count", file),
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "rms_norm_eps": _require(meta, f"{arch}.attention.layer_norm_rms_epsilon", file),
        "rope_theta": rope_theta,
        "rope_scaling": scaling,
        "max_position_embeddings": _require(meta, f"{arch}.context_length", file),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": any(f"blk.0.{part}.bias" in shapes for part in QKV),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
    }
    if family.model_type == "mistral":  # MistralConfig would otherwise default to a 4096-token window
        config["sliding_window"] = meta.get(f"{arch}.attention.sliding_window")
    return config


def expected_names(config: dict, family: Family) -> set[str]:
    """The transformers tensor names a complete checkpoint of this config has."""
    parts = [f"{p}.weight" for p in BLOCK_TENSORS.values()]
    parts += [f"{p}.weight" for p in QK_NORM_TENSORS.values()] if family.qk_norm else []
    parts += [f"self_attn.{p}_proj.bias" for p in "qkv"] if config["attention_bias"] else []
    names = {f"model.layers.{i}.{p}" for i in range(config["num_hidden_layers"]) for p in parts}
    names |= {"model.embed_tokens.weight", "model.norm.weight"}
    return names if config["tie_word_embeddings"] else names | {"lm_head.weight"}


def hf_tensors(raw: dict[str, np.ndarray], config: dict, family: Family, file: Path) -> dict[str, np.ndarray]:
    """GGUF-named tensors -> transformers names, Q / K rows back in transformers' order, all checked present."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {}
    for name, w in raw.items():
        if name == ROPE_FREQS:  # already in config["rope_scaling"]
            continue
        part = name.split(".")[-2]
        permuted = family.permuted_qk and part in heads
        tensors[hf_name(name, family, file)] = unpermute_qk(w, heads[part]) if permuted else w
    missing = sorted(expected_names(config, family) - tensors.keys())
    if missing:
        raise JaxfoundError(f"{file}: {len(missing)} tensors of a {config['num_hidden_layers']}-layer "
                            f"{family.architecture} are missing, e.g. {missing[:3]} (transformers names)")
    return tensors


class LazyTensors(Mapping):
    """A GGUF file's tensors in transformers names, each dequantized (and Q / K rows reordered) when it is read and
    not kept: a consumer that converts tensor by tensor (interop.int8_import) never holds the whole model in float32."""

    def __init__(self, reader: gguf.GGUFReader, config: dict, family: Family, file: Path):
        heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
        self._file, self._heads, self._family = file, heads, family
        self._tensors = {hf_name(t.name, family, file): t for t in reader.tensors if t.name != ROPE_FREQS}
        missing = sorted(expected_names(config, family) - self._tensors.keys())
        if missing:
            raise JaxfoundError(f"{file}: {len(missing)} tensors of a {config['num_hidden_layers']}-layer "
                                f"{family.architecture} are missing, e.g. {missing[:3]} (transformers names)")

    def __getitem__(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        w = dequantized(t, self._file)
        part = t.name.split(".")[-2]
        return unpermute_qk(w, self._heads[part]) if self._family.permuted_qk and part in self._heads else w

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def read_gguf(path, lazy: bool = False) -> GGUFModel:
    """Read a Llama-family GGUF file: transformers config and float32 tensors in transformers names and layouts.
    lazy: the tensors as a ``LazyTensors`` mapping (each dequantized when read, none kept)."""
    file = _gguf_file(path)
    if lazy:
        config = read_gguf_config(file)
        return GGUFModel(config=config, tensors=LazyTensors(_open(file), config, family_of(
            scalar_metadata(_open(file)), file), file))
    reader = _open(file)
    meta = scalar_metadata(reader)
    family = family_of(meta, file)
    raw = {t.name: dequantized(t, file)
           for t in tqdm(reader.tensors, desc=f"dequantize {file.name}", unit="tensor", leave=False, disable=None)}
    config = hf_config(meta, family, {k: w.shape for k, w in raw.items()}, raw.get(ROPE_FREQS), file)
    return GGUFModel(config=config, tensors=hf_tensors(raw, config, family, file))


def read_gguf_config(path) -> dict:
    """The transformers config.json of a GGUF file alone, without dequantizing its weights."""
    file = _gguf_file(path)
    reader = _open(file)
    meta = scalar_metadata(reader)
    shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in reader.tensors}
    rope_freqs = next((dequantized(t, file) for t in reader.tensors if t.name == ROPE_FREQS), None)
    return hf_config(meta, family_of(meta, file), shapes, rope_freqs, file)


# ---------------------------------------------------------------- tokenizer and directory


def gguf_tokenizer(path):
    """transformers' fast tokenizer built from the GGUF vocabulary, merges, special tokens and chat template.

    Building it takes transformers ~10 s for a 49k vocabulary, so the result is saved once as a tokenizer directory
    under $JAXFOUND_CACHE (default ~/.cache/jaxfound)/gguf_tokenizers, keyed by the file's path, size and mtime,
    and loaded from there next time."""
    from transformers import AutoTokenizer

    file = _gguf_file(path)
    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "gguf_tokenizers" / key
    if (cached / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(cached, local_files_only=True)
        except Exception:  # a damaged cache entry: build again
            pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except READER_ERRORS as e:
        raise JaxfoundError(f"{file}: transformers cannot build a tokenizer from it ({e})") from e
    try:
        tmp = cached.with_name(f".{key}.tmp{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    except OSError:  # an unwritable cache only costs time
        pass
    return tokenizer


def save_transformers_dir(model: GGUFModel, tokenizer, out_dir) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer files into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.config | {"torch_dtype": "float32"}, indent=2) + "\n")
    save_file(model.tensors, out / "model.safetensors", metadata={"format": "pt"})
    generation = {k: model.config[k] for k in ("bos_token_id", "eos_token_id") if model.config[k] is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save_pretrained(out)
    return out


def write_transformers_dir(gguf_path, out_dir) -> Path:
    """Turn a GGUF file into a transformers directory that ``AutoModelForCausalLM.from_pretrained`` loads."""
    return save_transformers_dir(read_gguf(gguf_path), gguf_tokenizer(gguf_path), out_dir)
