"""RoBERTa (and XLM-RoBERTa) against PyTorch transformers: loaded and saved models give the same numbers.

Random tiny configs of each class with odd sizes, right padding with RoBERTa's pad id inside the batch, and a row
that reaches the last position embedding (positions run from pad_token_id + 1 to max_position - 1).
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfound.config import ModelConfig
from jaxfound.errors import JaxfoundError
from jaxfound.interop.hf import from_pretrained, load_hf_config, save_pretrained
from jaxfound.models import build_model
from jaxfound.models.bert import position_ids

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
SHAPES = {  # max_position - pad_token_id - 1 is the longest row the model takes: the batch below reaches it
    "h36_pad1": dict(vocab_size=97, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=53, max_position_embeddings=15, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, type_vocab_size=1, layer_norm_eps=1e-5),
    "h20_pad3_gelu_new": dict(vocab_size=61, hidden_size=20, num_hidden_layers=3, num_attention_heads=5,
                              intermediate_size=29, max_position_embeddings=17, pad_token_id=3, bos_token_id=0,
                              eos_token_id=2, type_vocab_size=1, hidden_act="gelu_new"),
}
CLASSES = ["RobertaModel", "RobertaForMaskedLM", "RobertaForTokenClassification", "RobertaForSequenceClassification",
           "XLMRobertaForTokenClassification", "XLMRobertaForMaskedLM"]


def _batch(vocab_size, pad_id, longest, seed=0):
    """ids (3, longest): <s> (0) ... </s> (2) then pad_id; lengths longest, 7 and 4; the attention mask."""
    rng = np.random.default_rng(seed)
    lengths = (longest, 7, 4)
    mask = (np.arange(longest)[None] < np.array(lengths)[:, None]).astype(np.int64)
    ids = rng.integers(5, vocab_size, (3, longest))
    ids[:, 0] = 0
    ids[np.arange(3), np.array(lengths) - 1] = 2
    return np.where(mask == 1, ids, pad_id), mask


def _torch_model(cls_name, shape, seed):
    cfg_cls = transformers.XLMRobertaConfig if cls_name.startswith("XLM") else transformers.RobertaConfig
    hf_cfg = cfg_cls(**SHAPES[shape], id2label=LABELS, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(hf_cfg).eval()
    with torch.no_grad():  # perturb every weight, so zero biases and unit LayerNorms are checked too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, hf_cfg


def _torch_out(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits).numpy()


def _ours(model, params, ids, mask):
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))


def _max_diff(a, b, mask, per_token):
    assert a.shape == b.shape
    if per_token:
        a, b = a[mask.astype(bool)], b[mask.astype(bool)]
    return float(np.max(np.abs(a - b)))


def test_positions_count_from_the_pad_id_over_real_tokens():
    cfg = ModelConfig(arch="roberta", pad_token_id=1)
    ids = jnp.array([[0, 7, 8, 2, 1, 1], [0, 9, 2, 1, 1, 1]])
    assert position_ids(ids, cfg).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]]
    assert position_ids(ids, ModelConfig(arch="bert")).tolist() == [[0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_from_pretrained_matches_transformers(cls_name, shape, tmp_path):
    torch_model, hf_cfg = _torch_model(cls_name, shape, seed=len(cls_name) + len(shape))
    torch_model.save_pretrained(tmp_path)
    model, params = from_pretrained(tmp_path)
    assert model.cfg.arch == "roberta" and model.cfg.pad_token_id == hf_cfg.pad_token_id
    longest = hf_cfg.max_position_embeddings - hf_cfg.pad_token_id - 1
    ids, mask = _batch(hf_cfg.vocab_size, hf_cfg.pad_token_id, longest)
    theirs = _torch_out(torch_model, ids, mask)
    diff = _max_diff(_ours(model, params, ids, mask), theirs, mask, "Sequence" not in cls_name)
    print(f"{cls_name}[{shape}] max|diff| = {diff:.2e} (max|logit| {np.abs(theirs).max():.2f})")
    assert diff <= TOL


@pytest.mark.parametrize(("head", "cls_name"), [("mlm", "RobertaForMaskedLM"), ("token_cls",
                         "RobertaForTokenClassification"), ("seq_cls", "RobertaForSequenceClassification"),
                         ("none", "RobertaModel")])
def test_save_pretrained_round_trips_through_transformers(head, cls_name, tmp_path):
    cfg = ModelConfig(arch="roberta", vocab_size=71, hidden_size=24, num_layers=2, num_heads=3, intermediate_size=40,
                      max_position=20, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
                      num_labels=5 if "cls" in head else 0)
    model = build_model(cfg, head)
    ids, mask = _batch(cfg.vocab_size, 1, cfg.max_position - 2, seed=3)
    params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(ids))["params"])
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32), params)
    save_pretrained(tmp_path, model, params, id2label=list(LABELS.values()) if "cls" in head else None)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "roberta"
    torch_model, info = getattr(transformers, cls_name).from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]  # RobertaModel's unused pooler
    assert not missing and not info["unexpected_keys"] and not info["mismatched_keys"], info
    diff = _max_diff(_ours(model, params, ids, mask), _torch_out(torch_model.eval(), ids, mask), mask,
                     head != "seq_cls")
    print(f"round trip {cls_name} max|diff| = {diff:.2e}")
    assert diff <= TOL
    _, reloaded = from_pretrained(tmp_path)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b), params, reloaded))


def test_a_roberta_dir_names_its_config(tmp_path):
    torch_model, _ = _torch_model("RobertaForTokenClassification", "h36_pad1", 0)
    torch_model.save_pretrained(tmp_path)
    info = load_hf_config(tmp_path)
    assert (info.head, info.architecture, info.model.type_vocab_size, info.model.max_position) == (
        "token_cls", "RobertaForTokenClassification", 1, 15)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"position_embedding_type": "relative_key"}))
    with pytest.raises(JaxfoundError, match=r"position_embedding_type 'relative_key' not supported"):
        load_hf_config(tmp_path)


def test_sequence_too_long_for_roberta_positions_is_a_config_error():
    from jaxfound.config import from_dict

    with pytest.raises(JaxfoundError, match=r"data\.seq_len.*<= model\.max_position - model\.pad_token_id - 1 = 12"):
        from_dict({"model": {"arch": "roberta", "max_position": 14, "pad_token_id": 1}, "data": {"seq_len": 13}})
