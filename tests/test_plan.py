"""KG-guided fusion: candidates and reasons, the coefficient formula by hand, execute/record/refuse, recipes."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from jaxfound import cli
from jaxfound.app.merge import registry_loader
from jaxfound.app.registry import register_finetune_run
from jaxfound.config import Config, ModelConfig, TrainConfig, load_config
from jaxfound.errors import JaxfoundError
from jaxfound.fusion import graph as G
from jaxfound.fusion import merge as M
from jaxfound.fusion.plan import coefficients, execute_plan, fuse, plan_merge
from jaxfound.fusion.recipe import parse_recipe
from jaxfound.models import build_model
from jaxfound.runs import open_run, write_run

TINY = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position=16,
                   num_labels=3, dropout=0.0)
NER, POS = "conll/ner", "conll/pos"


def _init(cfg, head, seed):
    model = build_model(cfg, head)
    import flax.linen as nn
    import jax.numpy as jnp

    return jax.device_get(nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]))


def _plus(tree, seed, scale=0.01):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (np.asarray(x) + scale * rng.standard_normal(x.shape)).astype(x.dtype), tree)


@pytest.fixture(scope="module")
def zoo():
    """Params by name: fine-tunes = base trunk + a known delta, with their own heads."""
    base = _init(TINY, "none", 0)
    head3, head4 = _init(TINY, "token_cls", 1), _init(dataclasses.replace(TINY, num_labels=4), "token_cls", 2)
    zoo = {"base": base}
    for i, name in enumerate(["ner-a", "ner-b", "ner-c"]):
        zoo[name] = {"bert": _plus(base["bert"], 10 + i), "classifier": _plus(head3["classifier"], 20 + i)}
    zoo["pos"] = {"bert": _plus(base["bert"], 30), "classifier": head4["classifier"]}
    zoo["shakespeare-mlm"] = {"bert": _plus(base["bert"], 40)}
    wide = _init(dataclasses.replace(TINY, hidden_size=32), "token_cls", 3)
    zoo["wide-ner"] = wide
    zoo["other-base"] = _init(TINY, "none", 5)
    zoo["other-ner"] = {"bert": _plus(zoo["other-base"]["bert"], 50), "classifier": head3["classifier"]}
    return zoo


@pytest.fixture
def g(zoo):
    sig = G.trunk_signature(zoo["base"])
    g = G.new_graph()
    G.register_pretrain(g, "base", "mem/base", "wiki", arch="bert", signature=sig)
    for name, f1 in (("ner-a", 0.80), ("ner-b", 0.76), ("ner-c", 0.70)):
        G.register_finetune(g, name, f"mem/{name}", "base", "conll", NER, {"f1": f1, "precision": 0.9}, split="valid")
        G.record_score(g, name, NER, "f1", f1 - 0.05, "test")
    G.register_finetune(g, "pos", "mem/pos", "base", "conll", POS, {"accuracy": 0.90}, split="valid")
    G.register_finetune(g, "shakespeare-mlm", "mem/sh", "base", "tinyshakespeare", "tinyshakespeare/mlm",
                        {"eval_loss": 2.0}, split="valid")
    G.register_finetune(g, "wide-ner", "mem/wide", "base", "conll", NER, {"f1": 0.95}, split="valid",
                        signature=G.trunk_signature(zoo["wide-ner"]))
    G.register_pretrain(g, "other-base", None, "web", arch="bert", signature=sig)
    G.register_finetune(g, "other-ner", None, "other-base", "conll", NER, {"f1": 0.78}, split="valid")
    return g


def _loader(zoo):
    return lambda name, path: zoo[name]


def _dist_score(ideal):
    """A validation score that is highest (1.0) at the ideal params: 1 - mean squared distance of the trunk."""
    def evaluate(params):
        d = [np.mean((np.asarray(a) - np.asarray(b)) ** 2) for a, b in
             zip(jax.tree.leaves(params["bert"]), jax.tree.leaves(ideal["bert"]))]
        return 1.0 - float(np.mean(d)) * 1e3
    return evaluate


# ---------------------------------------------------------------- planning


def test_plan_leaves_out_incompatible_and_unrelated_models_with_reasons(g):
    plan = plan_merge(g, NER, "ties")
    assert plan.base == "base" and plan.metric == "f1" and plan.split == "valid"
    assert [c.name for c in plan.candidates] == ["ner-a", "ner-b", "ner-c", "pos"]
    reasons = dict(plan.excluded)
    assert set(reasons) == {"shakespeare-mlm", "wide-ner", "other-base", "other-ner"}
    assert reasons["wide-ner"].startswith("trunk signature") and "another size" in reasons["wide-ner"]
    assert reasons["other-ner"] == "another base: descends from 'other-base', not 'base'"
    assert reasons["other-base"] == "another base: descends from 'other-base', not 'base'"
    assert reasons["shakespeare-mlm"].startswith("unrelated to 'conll/ner'")
    assert "tinyshakespeare" in reasons["shakespeare-mlm"]
    assert plan.method == "ties" and plan.params == {"lam": 1.0, "normalize": True, "density": 0.5}
    assert "left out wide-ner" in plan.describe()


def test_auto_picks_a_soup_of_target_fine_tunes_else_ties_with_related_tasks(g, zoo):
    plan = plan_merge(g, NER)  # three NER fine-tunes -> their greedy soup; the POS model left out, with why
    assert plan.method == "greedy_soup" and [c.name for c in plan.candidates] == ["ner-a", "ner-b", "ner-c"]
    assert dict(plan.excluded)["pos"].startswith("auto: 3 fine-tunes of 'conll/ner' are soup material")
    for name in ("ner-b", "ner-c"):  # one NER fine-tune left: the related POS model joins through TIES
        g.delete_vertices(g.vs.find(name=name).index)
    plan = plan_merge(g, NER)
    assert plan.method == "ties" and [c.name for c in plan.candidates] == ["ner-a", "pos"]
    assert "TIES" in plan.rationale and plan.params == {"lam": 1.0, "normalize": True, "density": 0.5}


def test_coefficients_follow_the_documented_formula(g):
    plan = plan_merge(g, NER, "ties", temperature=0.1)
    # q: ner-a 0.80/0.80, ner-b 0.76/0.80, ner-c 0.70/0.80, pos 0.90/0.90; r: 1, 1, 1, 0.5
    raw = {"ner-a": math.exp(10.0), "ner-b": math.exp(9.5), "ner-c": math.exp(8.75), "pos": 0.5 * math.exp(10.0)}
    want = {k: v / sum(raw.values()) for k, v in raw.items()}
    assert plan.coefficients == pytest.approx(want, rel=1e-9)
    assert want["ner-a"] == pytest.approx(0.4179, abs=1e-4)  # 1 / (1 + e^-0.5 + e^-1.25 + 0.5)
    assert [c.quality for c in plan.candidates] == pytest.approx([1.0, 0.95, 0.875, 1.0])
    assert coefficients([1, 0.5], [1, 1], 0.1, "uniform") == [0.5, 0.5]


def test_auto_soups_fine_tunes_of_one_task(g):
    plan = plan_merge(g, NER, include_related=False)
    assert plan.method == "greedy_soup" and "pos" in dict(plan.excluded)
    assert "greedy soup" in plan.rationale
    with pytest.raises(JaxfoundError, match="greedy_soup averages whole models"):
        plan_merge(g, NER, "greedy_soup")


def test_plan_errors_name_what_is_valid(g):
    with pytest.raises(JaxfoundError, match="valid methods"):
        plan_merge(g, NER, "mean")
    with pytest.raises(JaxfoundError, match="no task named 'conll/chunk'"):
        plan_merge(g, "conll/chunk")
    with pytest.raises(JaxfoundError, match="nothing to merge"):
        plan_merge(g, "tinyshakespeare/mlm")


# ---------------------------------------------------------------- fusing and recording


def test_fuse_average_is_the_weighted_average_with_each_task_head(g, zoo):
    plan = plan_merge(g, NER, "average")
    out = fuse(plan, zoo)
    c = plan.coefficients
    names = list(c)
    want = sum(c[n] * np.asarray(zoo[n]["bert"]["layer_0"]["mlp"]["up"]["kernel"]) for n in names)
    got = np.asarray(out[NER]["bert"]["layer_0"]["mlp"]["up"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    ner = ["ner-a", "ner-b", "ner-c"]  # the NER head: coefficients renormalised within the task
    head = sum(c[n] * np.asarray(zoo[n]["classifier"]["kernel"]) for n in ner) / sum(c[n] for n in ner)
    np.testing.assert_allclose(np.asarray(out[NER]["classifier"]["kernel"]), head, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(out[POS]["classifier"]["kernel"]), zoo["pos"]["classifier"]["kernel"])
    assert out[NER]["bert"] is out[POS]["bert"]  # one trunk, two heads


def test_execute_plan_records_merged_from_edges_and_scores(g, zoo):
    plan = plan_merge(g, NER, "ties")
    fused_ref = fuse(plan, zoo, zoo["base"])[NER]
    params, report = execute_plan(plan, _loader(zoo), _dist_score(fused_ref), g=g, name="ner-ties")
    assert report["registered"] and report["message"].startswith("registered:")
    assert report["score"] == pytest.approx(1.0) and report["best_parent"] == "ner-a"
    assert report["best_parent_score"] < 1.0 and set(report["task_params"]) == {NER, POS}
    edges = {g.vs[e.target]["name"]: (e["method"], e["coefficient"]) for e in g.es if e["relation"] == "merged_from"}
    assert edges == {n: ("ties", pytest.approx(c)) for n, c in plan.coefficients.items()}
    assert {(s["metric"], s["split"]) for s in G.scores(g, "ner-ties")} == {("f1", "valid")}
    assert G.lineage(g, "ner-ties")[:4] == ["ner-a", "ner-b", "ner-c", "pos"]
    assert G.vertex(g, "ner-ties")["merge_params"] == {"lam": 1.0, "normalize": True, "density": 0.5}


def test_execute_plan_gates_each_parent_and_refuses_unless_forced(g, zoo):
    plan = plan_merge(g, NER, "average")
    evaluate = _dist_score(zoo["ner-a"])  # ner-a itself is the best possible model
    before = G.to_dict(g)
    _, report = execute_plan(plan, _loader(zoo), evaluate, g=g, name="ner-avg", threshold=0.999)
    assert not report["registered"] and report["message"].startswith("refused:")
    claims = {c["parent"]: c for c in report["gate"]["claims"]}
    assert set(claims) == {"ner-a", "ner-b", "ner-c"}  # the NER parents; pos has no NER evaluator here
    for name, c in claims.items():  # retention = merged / parent, both by the same evaluator
        assert c["parent_score"] == pytest.approx(evaluate(zoo[name]))
        assert c["retention"] == pytest.approx(report["score"] / c["parent_score"])
        assert c["passed"] == (c["retention"] >= 0.999)
    assert not claims["ner-a"]["passed"] and claims["ner-a"]["parent_score"] == pytest.approx(1.0)
    assert f"{claims['ner-a']['retention']:.3f} of 'ner-a'" in report["message"]
    assert "below the gate 0.999" in report["message"] and "force=True" in report["message"]
    assert G.to_dict(g) == before
    _, report = execute_plan(plan, _loader(zoo), evaluate, g=g, name="ner-avg", threshold=0.999, force=True)
    assert report["registered"] and report["message"].endswith("(forced)")
    assert G.vertex(g, "ner-avg")["gate_forced"] is True
    # a lower gate passes the same merge: every claim kept >= 0.5
    _, report = execute_plan(plan, _loader(zoo), evaluate, g=g, name="ner-avg-2", threshold=0.5)
    assert report["registered"] and report["registered_tasks"] == [NER]
    assert report["worst_retention"] == pytest.approx(min(c["retention"] for c in report["gate"]["claims"]))


def test_greedy_soup_keeps_only_ingredients_that_do_not_hurt(g, zoo):
    plan = plan_merge(g, NER, include_related=False)
    ideal = {"bert": M.linear([zoo["ner-a"]["bert"], zoo["ner-b"]["bert"]])}
    _, report = execute_plan(plan, _loader(zoo), _dist_score(ideal), g=g, name="ner-soup")
    assert report["kept"] == ["ner-a", "ner-b"] and report["left_out"] == ["ner-c"]
    assert report["coefficients"] == {"ner-a": 0.5, "ner-b": 0.5} and report["registered"]


def test_plan_from_disk_through_the_registry_hooks(zoo, tmp_path):
    """register_finetune_run on real run dirs -> plan -> execute with the registry loader."""
    template = Config(model=TINY, train=TrainConfig(task="ner"))
    base_dir = tmp_path / "minilm"
    base_dir.mkdir()
    reg = tmp_path / "registry"
    for name, f1 in (("ner-a", 0.8), ("ner-b", 0.78)):
        run = write_run(tmp_path / name, template, zoo[name], labels=["B", "I", "O"])
        cfg = load_config(None, [f"run.dir={run}", f"run.registry={reg}", f"model.init={base_dir}",
                                 "data.train=/data/conll2003/train.txt", "train.task=ner"])
        assert register_finetune_run(cfg, {"reports": {"valid": {"f1": f1}, "test": {"f1": f1 - 0.1}}}) == name
    g = G.load(reg)
    assert G.lineage(g, "ner-a") == ["minilm", "minilm-corpus"]
    assert G.best_model(g, "conll2003/ner", "f1", "valid") == ("ner-a", 0.8)
    assert G.vertex(g, "ner-a")["labels"] == ["B", "I", "O"]
    plan = plan_merge(g, "conll2003/ner", "average")
    assert [c.name for c in plan.candidates] == ["ner-a", "ner-b"]
    params, report = execute_plan(plan, registry_loader(g), lambda p: 0.9, g=g, name="soup")
    assert report["registered"]
    np.testing.assert_allclose(np.asarray(params["classifier"]["bias"]), sum(
        plan.coefficients[n] * np.asarray(zoo[n]["classifier"]["bias"]) for n in ("ner-a", "ner-b")), atol=1e-7)


# ---------------------------------------------------------------- recipes (mergekit-style YAML)


HF_CFG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=16, id2label={0: "O", 1: "B-PER", 2: "I-PER"})


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, name in enumerate(["a", "b"]):
        torch.manual_seed(i)
        transformers.BertForTokenClassification(transformers.BertConfig(**HF_CFG)).save_pretrained(root / name)
        out[name] = root / name
    torch.manual_seed(7)
    transformers.BertModel(transformers.BertConfig(**HF_CFG), add_pooling_layer=False).save_pretrained(root / "base")
    out["base"] = root / "base"
    return out


def _state(path):
    import transformers

    model = transformers.AutoModelForTokenClassification.from_pretrained(path)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _write(path, text):
    path.write_text(text)
    return path


def test_recipe_linear_to_hf_equals_the_average_of_the_torch_weights(hf_dirs, tmp_path):
    recipe = _write(tmp_path / "r.yaml", f"""
models:
  - model: {hf_dirs['a']}
    parameters: {{weight: 0.25}}
  - model: {hf_dirs['b']}
    parameters: {{weight: 0.75}}
merge_method: linear
dtype: float16
""")
    assert cli.main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--hf"]) == 0
    a, b, got = _state(hf_dirs["a"]), _state(hf_dirs["b"]), _state(tmp_path / "out")
    assert set(got) == set(a)
    for k in a:
        np.testing.assert_allclose(got[k], 0.25 * a[k] + 0.75 * b[k], rtol=1e-6, atol=1e-6, err_msg=k)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "O", "1": "B-PER", "2": "I-PER"}


def test_recipe_task_arithmetic_to_a_jaxfound_dir(hf_dirs, tmp_path):
    recipe = _write(tmp_path / "ta.yaml", f"""
models:
  - {{model: {hf_dirs['a']}, parameters: {{weight: 1.0}}}}
  - {{model: {hf_dirs['b']}, parameters: {{weight: 0.5}}}}
merge_method: task_arithmetic
base_model: {hf_dirs['base']}
parameters: {{lambda: 0.6}}
""")
    assert cli.main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "out")]) == 0
    merged = open_run(tmp_path / "out")
    assert merged.labels == ["O", "B-PER", "I-PER"] and merged.model.head == "token_cls"
    a, b, base = _state(hf_dirs["a"]), _state(hf_dirs["b"]), _state(hf_dirs["base"])
    key = "bert.encoder.layer.0.intermediate.dense.weight"
    base_w = {k.removeprefix("bert."): v for k, v in base.items()}  # BertModel names lack the prefix
    want = base[key] if key in base else base_w[key.removeprefix("bert.")]
    want = want + 0.6 * (1.0 * (a[key] - want) + 0.5 * (b[key] - want))
    got = np.asarray(merged.params["bert"]["layer_0"]["mlp"]["up"]["kernel"]).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the base has no classifier: heads are the weight-normalised average
    head = (1.0 * a["classifier.weight"] + 0.5 * b["classifier.weight"]) / 1.5
    np.testing.assert_allclose(np.asarray(merged.params["classifier"]["kernel"]).T, head, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("body", "message"), [
    ("merge_method: sce\nmodels: [{model: a}]", "key 'merge_method' is 'sce'; allowed: linear, task_arithmetic"),
    ("merge_method: slerp\nbase_model: a\nmodels: [a, b, c]", "slerp interpolates base_model and one other model"),
    ("merge_method: slerp\nbase_model: a\nmodels: [a, b]", "slerp needs key 'parameters.t'"),
    ("merge_method: slerp\nbase_model: a\nmodels: [a, b]\nparameters: {t: [{filter: mlp, value: [0, x]}]}",
     "parameters.t[0].value[1] must be a number, got 'x'"),
    ("merge_method: della\nbase_model: a\nmodels: [{model: b, parameters: {t: 0.5}}]",
     "unknown key 'models[0].parameters.t' (allowed: weight, density, epsilon)"),
    ("merge_method: model_stock\nbase_model: a\nmodels: [a, b]", "model_stock needs at least 2 models besides"),
    ("merge_method: ties\nbase_model: a\nmodels: [b]\nparameters: {normalize: [true, false]}",
     "parameters.normalize must be true or false"),
    ("merge_method: linear\nmodel: [a]", "unknown key 'model' (allowed: models, merge_method"),
    ("merge_method: linear\nmodels: a", "key 'models' must be a non-empty list"),
    ("merge_method: linear\nmodels: [{model: a}, {parameters: {weight: 1}}]", "models[1] needs 'model: <path>'"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: heavy}}]",
     "models[0].parameters.weight must be a number, got 'heavy'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: 1.5}}]",
     "models[0].parameters.density is 1.5; it must be in (0, 1]"),
    ("merge_method: ties\nmodels: [{model: a}]", "merge_method ties needs key 'base_model'"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {lambda: 2}}]",
     "unknown key 'models[0].parameters.lambda' (allowed: weight)"),
    ("merge_method: linear\nparameters: {normalise: true}\nmodels: [a]", "unknown key 'parameters.normalise'"),
])
def test_malformed_recipes_name_the_file_and_key(tmp_path, body, message):
    import yaml

    path = _write(tmp_path / "bad.yaml", body)
    with pytest.raises(JaxfoundError) as err:
        parse_recipe(yaml.safe_load(body), str(path))
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_recipe_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    path = _write(tmp_path / "r.yaml", "merge_method: linear\nmodels: [{model: nowhere}]\n")
    assert cli.main(["merge", "--recipe", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "models[0].model 'nowhere' is not a jaxfound run dir" in err
    _write(tmp_path / "y.yaml", "models: [a\n")
    assert cli.main(["merge", "--recipe", str(tmp_path / "y.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def test_graph_cli_show_lineage_plot(g, tmp_path, capsys):
    G.save(g, tmp_path / "reg")
    assert cli.main(["graph", "show", "--registry", str(tmp_path / "reg")]) == 0
    out = capsys.readouterr().out
    assert "ner-a" in out and "conll/ner f1/valid=0.8000" in out
    assert cli.main(["graph", "lineage", "ner-a", "--registry", str(tmp_path / "reg")]) == 0
    assert capsys.readouterr().out.strip() == "ner-a <- base <- wiki"
    assert cli.main(["graph", "plot", str(tmp_path / "g.png"), "--registry", str(tmp_path / "reg")]) == 0
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["graph", "lineage", "--registry", str(tmp_path / "reg")]) == 2
