"""Searched, gated merges and the head re-fit: budget and cache of the search, the ES against the grid, the gate's
verdict per parent, the re-fit against an independent torch AdamW, the graph edge, the CLI end to end."""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxfound import cli
from jaxfound.errors import JaxfoundError
from jaxfound.fusion import graph as G
from jaxfound.fusion import refit, search
from jaxfound.fusion.gate import gate, worst_retention
from jaxfound.fusion.plan import execute_plan, plan_merge, search_plan
from tests.test_plan import _dist_score, _loader

NER, POS = "conll/ner", "conll/pos"

OPTIMUM = {"lam": 1.37, "density": 0.23, "weight:a": 0.6, "weight:b": 1.8, "weight:c": 1.1}


def _synthetic(calls):
    """A smooth score with its maximum 0 at OPTIMUM (off the grid); counts its calls."""
    def objective(point):
        calls.append(dict(point))
        return -sum((point[k] - v) ** 2 for k, v in OPTIMUM.items())
    return objective


def _space():
    return search.search_space("ties", ["a", "b", "c"])


def _tree(rng, labels=3, scale=1.0):
    """A small params tree shaped like a token tagger: trunk 'bert' and head 'classifier'."""
    return {"bert": {"emb": scale * rng.standard_normal((10, 6)).astype(np.float32),
                     "layer": {"kernel": scale * rng.standard_normal((6, 6)).astype(np.float32)}},
            "classifier": {"kernel": rng.standard_normal((6, labels)).astype(np.float32),
                           "bias": np.zeros(labels, np.float32)}}


@pytest.fixture
def zoo():
    """Fine-tunes = base trunk + a delta of 0.01, each with its own head (no flax model: merges stay cheap)."""
    rng = np.random.default_rng(0)
    base = _tree(rng)
    base.pop("classifier")
    zoo = {"base": base}
    for name, labels in (("ner-a", 3), ("ner-b", 3), ("ner-c", 3), ("pos", 4)):
        delta = _tree(rng, labels, 0.01)
        zoo[name] = {"bert": {"emb": base["bert"]["emb"] + delta["bert"]["emb"],
                              "layer": {"kernel": base["bert"]["layer"]["kernel"] + delta["bert"]["layer"]["kernel"]}},
                     "classifier": delta["classifier"]}
    return zoo


@pytest.fixture
def g():
    g = G.new_graph()
    G.register_pretrain(g, "base", "mem/base", "wiki", arch="bert", signature="sig")
    for name, f1 in (("ner-a", 0.80), ("ner-b", 0.76), ("ner-c", 0.70)):
        G.register_finetune(g, name, f"mem/{name}", "base", "conll", NER, {"f1": f1}, split="valid")
    G.register_finetune(g, "pos", "mem/pos", "base", "conll", POS, {"accuracy": 0.90}, split="valid")
    return g


# ---------------------------------------------------------------- search


@pytest.mark.parametrize("budget", [1, 5, 12, 30])
def test_search_never_exceeds_its_budget(budget):
    calls = []
    result = search.search(_synthetic(calls), _space(), budget, seed=1)
    assert len(calls) == result.evaluations <= budget
    assert result.evaluations == budget  # the space is continuous: the ES always has something new to try
    assert sum(not row["cached"] for row in result.log) == len(calls)
    n_grid = min(3 + 3, max(1, budget // 2))  # half the budget, at most the staged grid (3 lambdas, 3 models)
    assert [row["phase"] for row in result.log] == ["grid"] * n_grid + ["es"] * (len(result.log) - n_grid)
    assert result.score == max(row["score"] for row in result.log)


def test_the_cache_makes_a_repeated_evaluation_free():
    cache, calls = {}, []
    first = search.search(_synthetic(calls), _space(), 10, seed=3, cache=cache)
    assert len(calls) == 10 and len(cache) == 10
    again = search.search(_synthetic(calls), _space(), 10, seed=3, cache=cache)  # the same path, then further
    replayed = again.log[:len(first.log)]
    assert all(row["cached"] for row in replayed)  # the first run's points: read from the cache, not evaluated
    assert [r["coefficients"] for r in replayed] == [r["coefficients"] for r in first.log]
    assert [r["score"] for r in replayed] == [r["score"] for r in first.log]
    assert len(calls) == 10 + again.evaluations and again.evaluations == 10  # only new points are paid for
    assert not any(row["cached"] for row in again.log[len(first.log):]) and again.score >= first.score
    key = search.evaluation_key(["a", "b", "c"], "ties", {"lam": 1.0, "density": 0.5})
    assert key == search.evaluation_key(["a", "b", "c"], "ties", {"density": 0.5, "lam": 1.00000001})
    assert key != search.evaluation_key(["a", "c", "b"], "ties", {"lam": 1.0, "density": 0.5})
    assert key != search.evaluation_key(["a", "b", "c"], "dare_ties", {"lam": 1.0, "density": 0.5})


def test_es_finds_a_known_optimum_at_least_as_well_as_the_grid():
    space = _space()
    grid = search.grid_points(space)
    assert len(grid) == 12  # lambda 0.7, 1.0, 1.3 x density 0.5 x (equal weights, each model at 1.5)
    grid_best = max(_synthetic([])(p) for p in grid)
    result = search.search(_synthetic([]), space, len(grid), seed=0)
    assert result.score >= grid_best
    long = search.search(_synthetic([]), space, 120, seed=0)  # with room to converge: near the optimum itself
    assert long.score > -0.01 and abs(long.best["lam"] - OPTIMUM["lam"]) < 0.1
    assert search.search(_synthetic([]), space, 120, seed=0).log == long.log  # seeded: the same run twice


def test_search_space_follows_the_method():
    assert [d.name for d in search.search_space("task_arithmetic", ["x", "y"]).dims] == ["lam", "weight:x",
                                                                                        "weight:y"]
    assert search.search_space("task_arithmetic", ["x", "y", "z"]).dims[0].grid == (0.4, 0.5, 0.6)
    assert [d.name for d in search.search_space("linear", ["x", "y"]).dims] == ["weight:x", "weight:y"]
    with pytest.raises(JaxfoundError, match="valid methods"):
        search.search_space("frankenmerge", ["x", "y"])
    with pytest.raises(JaxfoundError, match="budget=0"):
        search.search(lambda p: 0.0, _space(), 0)


def test_search_plan_maximises_the_worst_task_retention(g, zoo):
    plan = plan_merge(g, NER, "task_arithmetic")
    ideal = {NER: _dist_score(zoo["ner-a"]), POS: _dist_score(zoo["pos"])}  # each task best at its own parent
    reference = {NER: 1.0, POS: 1.0}
    seen = []

    def score_tasks(task_params):
        scores = {t: ideal[t](task_params[t]) for t in (NER, POS)}
        seen.append(scores)
        return scores

    searched, result = search_plan(plan, zoo, zoo["base"], score_tasks, reference, 8, seed=0)
    assert result.evaluations == len(seen) == 8
    for row, scores in zip([r for r in result.log if not r["cached"]], seen):
        assert row["score"] == pytest.approx(min(scores.values()))  # worst task / reference 1.0
    assert result.score == max(min(s.values()) for s in seen)
    assert searched.params["lam"] == result.best["lam"] and searched.method == "task_arithmetic"
    assert searched.coefficients == {n: result.best[f"weight:{n}"] for n in searched.coefficients}


# ---------------------------------------------------------------- gate


def test_gate_passes_a_task_only_if_every_parent_keeps_the_fraction():
    report = gate({"ner": 0.86, "pos": 0.95}, {"ner": {"a": 0.90, "b": 0.80}, "pos": {"p": 0.96}}, 0.95)
    rows = {(c.task, c.parent): (c.retention, c.passed) for c in report.claims}
    assert rows[("ner", "a")] == (pytest.approx(0.86 / 0.90), True)  # 0.9556
    assert rows[("ner", "b")] == (pytest.approx(0.86 / 0.80), True)
    assert rows[("pos", "p")] == (pytest.approx(0.95 / 0.96), True)
    assert report.passed_tasks == ["ner", "pos"]
    strict = gate({"ner": 0.86, "pos": 0.95}, {"ner": {"a": 0.90, "b": 0.80}, "pos": {"p": 0.96}}, 0.96)
    assert strict.passed_tasks == ["pos"] and not strict.passed("ner")  # 0.9556 < 0.96 for parent a
    assert "FAIL" in strict.table() and "a" in strict.table()
    assert worst_retention({"ner": 0.86, "pos": 0.95}, {"ner": 0.90, "pos": 0.96}) == pytest.approx(0.86 / 0.90)
    with pytest.raises(JaxfoundError, match="threshold=0"):
        gate({"ner": 1.0}, {"ner": {"a": 1.0}}, 0.0)


def test_gate_registers_only_the_tasks_that_pass(g, zoo):
    plan = plan_merge(g, NER, "ties")
    fused = {NER: _dist_score(zoo["ner-a"]), POS: _dist_score(zoo["pos"])}
    _, report = execute_plan(plan, _loader(zoo), fused[NER], g=g, name="mt", evaluators={POS: fused[POS]},
                             threshold=0.9, metrics={POS: "accuracy"})
    by_task = {t: [c for c in report["gate"]["claims"] if c["task"] == t] for t in (NER, POS)}
    assert [c["parent"] for c in by_task[POS]] == ["pos"] and len(by_task[NER]) == 3
    want = [t for t in (NER, POS) if all(c["score"] / c["parent_score"] >= 0.9 for c in by_task[t])]
    if NER in want:
        assert report["registered"] and report["registered_tasks"] == want
        assert {(s["task"], s["metric"]) for s in G.scores(g, "mt")} == {
            (t, "f1" if t == NER else "accuracy") for t in want}
    else:
        assert not report["registered"]


# ---------------------------------------------------------------- head re-fit


def test_refit_head_equals_torch_adamw_on_a_tiny_problem():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    X, W_true = rng.standard_normal((300, 8)).astype(np.float32), rng.standard_normal((8, 3))
    y = np.argmax(X @ W_true + 0.3 * rng.standard_normal((300, 3)), -1).astype(np.int32)
    head = {"kernel": 0.1 * rng.standard_normal((8, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}
    cfg = refit.RefitConfig(lr=0.05, epochs=3, batch_tokens=64, weight_decay=0.01, warmup=0.1, clip=1.0, seed=4)
    history = refit.fit_head(head, X, y, cfg)
    # the reference: the same objective, schedule and token order with torch.optim.AdamW
    W = torch.tensor(head["kernel"], requires_grad=True)
    b = torch.tensor(head["bias"], requires_grad=True)
    orders = refit.epoch_orders(cfg, len(y))
    total, warm = cfg.epochs * len(orders[0]), max(1, int(cfg.epochs * len(orders[0]) * cfg.warmup))
    opt = torch.optim.AdamW([W, b], lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-8)
    step = 0
    for order in orders:
        for idx in order:
            lr = cfg.lr * step / warm if step < warm else cfg.lr * (1 - (step - warm) / (total - warm))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = torch.nn.functional.cross_entropy(torch.tensor(X[idx]) @ W + b, torch.tensor(y[idx]).long())
            opt.zero_grad()
            loss.backward()
            norm = torch.sqrt(W.grad.square().sum() + b.grad.square().sum())
            if norm > cfg.clip:  # optax.clip_by_global_norm: scale by clip / norm
                W.grad.mul_(cfg.clip / norm)
                b.grad.mul_(cfg.clip / norm)
            opt.step()
            step += 1
    np.testing.assert_allclose(history[-1]["kernel"], W.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(history[-1]["bias"], b.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(history[0]["kernel"], head["kernel"])  # epoch 0: the head as merged
    acc = [np.mean(np.concatenate(refit.predict([X], h)) == y) for h in history]
    assert acc[-1] > 0.85 and acc[-1] > acc[0]


def test_refit_is_recorded_as_its_own_edge(g, zoo):
    plan = plan_merge(g, NER, "ties")

    def fake_refit(task_params):  # the driver's contract: new heads, and what was done per task
        return task_params, {t: {"lr": 0.01, "epochs": 2, "epoch_kept": 1} for t in task_params}

    _, report = execute_plan(plan, _loader(zoo), lambda p: 0.9, g=g, name="mt-refit", refit=fake_refit)
    assert report["registered"] and set(report["refit"]) == {NER, POS}
    edges = [(g.vs[e.target]["name"], e["task"], e["lr"], e["epochs"], e["epoch_kept"]) for e in g.es
             if e["relation"] == "head_refit_on"]
    assert sorted(edges) == [("conll", NER, 0.01, 2, 1), ("conll", POS, 0.01, 2, 1)]
    assert "conll" in G.lineage(g, "mt-refit")
    assert G.from_dict(G.to_dict(g)).ecount() == g.ecount()  # the edge round-trips through JSON


# ---------------------------------------------------------------- CLI


@pytest.mark.parametrize(("extra", "flag"), [
    (["--search", "--budget", "0"], "--budget 0"),
    (["--budget", "5"], "--budget 5 needs --search"),
    (["--gate", "2"], "--gate 2.0"),
    (["--refit-heads", "--refit-epochs", "0"], "--refit-epochs 0"),
])
def test_merge_cli_errors_name_the_flag(tmp_path, capsys, extra, flag):
    assert cli.main(["merge", "--target-task", "t", "--registry", str(tmp_path), *extra]) == 2
    assert flag in capsys.readouterr().err


def test_merge_cli_search_with_a_recipe_names_the_flag(tmp_path, capsys):
    assert cli.main(["merge", "--recipe", "r.yaml", "--out", str(tmp_path), "--search"]) == 2
    assert "--search works with --target-task" in capsys.readouterr().err


def test_merge_cli_searches_refits_gates_and_logs(tmp_path, capsys):
    """Two tiny NER run dirs in a registry -> merge --search --refit-heads: log lines, refit edge, gate table."""
    from jaxfound.app.registry import register_finetune_run
    from jaxfound.config import Config, DataConfig, TrainConfig, load_config
    from jaxfound.data.conll import read_conll
    from jaxfound.data.tokenizer import train_tokenizer
    from jaxfound.models import abstract_params, build_model
    from jaxfound.runs import write_run
    from tests.test_finetune import write_toy_conll
    from tests.test_plan import TINY

    tiny = dataclasses.replace(TINY, num_labels=5)
    shapes = nn.unbox(abstract_params(build_model(tiny, "none")))["bert"]  # traced, not compiled: random values
    rng = np.random.default_rng(0)
    trunk = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)

    train = write_toy_conll((tmp_path / "conll").mkdir() or tmp_path / "conll" / "train.txt", 60, seed=1)
    valid = write_toy_conll(tmp_path / "conll" / "valid.txt", 20, seed=2)
    tok = train_tokenizer([" ".join(s.words) for s in read_conll(train, 0, -1)], "bert", 64, str(tmp_path / "tok"))
    template = Config(model=tiny, data=DataConfig(train=str(train), valid=str(valid), seq_len=16),
                      train=TrainConfig(task="ner", batch_size=8))
    base_dir, reg = tmp_path / "minilm", tmp_path / "registry"
    base_dir.mkdir()
    labels = ["B-LOC", "B-ORG", "B-PER", "I-PER", "O"]
    for i, (name, f1) in enumerate((("ner-a", 0.8), ("ner-b", 0.78))):
        head = {"kernel": 0.1 * np.random.default_rng(i).standard_normal((16, 5)).astype(np.float32),
                "bias": np.zeros(5, np.float32)}
        params = {"bert": jax.tree.map(lambda x, i=i: x + 0.01 * i, trunk), "classifier": head}
        run = write_run(tmp_path / name, template, params, labels=labels, tokenizer=tok)
        cfg = load_config(None, [f"run.dir={run}", f"run.registry={reg}", f"model.init={base_dir}",
                                 f"data.train={train}", f"data.valid={valid}", "train.task=ner"])
        register_finetune_run(cfg, {"reports": {"valid": {"f1": f1}}})
    out = tmp_path / "merged"
    code = cli.main(["merge", "--target-task", "conll/ner", "--registry", str(reg), "--method", "average",
                     "--search", "--budget", "3", "--refit-heads", "--refit-epochs", "1", "--gate", "0.5",
                     "--out", str(out), "--name", "soup"])
    printed = capsys.readouterr().out
    assert "gate (keep >= 0.5" in printed and "ner-a" in printed
    log = [json.loads(line) for line in (out / "search_log.jsonl").read_text().splitlines()]
    assert sum(not row["cached"] for row in log) <= 3 and {"coefficients", "score", "phase"} <= set(log[0])
    assert code == 0
    kg = G.load(reg)
    edges = [e for e in kg.es if e["relation"] == "head_refit_on"]
    assert len(edges) == 1 and edges[0]["task"] == "conll/ner" and edges[0]["epochs"] == 1
    merge_json = json.loads((out / "merge.json").read_text())
    assert merge_json["search"]["evaluations"] <= 3 and merge_json["refit"]["conll/ner"]["epoch_kept"] in (0, 1)
