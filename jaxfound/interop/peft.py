"""PEFT LoRA adapters both ways: adapter_config.json + adapter_model.safetensors that ``peft.PeftModel`` loads onto
the transformers model, and the same files (written by PEFT or by jaxfound) read onto a jaxfound model.

    save_adapter("out/adapter", model, params, base="path/to/base")   # params hold lora_a / lora_b (models.lora)
    model, params = load_adapter("out/adapter", base_model, base_params)

Layouts: PEFT's lora_A.weight is A^T (r, in) and lora_B.weight is B^T (out, r) for Linear and GPT-2's Conv1D alike.
GPT-2's fused c_attn holds jaxfound's separate query / key / value: written as one adapter of rank 3r (A side by side,
B block-diagonal, so the update is exactly theirs) with rank_pattern / alpha_pattern; read back split.
Modules of other ranks or alphas (rank_pattern, alpha_pattern) read exactly: every adapter is zero-padded to the
largest rank and its B rescaled to one common alpha / r.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxfound.config import LoraConfig
from jaxfound.errors import JaxfoundError
from jaxfound.interop import hf
from jaxfound.models import build_model, lora
from jaxfound.models.scan import unstack_layers

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {"token_cls": "TOKEN_CLS", "seq_cls": "SEQ_CLS", "lm": "CAUSAL_LM", "none": "FEATURE_EXTRACTION",
              "mlm": None}


def _modules(cfg, head: str):
    """(our Dense module paths, the module's name in the transformers model as PEFT keys it, conversion) for every
    linear layer of the transformers model."""
    for hf_name, ours, kind in hf._entries(cfg, head, hf.model_type_of(cfg)):
        if not hf_name.endswith(".weight") or ours[0][-1] != "kernel" or kind not in ("T", "copy", "split3"):
            continue
        module = hf_name[: -len(".weight")]
        full = hf.TRUNK_PREFIX[cfg.arch] + module if head != "none" and hf._is_trunk(hf_name) else module
        yield tuple(p[:-1] for p in ours), full, kind


def _node(tree: dict, path: tuple) -> dict | None:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _head_entries(cfg, head: str):
    """(transformers tensor name, our param path, conversion) of the heads trained beside LoRA adapters."""
    trained = lora.TRAINED_HEADS[cfg.arch]
    for hf_name, ours, kind in hf._entries(cfg, head, hf.model_type_of(cfg)):
        if ours[0][0] in trained and kind in ("T", "copy"):
            yield hf_name, ours[0], kind


def _target_modules(adapted: list[str], all_modules: list[str]) -> list[str]:
    """Short module names (PEFT matches a name against the end of each module's path) when they pick out exactly
    the adapted modules, else their full names."""
    names = {m.rsplit(".", 1)[-1] for m in adapted}
    if {m for m in all_modules if m.rsplit(".", 1)[-1] in names} == set(adapted):
        return sorted(names)
    return sorted(adapted)


def save_adapter(path, model, params, base: str | None = None) -> Path:
    """Write the adapters (and trained heads) of params as a PEFT LoRA adapter directory; base: the base model's
    path, recorded as base_model_name_or_path."""
    cfg, head = model.cfg, model.head
    if not cfg.lora.rank:
        raise JaxfoundError("the model has no LoRA adapters (model.lora.rank is 0); fine-tune with train.lora.rank > 0")
    params = unstack_layers(jax.device_get(nn.unbox(params)))
    r, alpha = cfg.lora.rank, cfg.lora.alpha
    tensors, adapted, all_modules, rank_pattern, alpha_pattern = {}, [], [], {}, {}
    for paths, module, kind in _modules(cfg, head):
        nodes = [_node(params, p) or {} for p in paths]
        all_modules.append(module)
        if not any("lora_a" in n for n in nodes) or paths[0][0] in lora.TRAINED_HEADS[cfg.arch]:
            continue  # trained heads are saved whole (modules_to_save)
        if kind == "split3":  # one rank-3r adapter on c_attn: [A_q A_k A_v] and B block-diagonal
            outs = [np.asarray(n["kernel"]).shape[-1] for n in nodes]
            ins = np.asarray(nodes[0]["kernel"]).shape[0]
            a = np.concatenate([np.asarray(n.get("lora_a", np.zeros((ins, r))), np.float32) for n in nodes], axis=1)
            b = np.zeros((3 * r, sum(outs)), np.float32)
            for i, n in enumerate(nodes):
                if "lora_b" in n:
                    b[i * r:(i + 1) * r, sum(outs[:i]):sum(outs[:i + 1])] = np.asarray(n["lora_b"], np.float32)
            rank_pattern[module], alpha_pattern[module] = 3 * r, 3 * alpha
        else:
            a, b = np.asarray(nodes[0]["lora_a"], np.float32), np.asarray(nodes[0]["lora_b"], np.float32)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
        adapted.append(module)
    if not adapted:
        raise JaxfoundError("the params hold no LoRA adapters (lora_a / lora_b) on layers transformers has")
    modules_to_save = set()
    for hf_name, ours, kind in _head_entries(cfg, head):
        value = np.asarray(hf._lookup(params, ours), np.float32)
        tensors[PREFIX + hf_name] = np.ascontiguousarray(value.T if kind == "T" else value)
        modules_to_save.add(hf_name.split(".")[0])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": TASK_TYPES[head], "base_model_name_or_path": base, "r": r,
        "lora_alpha": alpha, "lora_dropout": cfg.lora.dropout, "target_modules": _target_modules(adapted, all_modules),
        "modules_to_save": sorted(modules_to_save) or None, "bias": "none", "fan_in_fan_out": cfg.arch == "gpt",
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------- read


def read_adapter_config(path) -> dict:
    """adapter_config.json of a PEFT LoRA adapter dir, checked for what jaxfound can apply."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise JaxfoundError(f"{path}: no {CONFIG_FILE}; expected a PEFT adapter directory")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxfoundError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise JaxfoundError(f"{file}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}; "
                            "jaxfound reads LORA adapters")
    for key in ("use_dora", "use_rslora", "lora_bias"):
        if config.get(key):
            raise JaxfoundError(f"{file}: '{key}' is set; jaxfound applies plain LoRA (x A B scaled by alpha / r)")
    if config.get("bias", "none") != "none":
        raise JaxfoundError(f"{file}: bias is {config['bias']!r}; jaxfound reads adapters with bias 'none'")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise JaxfoundError(f"{file}: '{key}' is {config.get(key)!r}; it must be a positive number")
    return config


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name that ends with it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(path, model, params):
    """(model with adapters, params with lora_a / lora_b and the adapter's trained heads) from a PEFT LoRA
    adapter dir applied onto model / params (unrolled, float, no adapters: runs.open_run gives such)."""
    path = Path(path)
    config = read_adapter_config(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise JaxfoundError(f"{path}: no {WEIGHTS_FILE} (jaxfound reads safetensors adapters, never pickles)")
    raw = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in load_file(str(path / WEIGHTS_FILE)).items()}
    raw = {re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1.weight", k): v for k, v in raw.items()}
    cfg, head = model.cfg, model.head
    found = []  # (our module path, A (in, r_m), B (r_m, out), scale)
    for paths, module, _ in _modules(cfg, head):
        a, b = raw.pop(f"{module}.lora_A.weight", None), raw.pop(f"{module}.lora_B.weight", None)
        if a is None and b is None:
            continue
        if a is None or b is None:
            raise JaxfoundError(f"{path / WEIGHTS_FILE}: '{module}' has only one of lora_A / lora_B")
        r_m = _pattern(config.get("rank_pattern") or {}, module, config["r"])
        scale = _pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"]) / r_m
        a, b = np.asarray(a, np.float32).T, np.asarray(b, np.float32).T
        outs = [np.shape(_node(params, p)["kernel"])[-1] for p in paths]
        ins = np.shape(_node(params, paths[0])["kernel"])[0]
        if a.shape[0] != ins or b.shape[1] != sum(outs) or a.shape[1] != b.shape[0]:
            raise JaxfoundError(f"{path / WEIGHTS_FILE}: '{module}' adapter is {a.shape[0]} -> {b.shape[1]} (rank "
                                f"{a.shape[1]} / {b.shape[0]}) but the base layer is {ins} -> {sum(outs)}")
        for i, p in enumerate(paths):  # c_attn: A shared, B split by output
            found.append((p, a, b[:, sum(outs[:i]):sum(outs[:i + 1])], scale))
    if not found:
        raise JaxfoundError(f"{path}: no LoRA tensors for the layers of {hf.model_type_of(cfg)} (head {head!r})")
    rank = max(a.shape[1] for _, a, _, _ in found)
    base_scale = config["lora_alpha"] / config["r"]
    alpha = base_scale * rank  # common alpha / rank = the adapter's own scale; other scales go into B
    adapters = {}
    for p, a, b, scale in found:
        pad = rank - a.shape[1]
        a = np.pad(a, ((0, 0), (0, pad)))
        b = np.pad(b * (scale / base_scale), ((0, pad), (0, 0)))
        _set(adapters, p, {"lora_a": a, "lora_b": b})
    params = lora.combine(jax.device_get(dict(params)), adapters)
    for hf_name, ours, kind in _head_entries(cfg, head):
        value = raw.pop(hf_name, None)
        if value is not None:
            hf._set(params, ours, np.asarray(value, np.float32).T if kind == "T" else np.asarray(value, np.float32))
    if "classifier" in params:  # the adapter's head may label other classes than the base model's own head
        num_labels = np.shape(params["classifier"]["kernel"])[-1]
        if np.shape(params["classifier"].get("bias", np.zeros(num_labels))) != (num_labels,):
            params["classifier"]["bias"] = np.zeros(num_labels, np.float32)  # transformers' score has no bias
        cfg = dataclasses.replace(cfg, num_labels=num_labels)
    if raw:
        raise JaxfoundError(f"{path / WEIGHTS_FILE}: tensors jaxfound cannot place on {hf.model_type_of(cfg)} "
                            f"(head {head!r}): {', '.join(sorted(raw)[:10])}")
    targets = "^(" + "|".join(re.escape("/".join(p)) for p, *_ in found) + ")$"
    lora_cfg = LoraConfig(rank=rank, alpha=float(alpha), dropout=float(config.get("lora_dropout") or 0.0),
                          targets=targets)
    return build_model(dataclasses.replace(cfg, lora=lora_cfg), head), params


def _set(tree: dict, path: tuple, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_adapter", "read_adapter_config", "save_adapter"]
