"""LoRA adapters in the knowledge graph and in merges: an exact linear merge of adapters (jaxfound.fusion.adapters),
LoRA fine-tunes registered as adapter vertices (adapter_of their base, with rank, targets and the base's hash), and
the graph's plan merging adapters that share a base."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfound.config import LoraConfig, ModelConfig, load_config
from jaxfound.errors import JaxfoundError
from jaxfound.fusion import graph
from jaxfound.fusion.adapters import linear_adapters, merge_adapters
from jaxfound.models import build_model, lora

transformers = pytest.importorskip("transformers")

TINY = ModelConfig(arch="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=48, max_position=64, activation="silu")


@functools.cache  # params are immutable jax arrays: tests share the models
def _adapted(rank, alpha, seed, targets="all-linear"):
    cfg = dataclasses.replace(TINY, lora=LoraConfig(rank=rank, alpha=alpha, targets=targets))
    model = build_model(cfg, "lm")
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])  # one base for all
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype) if lora.is_adapter(p) else x, params)
    return model, params, cfg.lora


def test_linear_merge_of_adapters_is_exact_and_an_adapter_itself():
    (_, p1, c1), (_, p2, c2) = _adapted(4, 8.0, 1), _adapted(2, 16.0, 2)
    p2 = lora.combine(lora.split(p1)[0], lora.split(p2)[1])  # the same base under both
    merged, cfg = linear_adapters([p1, p2], [c1, c2], weights=[0.7, 0.3])
    assert cfg.rank == 6 and merged["llama"]["layer_0"]["attention"]["query"]["lora_a"].shape == (32, 6)
    # every leaf keeps its dtype (the float64 weights once widened base weights and B to float64)
    assert {str(x.dtype) for x in jax.tree.leaves(merged)} == {str(x.dtype) for x in jax.tree.leaves(p1)}
    want = 0.7 * np.asarray(lora.fold(p1, 8.0)["llama"]["layer_1"]["mlp"]["down"]["kernel"]) + 0.3 * np.asarray(
        lora.fold(p2, 16.0)["llama"]["layer_1"]["mlp"]["down"]["kernel"])
    got = np.asarray(lora.fold(merged, cfg.alpha)["llama"]["layer_1"]["mlp"]["down"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    model = build_model(dataclasses.replace(TINY, lora=cfg), "lm")  # runs as an adapter of rank 6
    ids = jnp.arange(10)[None] % 97
    plain = build_model(TINY, "lm")
    np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, ids)),
                               np.asarray(plain.apply({"params": lora.fold(merged, cfg.alpha)}, ids)),
                               rtol=1e-4, atol=1e-5)


def test_adapters_on_other_layers_do_not_merge():
    (_, p1, c1), (_, p2, c2) = _adapted(2, 4.0, 1), _adapted(2, 4.0, 2, targets="attention")
    with pytest.raises(JaxfoundError, match="different layers"):
        linear_adapters([p1, p2], [c1, c2])


@pytest.fixture(scope="module")
def registry_with_adapters(tmp_path_factory):
    """Two LoRA NER fine-tunes and one full fine-tune of one tiny BERT, each registered in one registry."""
    from jaxfound.app.finetune import finetune
    from tests.test_finetune import tiny_bert_dir, write_toy_conll

    root = tmp_path_factory.mktemp("adapters")
    base = tiny_bert_dir(root / "base")
    data = root / "toyner"
    data.mkdir()
    train, valid = write_toy_conll(data / "train.txt", 240, seed=1), write_toy_conll(data / "valid.txt", 64, seed=2)
    common = [f"model.init={base}", f"data.train={train}", f"data.valid={valid}", f"data.test={valid}",
              "data.seq_len=32", "train.task=ner", "train.epochs=4", "train.batch_size=16", "checkpoint.every=0",
              "model.dropout=0.0", f"run.registry={root / 'reg'}"]
    summaries = {}
    for name, extra in (("lora-a", ["train.lora.rank=8", "train.lr=3e-2", "train.seed=1"]),
                        ("lora-b", ["train.lora.rank=8", "train.lr=3e-2", "train.seed=2"])):
        summaries[name] = finetune(load_config(None, [f"run.dir={root / name}", *common, *extra]))
    return {"root": root, "reg": root / "reg", "base": base, "summaries": summaries}


def test_lora_runs_are_adapter_vertices_of_their_base(registry_with_adapters):
    g = graph.load(registry_with_adapters["reg"])
    v = graph.vertex(g, "lora-a")
    assert v["kind"] == "adapter" and v["rank"] == 8 and v["targets"] == "all-linear"
    (edge,) = graph.out_edges(g, v, ["adapter_of"])
    assert g.vs[edge.target]["name"] == "base" and edge["rank"] == 8
    assert edge["base_hash"] == graph.content_hash(registry_with_adapters["base"])
    assert v["signature"] == graph.vertex(g, "base")["signature"]  # the base's trunk: mergeable with its fine-tunes
    assert graph.root_model(g, "lora-a") == "base" and graph.lineage(g, "lora-a")[0] == "base"
    assert {s["split"] for s in graph.scores(g, "lora-a") if s["metric"] == "f1"} == {"valid", "test"}


def test_the_graph_plan_merges_adapters_that_share_a_base(registry_with_adapters, tmp_path):
    from jaxfound.app.merge import merge_from_registry

    reg = registry_with_adapters["reg"]
    report = merge_from_registry(reg, "toyner/ner", "average", tmp_path / "merged", force=True)
    assert sorted(report["coefficients"]) == ["lora-a", "lora-b"]  # the adapters are the plan's candidates
    g = graph.load(reg)
    merged = graph.vertex(g, report["name"])
    assert sorted(g.vs[e.target]["name"] for e in graph.out_edges(g, merged, ["merged_from"])) == ["lora-a", "lora-b"]
    valid = {n: s["reports"]["valid"]["f1"] for n, s in registry_with_adapters["summaries"].items()}
    assert report["score"] > 0.5 * min(valid.values())  # averaged adapters of one task keep most of the score


def test_merge_adapters_keeps_rank_for_task_arithmetic_and_folds_other_methods():
    (_, p1, c1), (_, p2, c2) = _adapted(4, 8.0, 1), _adapted(2, 16.0, 2)
    p2 = lora.combine(lora.split(p1)[0], lora.split(p2)[1])
    folded = [lora.fold(p1, 8.0), lora.fold(p2, 16.0)]
    base = lora.split(p1)[0]
    ta, cfg = merge_adapters("task_arithmetic", [p1, p2], [c1, c2], [1.0, 2.0], lam=0.5)
    assert cfg.rank == 6  # an adapter still: the exact sum of the two
    path = ("llama", "layer_1", "mlp", "down", "kernel")

    def at(tree):
        for k in path:
            tree = tree[k]
        return np.asarray(tree)

    want = at(base) + 0.5 * (1.0 * (at(folded[0]) - at(base)) + 2.0 * (at(folded[1]) - at(base)))
    np.testing.assert_allclose(at(lora.fold(ta, cfg.alpha)), want, rtol=1e-5, atol=1e-5)
    # DARE at density 1 runs on the folded models and must land on the same weights
    dare, none = merge_adapters("dare_linear", [p1, p2], [c1, c2], [1.0, 2.0], lam=0.5, density=1.0,
                                key=jax.random.key(0))
    assert none is None and "lora_a" not in dare["llama"]["layer_1"]["mlp"]["down"]
    np.testing.assert_allclose(at(dare), want, rtol=1e-5, atol=1e-5)
    for t, expected in ((0.0, folded[0]), (1.0, folded[1])):  # SLERP's ends are the folded adapters
        np.testing.assert_allclose(at(merge_adapters("slerp", [p1, p2], [c1, c2], t=t)[0]), at(expected), atol=1e-6)


def test_recipe_merges_lora_runs_into_one_lora_run(registry_with_adapters, tmp_path, capsys):
    """`jaxfound merge --recipe --as-adapter`: two LoRA runs of one base -> one LoRA run of rank 8 + 8 whose folded
    weights are the linear merge of the two folded runs (an independent route: merge.linear on plain models)."""
    from jaxfound import cli, runs
    from jaxfound.fusion import merge

    root = registry_with_adapters["root"]
    recipe = tmp_path / "adapters.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - {{model: {root / 'lora-a'}, parameters: {{weight: 0.6}}}}\n"
                      f"  - {{model: {root / 'lora-b'}, parameters: {{weight: 0.4}}}}\n")
    assert cli.main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "m"), "--as-adapter"]) == 0
    kept = runs.open_run(tmp_path / "m", adapters=True)
    assert kept.config.model.lora.rank == 16 and lora.split(kept.params)[1]  # adapters kept apart, rank 8 + 8
    want = merge.linear([runs.open_run(root / n).params for n in ("lora-a", "lora-b")], [0.6, 0.4])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 runs.open_run(tmp_path / "m").params, want)
    recipe.write_text(recipe.read_text().replace("linear", "ties") + f"base_model: {registry_with_adapters['base']}\n")
    assert cli.main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "t"), "--as-adapter"]) == 2
    assert "merge_method ties does not keep adapters low-rank" in capsys.readouterr().err


# ---------------------------------------------------------------- recipes over a GGUF base


@pytest.fixture(scope="module")
def gguf_lora_runs(tmp_path_factory):
    """A tiny Llama GGUF, another one with one tensor changed, and two LoRA runs on the first (ranks 2 and 4, random
    adapters on every linear layer), with the adapters' folded updates (alpha / r) A B by path, from numpy."""
    from jaxfound import runs
    from tests.test_gguf import TINY as GGUF_TINY
    from tests.test_gguf import tensors_of, tiny_model, write_gguf

    root = tmp_path_factory.mktemp("gguf_lora")
    config = GGUF_TINY | {"tie_word_embeddings": True}
    tensors = tensors_of(tiny_model("LlamaForCausalLM", tie_word_embeddings=True))
    gguf_file = write_gguf(root / "tiny.gguf", "llama", config, tensors, permute=True)
    tensors["model.layers.0.mlp.up_proj.weight"] += 1.0
    other = write_gguf(root / "other.gguf", "llama", config, tensors, permute=True)
    base = runs.open_run(gguf_file)
    updates, rng = [], np.random.default_rng(0)
    for i, (rank, alpha) in enumerate(((2, 4.0), (4, 16.0))):
        cfg = LoraConfig(rank=rank, alpha=alpha)
        model = build_model(dataclasses.replace(base.model.cfg, lora=cfg), "lm")
        shapes = lora.split(nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))[1]
        adapters = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), shapes)
        updates.append({path: (alpha / rank) * ab["lora_a"] @ ab["lora_b"]
                        for path, ab in _adapter_dicts(adapters).items()})
        runs.write_run(root / f"lora-{i}", runs.config_for(base, lora=cfg), lora.combine(base.params, adapters),
                       tokenizer=base.tokenizer)
    return {"root": root, "gguf": gguf_file, "other": other, "base": base, "updates": updates}


def _adapter_dicts(tree, prefix=()):
    """{path of a kernel: {'lora_a', 'lora_b'}} of an adapters tree."""
    if "lora_a" in tree:
        return {prefix + ("kernel",): tree}
    return {k: v for key, sub in tree.items() for k, v in _adapter_dicts(sub, prefix + (key,)).items()}


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def _hand_merge(method, base, updates, weights, lam):
    """The recipe's merge, by hand on every adapted kernel: task arithmetic base + lam * sum_i w_i tau_i; TIES at
    density 1 base + lam * (sum of the w_i tau_i agreeing with the sign of their sum) / (sum of their w_i)."""
    out = {}
    for path in updates[0]:
        weighted = np.stack([w * u[path] for w, u in zip(weights, updates)])
        if method == "ties":
            agree = np.sign(weighted) == np.where(weighted.sum(0) >= 0, 1.0, -1.0)
            divisor = (agree * np.asarray(weights)[:, None, None]).sum(0)
            delta = (agree * weighted).sum(0) / np.where(divisor == 0, 1.0, divisor)
        else:
            delta = weighted.sum(0)
        out[path] = _leaf(base, path) + lam * delta
    return out


def _write_recipe(path, method, models, base=None, parameters=None, weights=(0.7, 0.3)):
    lines = [f"merge_method: {method}", "models:"]
    lines += [f"  - {{model: {m}, parameters: {{weight: {w}}}}}" for m, w in zip(models, weights)]
    lines += [f"base_model: {base}"] if base else []
    lines += [f"parameters: {parameters}"] if parameters else []
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("method, parameters", [("task_arithmetic", "{lambda: 0.5}"),
                                                ("ties", "{density: 1.0, lambda: 0.5}"),
                                                ("dare_linear", "{density: 1.0, lambda: 0.5}")])
def test_recipe_with_a_gguf_base_merges_lora_runs_of_it(gguf_lora_runs, tmp_path, method, parameters):
    """`jaxfound merge --recipe` with base_model a GGUF file (named relative to the recipe): the folded LoRA runs'
    merge equals the hand computation on every adapted kernel, and every other weight is the GGUF's."""
    from jaxfound import cli, runs

    root, base = gguf_lora_runs["root"], gguf_lora_runs["base"].params
    recipe = _write_recipe(root / f"{method}.yaml", method, [root / "lora-0", root / "lora-1"], base="tiny.gguf",
                           parameters=parameters)
    assert cli.main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "m")]) == 0
    merged = runs.open_run(tmp_path / "m").params
    # DARE at density 1 drops nothing: it is task arithmetic
    want = _hand_merge("ties" if method == "ties" else "task_arithmetic", base, gguf_lora_runs["updates"],
                       [0.7, 0.3], lam=0.5)
    for path, w in want.items():
        np.testing.assert_allclose(_leaf(merged, path), w, rtol=1e-5, atol=1e-5)
    embedding = ("llama", "word", "embedding")
    np.testing.assert_array_equal(_leaf(merged, embedding), _leaf(base, embedding))


def test_recipe_names_a_missing_base_and_what_a_model_may_be(gguf_lora_runs, tmp_path, capsys):
    from jaxfound import cli

    root = gguf_lora_runs["root"]
    recipe = _write_recipe(tmp_path / "r.yaml", "ties", [root / "lora-0", root / "lora-1"], base="missing.gguf")
    assert cli.main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "base_model 'missing.gguf' is not a jaxfound run dir" in err and "a GGUF file (.gguf)" in err
    recipe = _write_recipe(tmp_path / "r.yaml", "ties", [root / "lora-0", root / "lora-1"])  # the full merge needs it
    assert cli.main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "m")]) == 2
    assert "merge_method ties needs key 'base_model'" in capsys.readouterr().err


def test_as_adapter_recipe_needs_no_base_and_checks_one_given(gguf_lora_runs, tmp_path, capsys):
    """--as-adapter task_arithmetic without base_model: one LoRA run of rank 2 + 4 whose folded kernels are the hand
    computation; a base_model is checked against the adapters' frozen weights (the GGUF passes, another fails)."""
    from jaxfound import cli, runs

    models = [gguf_lora_runs["root"] / "lora-0", gguf_lora_runs["root"] / "lora-1"]
    recipe = _write_recipe(tmp_path / "r.yaml", "task_arithmetic", models, parameters="{lambda: 0.5}")
    assert cli.main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "a"), "--as-adapter"]) == 0
    assert runs.open_run(tmp_path / "a", adapters=True).config.model.lora.rank == 6
    merged = runs.open_run(tmp_path / "a").params
    want = _hand_merge("task_arithmetic", gguf_lora_runs["base"].params, gguf_lora_runs["updates"], [0.7, 0.3], 0.5)
    for path, w in want.items():
        np.testing.assert_allclose(_leaf(merged, path), w, rtol=1e-5, atol=1e-5)

    _write_recipe(recipe, "task_arithmetic", models, base=gguf_lora_runs["gguf"])
    assert cli.main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "b"), "--as-adapter"]) == 0
    assert "(checked: the adapters' frozen weights are its weights)" in capsys.readouterr().out
    _write_recipe(recipe, "task_arithmetic", models, base=gguf_lora_runs["other"])
    assert cli.main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "c"), "--as-adapter"]) == 2
    assert f"base_model '{gguf_lora_runs['other']}' is not the base of the adapters" in capsys.readouterr().err
