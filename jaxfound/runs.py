"""The run directory: the only code that reads or writes one.

    run = open_run("runs/ner")            # any kind: pretrained, finetuned, merged, quantized, or a transformers dir
    run.model.apply({"params": run.params}, ids)
    write_run("runs/ner_copy", config, params, labels=run.labels, tokenizer=run.tokenizer)

Layout: config.json (the resolved Config), labels.json (classifiers), tokenizer/, best/ (params, orbax) or
params.safetensors + quant.json (int8), checkpoints/ (train state + data position), metrics.jsonl, summary.json,
report_<split>.json, merge.json / quant_report.json. A transformers dir (config.json + safetensors) opens through
jaxfound.interop, and so does a GGUF file (kind 'gguf'); a PEFT LoRA adapter dir (kind 'adapter') opens on the base
model its adapter_config.json names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxfound import checkpoint as ckpt
from jaxfound.config import Config, DataConfig, LoraConfig, TrainConfig, from_dict, to_dict
from jaxfound.data.finetune import special_ids
from jaxfound.data.tokenizer import load_tokenizer
from jaxfound.errors import JaxfoundError
from jaxfound.interop.gguf import gguf_tokenizer
from jaxfound.interop.hf import from_pretrained, load_hf_config
from jaxfound.interop.peft import CONFIG_FILE as ADAPTER_CONFIG
from jaxfound.interop.peft import load_adapter, read_adapter_config
from jaxfound.models import build_model, lora
from jaxfound.models.scan import unstack_layers
from jaxfound.quant.checkpoint import META_FILE as QUANT_META
from jaxfound.quant.checkpoint import load_quantized, save_quantized
from jaxfound.tasks import HEAD_TASK, get_task, resolve_task

KINDS = ("pretrained", "finetuned", "merged", "quantized", "transformers", "gguf", "adapter")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")


@dataclass
class Run:
    """A model from disk with what inference, merging and export need."""

    path: Path
    kind: str  # one of KINDS
    config: Config
    task: object  # jaxfound.tasks.Task
    model: object  # the flax module (its .head may differ from the task's for a bare transformers model)
    params: dict
    tokenizer: object | None
    labels: list[str] | None

    @property
    def pad_id(self) -> int:
        return special_ids(self.tokenizer)[2]


def kind_of(path: str | Path) -> str:
    """What a directory (or a .gguf file) holds, from its files alone."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise JaxfoundError(f"{path}: GGUF file not found")
        return "gguf"
    if not (p / "config.json").is_file() and (p / ADAPTER_CONFIG).is_file():
        return "adapter"
    if not (p / "config.json").is_file():
        raise JaxfoundError(f"{path}: no config.json; expected a jaxfound run dir, a transformers dir or a PEFT "
                            "adapter dir")
    if not {"run", "model"} <= _read_json(p / "config.json").keys():
        return "transformers"
    if (p / QUANT_META).is_file():
        return "quantized"
    if (p / "merge.json").is_file():
        return "merged"
    if (p / "labels.json").is_file() and (p / "best").exists():
        return "finetuned"
    if (p / "best").exists() or (p / "checkpoints").is_dir():
        return "pretrained"
    raise JaxfoundError(f"{path}: a jaxfound config.json but no params (best/, checkpoints/ or {QUANT_META})")


def open_run(path: str | Path, head: str | None = None, adapters: bool = False, convert=None) -> Run:
    """Any model directory jaxfound reads, opened the same way; head: a transformers dir's head (default: its own,
    'none': the trunk alone).

    A run with LoRA adapters (model.lora.rank > 0) opens with them folded into its kernels (model.lora off), so every
    reader sees a plain model; adapters=True keeps them apart (PEFT export, adapter merges).

    A run trained with model.scan_layers opens unrolled (params unstacked, scan_layers false in run.config): every
    reader (inference, KV-cache decoding, merging, quantizing, export) sees one layout; fine-tuning stacks again."""
    p = Path(path)
    kind = kind_of(p)
    if kind in ("transformers", "gguf"):  # convert: interop.hf.params_from_weights's per-tensor hook
        return _open_transformers(p, head, convert)
    if kind == "adapter":
        return _open_adapter(p, head, adapters)
    cfg = from_dict(read_config(p), source=str(p / "config.json"))
    task = resolve_task(cfg)  # `train.task=ner data.tag_column=1` was a POS run
    tok_dir = p / "tokenizer" if (p / "tokenizer").is_dir() else cfg.data.tokenizer  # a moved one: None
    tokenizer = load_tokenizer(str(tok_dir)) if tok_dir and Path(tok_dir).is_dir() else None
    params = read_params(p, kind)
    if cfg.model.scan_layers:
        params = unstack_layers(params)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
    if cfg.model.lora.rank and not adapters:
        params = lora.fold(params, cfg.model.lora.alpha)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=LoraConfig()))
    return Run(p, kind, cfg, task, build_model(cfg.model, task.head), params, tokenizer, read_labels(p))


def _open_transformers(p: Path, head: str | None, convert=None) -> Run:
    """A transformers directory, or a GGUF file (its tokenizer and chat template come from its metadata)."""
    info = load_hf_config(p, head)
    model, params = from_pretrained(p, head, convert=convert)
    labels = [info.id2label[i] for i in range(len(info.id2label))] if info.id2label else None
    if p.suffix.lower() == ".gguf":
        tokenizer, kind = gguf_tokenizer(p), "gguf"
    else:
        has_tok = any((p / f).is_file() for f in TOKENIZER_FILES)
        tokenizer, kind = (load_tokenizer(str(p)) if has_tok else None), "transformers"
    # windows no longer than the model's positions (a small model's 64 would be overrun by the default 128)
    data = DataConfig(seq_len=min(DataConfig.seq_len, model.cfg.max_position))
    cfg = Config(model=model.cfg, data=data, train=TrainConfig(task=HEAD_TASK[model.head]))
    return Run(p, kind, cfg, get_task(cfg.train.task), model, params, tokenizer, labels)


def _open_adapter(p: Path, head: str | None, adapters: bool) -> Run:
    """A PEFT LoRA adapter dir on the base model its adapter_config.json names (a local path)."""
    base_path = read_adapter_config(p).get("base_model_name_or_path")
    if not base_path or not Path(base_path).exists():
        raise JaxfoundError(f"{p / ADAPTER_CONFIG}: base_model_name_or_path is {base_path!r}, not a local model; set "
                            "it to the base model's directory (a transformers dir, GGUF file or jaxfound run dir)")
    base = open_run(base_path, head)
    model, params = load_adapter(p, base.model, base.params)
    if not adapters:
        params = lora.fold(params, model.cfg.lora.alpha)
        model = build_model(dataclasses.replace(model.cfg, lora=LoraConfig()), model.head)
    cfg = dataclasses.replace(base.config, model=model.cfg)
    has_tok = any((p / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = load_tokenizer(str(p)) if has_tok else base.tokenizer
    labels = read_labels(p) or base.labels  # jaxfound writes labels.json beside an adapter it exports
    return Run(p, "adapter", cfg, base.task, model, params, tokenizer, labels)


def require_float(run: Run, verb: str) -> Run:
    """run, if its params are float (export writes float weights); an int8 run names the way back."""
    if run.kind == "quantized":
        raise JaxfoundError(f"{run.path} is int8-quantized; {verb} the float run it came from")
    return run


def read_params(p: Path, kind: str) -> dict:
    """int8 + float params of a quantized dir, best/ of a fine-tuned or merged one, else the latest checkpoint's."""
    if kind == "quantized":  # placed once, not per call
        return jax.tree.map(jnp.asarray, load_quantized(p)[0])
    return ckpt.load_params(p / "best") if (p / "best").exists() else ckpt.latest_params(p)


# ---------------------------------------------------------------- files


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise JaxfoundError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_config(run_dir: str | Path) -> dict:
    """The resolved config a run saved (run_dir/config.json)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise JaxfoundError(f"{path} not found: is {run_dir} a jaxfound run directory?")
    return _read_json(path)


def read_labels(run_dir: str | Path) -> list[str] | None:
    """labels.json: a classifier's label names in id order (None for other runs)."""
    path = Path(run_dir) / "labels.json"
    return _read_json(path) if path.is_file() else None


def check_run_dir(run_dir: str | Path) -> None:
    """Fail before any work if the run dir cannot be written."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe_{os.getpid()}"  # per process: several may share run_dir
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise JaxfoundError(f"run.dir={run_dir}: not writable ({e.strerror}); choose another run.dir") from None


def _jsonable(obj):
    try:
        return float(obj)  # numpy scalars
    except (TypeError, ValueError):
        return str(obj)  # paths, dataclasses


def write_json(path: str | Path, obj, indent: int = 1) -> Path:
    """A JSON file written whole or not at all: a kill mid-write leaves no file that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent, default=_jsonable))
    os.replace(tmp, path)
    return path


def write_config(run_dir: str | Path, config: Config | dict) -> Path:
    return write_json(Path(run_dir) / "config.json", to_dict(config) if isinstance(config, Config) else config, 2)


def write_labels_and_tokenizer(run_dir: str | Path, labels: list[str] | None, tokenizer) -> None:
    run_dir = Path(run_dir)
    if labels is not None:
        write_json(run_dir / "labels.json", labels)
    if tokenizer is not None:
        if (run_dir / "tokenizer").exists():
            shutil.rmtree(run_dir / "tokenizer")
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))


def save_best(run_dir: str | Path, params) -> None:
    ckpt.save_params(Path(run_dir) / "best", params)


def load_best(run_dir: str | Path) -> dict:
    return ckpt.load_params(Path(run_dir) / "best")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl's rows (none if it is missing; a line cut by a crash is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def open_metrics_log(run_dir: str | Path, resume_step: int):
    """metrics.jsonl opened for append; rows past the resumed step (from a run that died later) are dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step))
    return path.open("a")


def write_run(out: str | Path, config: Config | dict, params, *, labels=None, tokenizer=None,
              quant: dict | None = None, reports: dict[str, dict] | None = None) -> Path:
    """A whole run dir for a model made without training (merged, quantized): config.json (run.dir = out, no
    registry), labels.json, tokenizer/, the params (best/, or int8 with quant = quant.json's metadata), reports."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = to_dict(config) if isinstance(config, Config) else dict(config)
    config["run"] = dict(config.get("run", {}), dir=str(out), registry=None)
    data = config.get("data", {})  # kept within the model's positions, as the config validates
    config["data"] = dict(data, seq_len=min(data.get("seq_len", 128), config["model"]["max_position"]))
    write_config(out, config)
    write_labels_and_tokenizer(out, labels, tokenizer)
    if quant is not None:
        save_quantized(out, params, quant)
    else:
        save_best(out, params)
    for name, report in (reports or {}).items():
        write_json(out / name, report)
    return out


def config_for(run: Run, **model_changes) -> dict:
    """The run's config as a dict, with some model keys changed."""
    return to_dict(dataclasses.replace(run.config, model=dataclasses.replace(run.config.model, **model_changes)))
