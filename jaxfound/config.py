"""Typed, frozen configuration: YAML recipes in configs/ plus dotted ``key=value`` overrides.

Every mistake (unknown key, bad value, bad YAML) raises JaxfoundError naming the key, the file
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jaxfound.errors import JaxfoundError


def _choice(default, *allowed, doc=""):
    return field(default=default, metadata={"choices": allowed, "doc": doc})


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # where checkpoints, metrics.jsonl, summary.json and plots go
    registry: str | None = None  # knowledge-graph registry directory; every run registers itself there


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (jaxfound.models.lora): train.lora asks for them; model.lora records a run's adapters."""

    rank: int = 0  # 0: no adapters (full fine-tuning)
    alpha: float = 16.0  # the update is (alpha / rank) * x A B
    dropout: float = 0.0  # on the adapter's input, while training
    # 'all-linear' (every Dense of the trunk) or a regular expression searched in each Dense's module path, e.g.
    # 'attention/(query|value)', 'mlp/(gate|up|down)'
    targets: str = "all-linear"


@dataclass(frozen=True)
class ModelConfig:
    arch: str = _choice("bert", "bert", "roberta", "gpt", "llama")  # llama: the Llama / Mistral / Qwen decoder family
    vocab_size: int = 0  # 0: take the tokenizer's size (rounded up to a multiple of 128)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 0  # llama: key/value heads (grouped-query attention); 0 = num_heads
    head_dim: int = 0  # llama: 0 = hidden_size // num_heads
    intermediate_size: int = 512
    max_position: int = 512
    type_vocab_size: int = 2  # BERT token types (RoBERTa: 1)
    pad_token_id: int = 1  # roberta: positions count from pad_token_id + 1 over the non-padding tokens
    dropout: float = 0.1  # hidden dropout (attention-probability dropout is not applied)
    layer_norm_eps: float = 1e-12
    activation: str = _choice("gelu", "gelu", "gelu_new", "relu", "silu")  # llama: the SwiGLU gate's activation
    rope_theta: float = 10000.0  # llama: rotary base
    rope_scaling: str = _choice("none", "none", "linear", "llama3")
    rope_factor: float = 1.0  # linear / llama3 scaling factor
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position: int = 8192  # llama3
    attention_bias: bool = False  # llama: biases on q / k / v (Qwen2)
    qk_norm: bool = False  # llama: RMSNorm per head on q and k (Qwen3)
    sliding_window: int = 0  # llama: attend to the last N positions only (Mistral); 0 = all
    tie_embeddings: bool = True  # llama: the LM head is the word embedding (GPT-2 is always tied)
    dtype: str = _choice("float32", "float32", "bfloat16")  # compute dtype
    param_dtype: str = _choice("float32", "float32", "bfloat16")
    # rematerialise each block in the backward pass: 'full' saves nothing inside a block, 'dots_saveable' keeps matmul
    # outputs, 'dots_with_no_batch_dims_saveable' keeps those without batch dims (jax.checkpoint_policies),
    # 'save_activations' / 'save_projections' keep the block's named activations / its projections' outputs
    # (models.scan.REMAT_POLICIES); true/false (earlier configs) read as full/none
    remat: str = _choice("none", "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                         "save_activations", "save_projections")
    scan_layers: bool = False  # one block compiled and scanned over params stacked on a leading 'layers' axis
    # attention kernel: 'auto' = XLA's einsum form on CPU, cuDNN flash attention on GPU, Pallas splash on TPU;
    # 'xla' (the einsum form), 'dot_product' (jax.nn.dot_product_attention, XLA), 'cudnn', 'splash' force one
    attention: str = _choice("auto", "auto", "xla", "dot_product", "cudnn", "splash")
    num_labels: int = 0  # classification heads: set by the fine-tuning task
    quant: str = _choice("none", "none", "w8", "w8a8", "w4")  # int8 / 4-bit Dense kernels (see jaxfound.quant)
    init: str | None = None  # fine-tuning: HF directory or jaxfound run dir to start from
    lora: LoraConfig = field(default_factory=LoraConfig)  # set from train.lora by `jaxfound finetune`


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # corpus: file, directory, glob or hub name; None = built-in synthetic
    format: str = _choice("auto", "auto", "text", "jsonl", "parquet", "hub")
    text_field: str = "text"
    tokenizer: str | None = None  # local HF tokenizer dir; None = train one on the corpus
    tokenizer_vocab: int = 2048  # vocabulary size of a tokenizer trained on the corpus
    seq_len: int = 128
    mask_prob: float = 0.15
    valid_fraction: float = 0.02  # documents held out for eval
    synthetic_docs: int = 20000
    # pretraining: tokenize data.path once into this directory (shards read as memory maps, keyed by the corpus
    # content and the tokenizer) and reuse it in later runs; None = tokenize in memory in every run
    cache_dir: str | None = None
    cache_workers: int = 0  # processes tokenizing into cache_dir; 0 = one per CPU, 1 = the run's own process
    # fine-tuning files (CoNLL for ner, CSV / JSON lines for cls)
    train: str | None = None
    valid: str | None = None
    test: str | None = None
    token_column: int = 0
    tag_column: int = -1
    text_column: str = "text"
    label_column: str = "label"
    length_bucketing: bool = True  # group sentences of similar length into a batch (fine-tuning)
    # token-level fine-tuning: several sentences per row of seq_len tokens (attention and positions reset per
    # sentence), one compiled shape, almost no padding; a batch holds about train.batch_size sentences
    packing: bool = False


@dataclass(frozen=True)
class TrainConfig:
    # pos / chunk: tag CoNLL column 1 / 2; sft: instruction tuning of a decoder on chat / prompt-completion JSON lines
    task: str = _choice("mlm", "mlm", "clm", "ner", "cls", "pos", "chunk", "sft")
    steps: int = 300  # pretraining steps (fine-tuning uses epochs)
    schedule_steps: int = 0  # length of the lr schedule; 0 = train.steps (set it to stop early and resume later)
    epochs: int = 3
    batch_size: int = 32  # global batch (sentences for fine-tuning)
    grad_accum: int = 1  # micro-batches per update
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_at_start: bool = True  # score the untrained model at step 0 (the baseline of every curve)
    eval_batches: int = 8
    lr: float = 1e-3
    warmup_steps: int = 30
    warmup_ratio: float = 0.0  # fine-tuning: warm-up as a fraction of all steps (overrides warmup_steps)
    schedule: str = _choice("linear", "linear", "cosine", "constant")
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    clip_norm: float = 1.0  # 0 disables clipping
    nonfinite: str = _choice("skip", "skip", "stop")  # what a NaN/inf loss or gradient does
    freeze: str = _choice("none", "none", "trunk")  # trunk: train only the head (linear probe, head re-fit)
    lora: LoraConfig = field(default_factory=LoraConfig)  # lora.rank > 0: train adapters (and a new head) only


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices left over
    fsdp: int = 1  # -1 (with data set): all devices left over
    tensor: int = 1
    coordinator: str | None = None  # multi-process: host:port of process 0 (else from environment)
    num_processes: int | None = None
    process_id: int | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (0: only at the end)
    keep: int = 2
    async_save: bool = True


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


_SECTION_TYPES = {
    "run": RunConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
}
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_RECIPE = "bert_tiny_mlm.yaml"


def _keys(cls, *without: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in without)


# The keys each verb takes: load_config(..., verb=) rejects any other key set, which that verb would ignore.
_SHARED = {"run": _keys(RunConfig), "mesh": _keys(MeshConfig), "checkpoint": _keys(CheckpointConfig)}
_PRETRAIN = {
    **_SHARED,
    "model": _keys(ModelConfig, "num_labels", "quant", "lora"),  # model.init: continued pretraining
    "data": ("path", "format", "text_field", "tokenizer", "tokenizer_vocab", "seq_len", "mask_prob",
             "valid_fraction", "synthetic_docs", "cache_dir", "cache_workers"),
    "train": ("task", "steps", "schedule_steps", "batch_size", "grad_accum", "seed", "log_every", "eval_every",
              "eval_at_start", "eval_batches", "lr", "warmup_steps", "schedule", "weight_decay", "b1", "b2", "eps",
              "clip_norm", "nonfinite"),
}
VERB_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "pretrain": _PRETRAIN,
    # benchmarks / compiles pretraining recipes (for a TPU topology) from a random init
    "bench": {**_PRETRAIN, "model": _keys(ModelConfig, "num_labels", "init", "quant", "lora")},
    "compile": {**_PRETRAIN, "model": _keys(ModelConfig, "num_labels", "init", "quant", "lora")},
    "finetune": {
        **_SHARED,
        "model": _keys(ModelConfig, "num_labels", "quant", "lora"),
        "data": ("tokenizer", "seq_len", "train", "valid", "test", "token_column", "tag_column", "text_column",
                 "label_column", "length_bucketing", "packing"),
        "train": ("task", "epochs", "batch_size", "grad_accum", "seed", "log_every", "eval_at_start", "lr",
                  "warmup_steps", "warmup_ratio", "schedule", "weight_decay", "b1", "b2", "eps", "clip_norm",
                  "nonfinite", "freeze", "lora"),  # evaluation is per epoch: no steps, eval_every, eval_batches
    },
}


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check (and gently convert) one value against its annotation."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    name = getattr(hint, "__name__", str(hint))
    raise JaxfoundError(f"{source}: key '{key}' must be {name}, got {value!r}")


def _build(cls, values: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in allowed:
            raise JaxfoundError(f"{source}: unknown key '{prefix}{k}' "
                                f"(allowed under '{prefix[:-1]}': {', '.join(allowed)})")
        f = next(f for f in dataclasses.fields(cls) if f.name == k)
        if prefix + k == "model.remat" and isinstance(v, bool):  # earlier configs: remat: true / false
            v = "full" if v else "none"
        if dataclasses.is_dataclass(hints[k]):  # a nested section, e.g. train.lora
            if v is None:
                v = {}
            if not isinstance(v, dict):
                raise JaxfoundError(f"{source}: key '{prefix}{k}' must be a mapping of keys "
                                    f"({', '.join(_keys(hints[k]))}), got {v!r}")
            kwargs[k] = _build(hints[k], v, f"{prefix}{k}.", source)
            continue
        v = _coerce(v, hints[k], prefix + k, source)
        choices = f.metadata.get("choices")
        if choices and v not in choices:
            raise JaxfoundError(f"{source}: key '{prefix}{k}' is {v!r}; allowed: {', '.join(map(str, choices))}")
        kwargs[k] = v
    return cls(**kwargs)


_POSITIVE = ("model.hidden_size", "model.num_layers", "model.num_heads", "model.intermediate_size",
             "model.max_position", "model.type_vocab_size", "model.layer_norm_eps", "model.rope_theta",
             "model.rope_factor", "data.tokenizer_vocab",
             "train.epochs", "train.batch_size", "train.grad_accum", "train.log_every", "train.eval_every",
             "train.eval_batches", "checkpoint.keep")
_NON_NEGATIVE = ("model.vocab_size", "model.head_dim", "model.sliding_window", "model.pad_token_id",
                 "data.synthetic_docs", "data.cache_workers", "train.steps", "train.schedule_steps",
                 "train.warmup_steps", "train.lr", "train.weight_decay", "train.eps", "train.clip_norm",
                 "checkpoint.every")
_UNIT = {"model.dropout": (0.0, 1.0, "[0, 1)"), "data.mask_prob": (0.0, 1.0, "(0, 1)"),
         "data.valid_fraction": (0.0, 1.0, "[0, 1)"), "train.warmup_ratio": (0.0, 1.0, "[0, 1]"),
         "train.b1": (0.0, 1.0, "[0, 1)"), "train.b2": (0.0, 1.0, "[0, 1)")}


def validate(cfg: Config, source: str = "<config>") -> Config:
    """Value ranges and the few cross-key constraints, checked before any work (a zero batch size would
    otherwise surface as a ZeroDivisionError deep inside the data pipeline)."""
    def get(key):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    def bad(key, valid):
        return JaxfoundError(f"{source}: key '{key}' is {get(key)!r}; it must be {valid}")

    for key in _POSITIVE:
        if not get(key) > 0:
            raise bad(key, "> 0")
    for key in _NON_NEGATIVE:
        if not get(key) >= 0:  # also rejects NaN
            raise bad(key, ">= 0")
    for key, (lo, hi, text) in _UNIT.items():
        v = get(key)
        ok = lo <= v <= hi and (v < hi or text.endswith("]")) and (v > lo or text.startswith("["))
        if not ok:
            raise bad(key, f"in {text}")
    for key in ("data", "fsdp", "tensor"):
        if not (getattr(cfg.mesh, key) == -1 or getattr(cfg.mesh, key) > 0):
            raise bad(f"mesh.{key}", "-1 (all devices left over) or > 0")
    if sum(getattr(cfg.mesh, k) == -1 for k in ("data", "fsdp", "tensor")) > 1:
        raise bad("mesh.data", "a size when mesh.fsdp or mesh.tensor is -1 (at most one axis takes the rest)")
    if cfg.data.seq_len < 2:
        raise bad("data.seq_len", ">= 2")
    for section in ("train", "model"):
        lora = getattr(cfg, section).lora
        if lora.rank < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
            raise JaxfoundError(f"{source}: {section}.lora is {lora}; it needs rank >= 0, alpha > 0, dropout in [0, 1)")
        try:
            re.compile(lora.targets)
        except re.error as e:
            raise JaxfoundError(f"{source}: key '{section}.lora.targets' is {lora.targets!r}, not a regular expression "
                                f"({e}); give 'all-linear' or a regular expression over module paths, e.g. "
                                "'attention/(query|value)'") from None
    if cfg.train.lora.rank and cfg.train.freeze == "trunk":
        raise bad("train.freeze", "'none' with train.lora.rank > 0 (LoRA already freezes the base weights)")
    if cfg.model.hidden_size % cfg.model.num_heads and not (cfg.model.arch == "llama" and cfg.model.head_dim):
        raise bad("model.num_heads", f"a divisor of model.hidden_size={cfg.model.hidden_size} (or set model.head_dim)")
    if cfg.model.num_kv_heads < 0 or cfg.model.num_heads % (cfg.model.num_kv_heads or cfg.model.num_heads):
        raise bad("model.num_kv_heads", f"0 or a divisor of model.num_heads={cfg.model.num_heads}")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise bad("train.grad_accum", f"a divisor of train.batch_size={cfg.train.batch_size}")
    own_positions = cfg.model.init is None  # else model.init's: the driver checks data.seq_len against them
    if own_positions and cfg.data.seq_len > cfg.model.max_position:
        raise bad("data.seq_len", f"<= model.max_position={cfg.model.max_position}")
    roberta = own_positions and cfg.model.arch == "roberta"
    if roberta and cfg.data.seq_len + cfg.model.pad_token_id + 1 > cfg.model.max_position:
        raise bad("data.seq_len", f"<= model.max_position - model.pad_token_id - 1 = "
                  f"{cfg.model.max_position - cfg.model.pad_token_id - 1} (RoBERTa's positions start at "
                  f"pad_token_id + 1)")
    return cfg


def from_dict(raw: dict, source: str = "<config>") -> Config:
    """Build a validated Config from a nested dict (as read from YAML)."""
    if not isinstance(raw, dict):
        raise JaxfoundError(f"{source}: the top level must be a mapping of sections ({', '.join(_SECTION_TYPES)})")
    sections = {}
    for name, values in raw.items():
        if name not in _SECTION_TYPES:
            raise JaxfoundError(f"{source}: unknown section '{name}' (allowed: {', '.join(_SECTION_TYPES)})")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise JaxfoundError(f"{source}: section '{name}' must be a mapping of keys, got {values!r}")
        sections[name] = _build(_SECTION_TYPES[name], values, name + ".", source)
    return validate(Config(**sections), source)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.steps=40`` -> (['train', 'steps'], 40); values are parsed as YAML scalars."""
    if "=" not in text:
        raise JaxfoundError(f"override '{text}': expected section.key=value, e.g. train.steps=40")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) not in (2, 3) or not all(parts):
        raise JaxfoundError(f"override '{text}': key must be section.key or section.group.key, e.g. train.lora.rank "
                            f"(sections: {', '.join(_SECTION_TYPES)})")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):
        raise JaxfoundError(f"override '{text}': value must be a scalar")
    return parts, value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        recipes = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
        raise JaxfoundError(f"config file {path} not found (recipes in configs/: {recipes})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]  # ReaderError has no .problem
        raise JaxfoundError(f"{where}: invalid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise JaxfoundError(f"{path}: not UTF-8 text") from None
    return raw if raw is not None else {}


def load_config(path: str | Path | None = None, overrides: list[str] = (), verb: str | None = None) -> Config:
    """Read a YAML recipe (default: configs/bert_tiny_mlm.yaml) and apply dotted overrides; with ``verb``
    ("pretrain", "finetune", "bench"), a key set in either that the verb does not take (VERB_KEYS) is an error."""
    path = Path(path) if path else CONFIG_DIR / DEFAULT_RECIPE
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise JaxfoundError(f"{path}: the top level must be a mapping of sections ({', '.join(_SECTION_TYPES)})")
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        (section, key, *sub), value = parse_override(text)
        if section not in _SECTION_TYPES:
            raise JaxfoundError(f"override '{text}': unknown section '{section}' "
                                f"(allowed: {', '.join(_SECTION_TYPES)})")
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        if sub:  # section.group.key
            group = raw[section].get(key)
            raw[section][key] = dict(group) if isinstance(group, dict) else {}
            raw[section][key][sub[0]] = value
        else:
            raw[section][key] = value
    source = f"{path}" + (" + overrides" if overrides else "")
    taken = VERB_KEYS[verb] if verb is not None else {}
    for section, values in raw.items():
        if section not in taken or not isinstance(values, dict):
            continue  # unknown sections and keys, bad values: from_dict names them
        for key in values:
            if key not in taken[section] and key in _keys(_SECTION_TYPES[section]):
                raise JaxfoundError(f"{source}: key '{section}.{key}' is not used by `jaxfound {verb}` "
                                    f"({section} keys it takes: {', '.join(taken[section])})")
    return from_dict(raw, source=source)


def replace(cfg: Config, **sections: dict) -> Config:
    """``replace(cfg, train={'steps': 40})``: a new Config with some keys changed."""
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), **values) for name, values in sections.items()}
    )
