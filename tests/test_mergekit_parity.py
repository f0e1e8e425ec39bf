"""jaxfound's merges equal mergekit 0.1.5's on the same transformers dirs: every tensor within 1e-5, for a tiny Llama
and a tiny BERT token classifier, every method both have. mergekit runs in-process (MergeConfiguration + run_merge)
on the recipe that jaxfound reads; merge_recipe's params, written by save_pretrained, are compared tensor by tensor
with the files mergekit writes (one end-to-end case runs `jaxfound merge --recipe --hf` itself).
DARE and DELLA draw their masks from different generators, so they are checked where they are deterministic
(density 1); their kept fraction and rescale are checked in test_merge.py."""

import numpy as np
import pytest
import yaml

from jaxfound import cli, runs
from jaxfound.fusion.recipe import merge_recipe, parse_recipe
from jaxfound.interop.hf import read_weights, save_pretrained, transformers_names

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
try:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
except ImportError as e:  # the test extra pins mergekit==0.1.5
    pytest.skip(f"mergekit cannot be imported ({e}); pip install mergekit==0.1.5", allow_module_level=True)

# shapes shared between the two families where they can be: the merge kernels compile once per shape
LLAMA = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, id2label={0: "O", 1: "B-PER", 2: "I-PER"})
PARALLEL = {"llama": "model.layers.1.mlp.up_proj.weight", "bert": "bert.encoder.layer.1.intermediate.dense.weight"}


def _write_family(root, family):
    """base, b, c: b and c are the base plus noise on every tensor; one of b's matrices is 1.5 x the base's, so every
    row of it is parallel to the base's (SLERP's linear fallback)."""
    cls, cfg = ((transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA)) if family == "llama" else
                (transformers.BertForTokenClassification, transformers.BertConfig(**BERT)))
    torch.manual_seed(0)
    model = cls(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {"base": root / f"{family}_base"}
    model.save_pretrained(paths["base"])
    for seed, name in ((1, "b"), (2, "c")):
        gen = torch.Generator().manual_seed(seed)
        state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in base.items()}
        if name == "b":
            state[PARALLEL[family]] = 1.5 * base[PARALLEL[family]]
        model.load_state_dict(state)
        paths[name] = root / f"{family}_{name}"
        model.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit")
    return {family: _write_family(root, family) for family in ("llama", "bert")}


@pytest.fixture(scope="module")
def opened(dirs):
    """Each dir opened once: {family: {name: Run}}."""
    return {family: {name: runs.open_run(path) for name, path in paths.items()} for family, paths in dirs.items()}


def _recipe_text(paths, method, models, parameters=None, model_parameters=None):
    items = [{"model": str(paths[m]), **({"parameters": model_parameters[i]} if model_parameters else {})}
             for i, m in enumerate(models)]
    raw = {"merge_method": method, "base_model": str(paths["base"]), "models": items, "dtype": "float32"}
    if parameters:
        raw["parameters"] = parameters
    return yaml.safe_dump(raw)


def _mergekit(text, out):
    """mergekit's tensors for a recipe: {transformers name: array}."""
    options = MergeOptions(cuda=False, copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), options=options)
    return read_weights(out)


def _assert_tensors_close(ours, theirs, where):
    assert ours.keys() == theirs.keys(), where
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-5, err_msg=f"{where}: {name}")


def _check(family, dirs, opened, tmp_path, method, models, parameters=None, model_parameters=None):
    paths, loaded = dirs[family], opened[family]
    text = _recipe_text(paths, method, models, parameters, model_parameters)
    want = _mergekit(text, tmp_path / f"mk_{family}")
    recipe = parse_recipe(yaml.safe_load(text), "recipe.yaml")
    got = merge_recipe(recipe, [loaded[m].params for m in models], loaded["base"].params,
                       names=transformers_names(loaded["b"].model))
    ours = read_weights(save_pretrained(tmp_path / f"ours_{family}", loaded["b"].model, got))
    _assert_tensors_close(ours, want, f"{family} {method} {parameters} {model_parameters}")


FILTERS = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
           {"filter": "attention", "value": [0.2, 0.9]}, {"filter": "intermediate", "value": 0.8}, {"value": 0.5}]
CASES = [
    ("linear", ["base", "b", "c"], None, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}]),
    ("task_arithmetic", ["b", "c"], {"lambda": 0.7}, [{"weight": 1.0}, {"weight": 0.5}]),
    ("ties", ["base", "b", "c"], {"density": 0.5}, [{}, {"weight": 1.0}, {"weight": [0.2, 1.0]}]),
    ("slerp", ["base", "b"], {"t": 0.0}, None),
    ("slerp", ["base", "b"], {"t": 0.3}, None),
    ("slerp", ["base", "b"], {"t": 1.0}, None),
    ("slerp", ["base", "b"], {"t": [0, 0.5, 1]}, None),
    ("slerp", ["base", "b"], {"t": FILTERS}, None),
    ("model_stock", ["b", "c"], None, None),
    ("model_stock", ["b", "c"], {"filter_wise": True}, None),
    ("breadcrumbs", ["b", "c"], {"density": 0.6, "gamma": 0.05}, [{"weight": 0.7}, {"weight": 0.4}]),
    ("breadcrumbs_ties", ["b", "c"], {"density": [0.9, 0.5]}, [{"weight": 1.0}, {"weight": 0.5, "gamma": 0.1}]),
    ("dare_ties", ["b", "c"], {"density": 1.0}, [{"weight": 1.0}, {"weight": 0.5}]),
    ("della", ["b", "c"], {"density": 1.0, "epsilon": 0.1}, [{"weight": 1.0}, {"weight": 0.5}]),
    ("della_linear", ["b", "c"], {"density": 1.0, "lambda": 0.8}, [{"weight": 1.0}, {"weight": 0.5}]),
]


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize(("method", "models", "parameters", "model_parameters"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_merge_equals_mergekit(dirs, opened, tmp_path, family, method, models, parameters, model_parameters):
    _check(family, dirs, opened, tmp_path, method, models, parameters, model_parameters)


def test_slerp_recipe_cli_writes_mergekit_tensors(dirs, tmp_path):
    """`jaxfound merge --recipe R --out D --hf` on a per-layer t gradient: the same files' tensors as mergekit's."""
    paths = dirs["llama"]
    text = _recipe_text(paths, "slerp", ["base", "b"], {"t": [{"filter": "mlp", "value": [1, 0]}, {"value": [0, 1]}]})
    (tmp_path / "r.yaml").write_text(text)
    assert cli.main(["merge", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "ours"), "--hf"]) == 0
    _assert_tensors_close(read_weights(tmp_path / "ours"), _mergekit(text, tmp_path / "theirs"), "cli slerp")


def test_gradients_and_filters_resolve_as_mergekit_resolves_them():
    from mergekit.config import ParameterSetting, evaluate_setting
    from pydantic import TypeAdapter

    from jaxfound.fusion import recipe

    settings = [0.3, [0, 1], [0, 0.5, 0.3, 0.7, 1], [True, False, True], {"filter": "self_attn", "value": 0.9},
                [{"filter": "mlp", "value": [1, 0]}, {"filter": "*", "value": [0.2, 0.4, 0.8]}], FILTERS]
    names = ["model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
    for setting in settings:
        theirs = TypeAdapter(ParameterSetting).validate_python(setting)
        for name in names:
            for t in (0.0, 0.2, 0.5, 2 / 3, 1.0):
                want = evaluate_setting(name, theirs, t, validate=lambda v: v)
                got = recipe.evaluate_setting(setting, name, t)
                assert got == pytest.approx(want, abs=1e-12) if want is not None else got is None, (setting, name, t)
    assert [recipe.layer_position(f"llama/layer_{i}/mlp/up/kernel", 4) for i in range(4)] == [0, 1 / 3, 2 / 3, 1]
    assert recipe.layer_position("llama/word/embedding", 4) == 0 and recipe.layer_position("bert/layer_0/x", 1) == 1


def test_della_keeps_entries_by_their_rank_within_each_output_as_mergekit_does():
    """DELLA's masks are random, so its parity is statistical: the keep rate by rank of |tau| within each output row
    (a torch Linear's row, a jaxfound kernel's column), and the L1 rescale, match mergekit's della_magprune."""
    import jax
    import jax.numpy as jnp
    from mergekit.sparsify import RescaleNorm, della_magprune

    from jaxfound.fusion import merge

    tau_IxO = np.random.default_rng(0).normal(size=(400, 64)).astype(np.float32)  # jaxfound's (in, out)
    torch.manual_seed(0)
    theirs = della_magprune(torch.tensor(tau_IxO.T.copy()), 0.4, 0.2, rescale_norm=RescaleNorm.l1).numpy().T
    base = {"x": {"kernel": jnp.zeros((400, 64))}}
    ours = np.asarray(merge.della(base, [{"x": {"kernel": jnp.asarray(tau_IxO)}}], density=0.4, epsilon=0.2,
                                  key=jax.random.key(0), combine="linear")["x"]["kernel"])
    quintile = np.argsort(np.argsort(np.abs(tau_IxO), axis=0), axis=0) * 5 // 400  # rank within each column
    for q in range(5):  # expected 0.2 + 0.4 * (q + 0.5) / 5; 12800 draws per bin: sigma < 0.005
        assert abs((ours != 0)[quintile == q].mean() - (theirs != 0)[quintile == q].mean()) < 0.025, q
    np.testing.assert_allclose(np.abs(ours).sum(), np.abs(theirs).sum(), rtol=1e-4)  # both keep the L1 norm
