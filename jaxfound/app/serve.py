"""`jaxfound serve`: a model behind an OpenAI-compatible HTTP API (Starlette on uvicorn).

    jaxfound serve --run runs/llama_clm --port 8000 --max-batch 8
    curl -s 127.0.0.1:8000/v1/completions -d '{"model": "llama_clm", "prompt": "Once upon", "max_tokens": 16}'

Decoders (GPT-2, the Llama family: run dirs, transformers dirs, GGUF files) answer /v1/completions and
/v1/chat/completions, streamed as server-sent events or not, through the continuous-batching engine (jaxfound.engine).
Fine-tuned encoders answer /v1/ner (taggers: entities with character offsets, as `jaxfound predict` prints them) and
/v1/classify, through the length-bucketed batcher (jaxfound.batcher). Every server has /v1/models, /health and
/metrics (Prometheus text). Every shape is compiled before the port opens. A full queue answers 503 with
Retry-After; bad input answers 400 / 404 / 413 with an OpenAI-style JSON error naming the field; a client that leaves
frees its slot; SIGTERM stops accepting, finishes the requests in flight and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import prometheus_client as prom
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxfound import runs
from jaxfound.app.generate import DECODERS
from jaxfound.app.openai_api import (
    ApiError,
    completion_chunk,
    completion_response,
    messages_of,
    new_id,
    prompts_of,
    sampling_params,
    usage_chunk,
)
from jaxfound.batcher import TextBatcher, TextRequest
from jaxfound.engine import Engine, EngineClosed, EngineFull, Request
from jaxfound.errors import JaxfoundError

MAX_INPUTS = 256  # texts per /v1/ner or /v1/classify request
MAX_TEXT_CHARS = 100_000
MAX_BODY_BYTES = 8 << 20
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class ServeOptions:
    """How a server runs: its address, batching bounds, access key and model name."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # decoder: KV-cache slots; encoder: windows per batch
    max_len: int | None = None  # decoder: tokens per request (prompt + new); default min(2048, the model's)
    max_queue: int = 64  # requests waiting beyond the batch; more get 503
    api_key: str | None = None
    model_name: str | None = None  # default: the run dir's name
    wait_ms: float = 5.0  # encoder: how long the first request of a batch waits for company
    shutdown_timeout: float = 300.0  # seconds in-flight requests get after SIGTERM
    seed: int = 0  # requests without a seed draw from key(seed * 1_000_003 + request number)
    compile_cache: str | None = None  # XLA's persistent compilation cache (serve's CLI default: $JAXFOUND_CACHE/xla)


class Metrics:
    """The Prometheus series of one server (its own registry, so several servers share a process)."""

    def __init__(self, queue_depth: Callable[[], int], active: Callable[[], int]):
        prom.disable_created_metrics()  # the *_created series only add noise to a scrape
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("jaxfound_requests", "HTTP requests by endpoint and status",
                                     ["endpoint", "status"], registry=r)
        self.tokens = prom.Counter("jaxfound_tokens", "Tokens by kind (prompt, generation)", ["kind"], registry=r)
        self.latency = prom.Histogram("jaxfound_request_latency_seconds", "Request latency by endpoint",
                                      ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = prom.Histogram("jaxfound_time_to_first_token_seconds", "Time to first token",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.batch = prom.Histogram("jaxfound_batch_size", "Rows per device step (decode: busy slots; encoder: "
                                    "windows)", ["step"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.step = prom.Histogram("jaxfound_step_seconds", "Device step time", ["step"],
                                   buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        prom.Gauge("jaxfound_queue_depth", "Requests waiting for a slot or a batch", registry=r).set_function(
            queue_depth)
        prom.Gauge("jaxfound_active_slots", "KV-cache slots in use (decoders)", registry=r).set_function(active)

    def on_step(self, kind: str, size: int, seconds: float) -> None:
        self.batch.labels(kind).observe(size)
        self.step.labels(kind).observe(seconds)


# ---------------------------------------------------------------- what a server serves


def open_servable(path) -> tuple[runs.Run, str]:
    """(run, 'decoder' | 'ner' | 'classify'): a decoder LM, or a fine-tuned tagger or classifier."""
    run = runs.open_run(path)
    if run.model.cfg.arch in DECODERS and run.model.head == "lm":
        kind = "decoder"
    elif run.labels is not None and not run.task.pretraining:
        kind = "ner" if run.task.token_level else "classify"
    else:
        raise JaxfoundError(f"{path}: a {run.model.cfg.arch} model with a '{run.model.head}' head (task "
                            f"{run.config.train.task}); serve needs a decoder LM (GPT-2 / Llama family) or a "
                            "fine-tuned tagger / classifier (ner, pos, chunk, cls)")
    if run.tokenizer is None:
        raise JaxfoundError(f"{path}: no tokenizer (tokenizer/ or tokenizer files); add the one it was trained with")
    return run, kind


class Server:
    """The routes of one model: HTTP in, engine or batcher calls, JSON out."""

    def __init__(self, run: runs.Run, kind: str, options: ServeOptions, progress: Callable[[str], None] = print):
        self.run, self.kind, self.options = run, kind, options
        self.name = options.model_name or Path(run.path).name.removesuffix(".gguf")
        self.tokenizer = run.tokenizer
        self.draining = False
        self._requests_seen = 0
        if kind == "decoder":
            self.backend = Engine(run.model, run.params, run.tokenizer, slots=options.max_batch,
                                  max_len=options.max_len, max_queue=options.max_queue)
            self.max_len = self.backend.max_len
            active = lambda: self.backend.active  # noqa: E731
        else:
            self.backend = TextBatcher(run.model, run.params, run.task, run.labels, run.tokenizer,
                                       seq_len=run.config.data.seq_len, max_batch=options.max_batch,
                                       wait_ms=options.wait_ms, max_queue=options.max_queue)
            active = lambda: 0  # noqa: E731
        self.metrics = Metrics(lambda: self.backend.queue_depth, active)
        if kind == "decoder":
            self.backend.on_step = self.metrics.on_step
        else:
            self.backend.on_batch = lambda windows, rows, seconds: self.metrics.on_step("encode", windows, seconds)
        self.progress = progress

    def compile(self) -> float:
        return self.backend.compile()

    def app(self) -> Starlette:
        routes = [Route("/health", self.health), Route("/metrics", self.prometheus),
                  Route("/v1/models", self.endpoint("models", self.models)),
                  Route("/v1/completions", self.endpoint("completions", self.completions), methods=["POST"]),
                  Route("/v1/chat/completions", self.endpoint("chat", self.chat), methods=["POST"]),
                  Route("/v1/ner", self.endpoint("ner", self.label), methods=["POST"]),
                  Route("/v1/classify", self.endpoint("classify", self.label), methods=["POST"])]

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.backend.start()
            try:
                yield
            finally:
                self.draining = True
                await asyncio.to_thread(self.backend.stop, self.options.shutdown_timeout)

        async def http_error(request, exc: HTTPException):
            status = exc.status_code
            message = f"no route {request.method} {request.url.path}" if status in (404, 405) else str(exc.detail)
            return JSONResponse(ApiError(status, message).body(), status)

        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})

    # ------------------------------------------------------------ plumbing

    def endpoint(self, name: str, handler):
        """handler behind the API key, with its latency and status counted and every error as JSON."""
        async def wrapped(request: HttpRequest):
            start, status = time.perf_counter(), 500
            try:
                self.authorize(request)
                response = await handler(request, name)
                status = response.status_code
                return response
            except ApiError as e:
                status = e.status
                return JSONResponse(e.body(), e.status, headers=e.headers)
            except Exception as e:  # a bug in one request never stops the server
                self.progress(f"error in {name}: {type(e).__name__}: {e}")
                return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}").body(), 500)
            finally:
                self.metrics.requests.labels(name, str(status)).inc()
                self.metrics.latency.labels(name).observe(time.perf_counter() - start)

        return wrapped

    def authorize(self, request: HttpRequest) -> None:
        key = self.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def body(self, request: HttpRequest) -> dict:
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body has {declared} bytes; at most {MAX_BODY_BYTES}")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        model = body.get("model")
        if model is not None and model != self.name:
            raise ApiError(404, f"model '{model}' is not served here; this server has '{self.name}'", "model",
                           "model_not_found")
        return body

    def needs(self, kind: str, endpoint: str) -> None:
        if self.kind != kind:
            ends = {"decoder": "/v1/completions, /v1/chat/completions", "ner": "/v1/ner",
                    "classify": "/v1/classify"}[self.kind]
            raise ApiError(404, f"{endpoint} is not served for this model ({self.kind}); its endpoints: {ends}")

    # ------------------------------------------------------------ routes

    async def health(self, request: HttpRequest) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, 503)
        if getattr(self.backend, "error", None) is not None:  # the engine thread failed: restart the server
            return JSONResponse({"status": "failed", "error": repr(self.backend.error)}, 503)
        return JSONResponse({"status": "ok", "model": self.name, "kind": self.kind})

    async def prometheus(self, request: HttpRequest) -> Response:
        return Response(prom.generate_latest(self.metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    async def models(self, request: HttpRequest, name: str) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                                         "owned_by": "jaxfound", "kind": self.kind}]})

    async def completions(self, request: HttpRequest, name: str) -> Response:
        self.needs("decoder", "/v1/completions")
        body = await self.body(request)
        sampling = sampling_params(body, chat=False)
        prompts = [p if isinstance(p, list) else list(self.tokenizer(p)["input_ids"]) for p in prompts_of(body)]
        return await self.generate(request, body, sampling, prompts, chat=False, field="prompt")

    async def chat(self, request: HttpRequest, name: str) -> Response:
        self.needs("decoder", "/v1/chat/completions")
        body = await self.body(request)
        sampling = sampling_params(body, chat=True)
        messages = messages_of(body)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])  # the template holds the BOS
        return await self.generate(request, body, sampling, [ids], chat=True, field="messages")

    def engine_requests(self, sampling, prompts: list[list[int]], field: str, events: asyncio.Queue) -> list[Request]:
        """One engine request per prompt, checked against the context (413 / 400 naming the field)."""
        loop, out = asyncio.get_running_loop(), []
        eos = self.tokenizer.eos_token_id
        for i, ids in enumerate(prompts):
            if len(ids) >= self.max_len:
                raise ApiError(413, f"the prompt has {len(ids)} tokens; this server holds {self.max_len} per request "
                               "(prompt and completion, --max-len)", field, "context_length_exceeded")
            max_tokens = sampling.max_tokens or self.max_len - len(ids)
            if len(ids) + max_tokens > self.max_len:
                raise ApiError(400, f"max_tokens={max_tokens} with a {len(ids)}-token prompt exceeds the "
                               f"{self.max_len} tokens this server holds per request; ask for at most "
                               f"{self.max_len - len(ids)}", "max_tokens", "context_length_exceeded")
            self._requests_seen += 1
            seed = sampling.seed if sampling.seed is not None else (
                self.options.seed * 1_000_003 + self._requests_seen) & 0x7FFFFFFF
            push = lambda kind, payload, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, kind, payload))
            request = Request(ids, max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                              top_k=sampling.top_k, seed=seed, stop=sampling.stop,
                              stop_token_ids=frozenset(() if eos is None else (eos,)), on_event=push)
            try:
                self.backend.check(request)
            except JaxfoundError as e:
                raise ApiError(400, str(e), field) from None
            out.append(request)
        return out

    def submit(self, requests: list) -> None:
        """Queue them all, or none: 503 with Retry-After when full or stopping."""
        done = []
        try:
            for r in requests:
                done.append(self.backend.submit(r))
        except (EngineFull, EngineClosed) as e:
            for r in done:
                self.backend.cancel(r)
            raise ApiError(503, str(e), headers={"Retry-After": "1"}) from None

    async def generate(self, request: HttpRequest, body: dict, sampling, prompts, chat: bool, field: str):
        events: asyncio.Queue = asyncio.Queue()
        requests = self.engine_requests(sampling, prompts, field, events)
        self.submit(requests)
        self.metrics.tokens.labels("prompt").inc(sum(len(p) for p in prompts))
        rid = new_id("chatcmpl" if chat else "cmpl")
        if sampling.stream:
            return StreamingResponse(self.stream(rid, chat, requests, events, sampling.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finished = await self.wait(request, requests, events)
        if not finished:
            return Response(status_code=499)
        self.count_generated(requests)
        errors = [r.row.finish_reason for r in requests if r.row.finish_reason == "error"]
        if errors:
            raise ApiError(500, "the engine failed while generating; see the server log")
        return JSONResponse(completion_response(rid, self.name, chat, [(r.row.text, r.row.finish_reason)
                                                                      for r in requests],
                                                sum(len(p) for p in prompts), sum(len(r.row.tokens) for r in requests)))

    def count_generated(self, requests) -> None:
        self.metrics.tokens.labels("generation").inc(sum(len(r.row.tokens) for r in requests))
        for r in requests:
            if r.first_token_at is not None:
                self.metrics.ttft.observe(r.first_token_at - r.submitted_at)

    async def wait(self, request: HttpRequest, requests, events: asyncio.Queue) -> bool:
        """Until every request is done (True) or the client disconnects (False: the requests are cancelled)."""
        async def all_done():
            left = len(requests)
            while left:
                _, kind, _ = await events.get()
                left -= kind in ("done", "error")

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        done_task, gone_task = asyncio.ensure_future(all_done()), asyncio.ensure_future(disconnected())
        await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        if done_task.done():
            gone_task.cancel()
            return True
        done_task.cancel()
        for r in requests:
            self.backend.cancel(r)
        return False

    async def stream(self, rid: str, chat: bool, requests, events: asyncio.Queue, include_usage: bool):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        left = len(requests)
        try:
            if chat:
                for i in range(len(requests)):
                    yield sse(completion_chunk(rid, self.name, chat, i, None, None, role=True))
            while left:
                i, kind, payload = await events.get()
                if kind == "text":
                    yield sse(completion_chunk(rid, self.name, chat, i, payload, None))
                elif kind == "done":
                    left -= 1
                    yield sse(completion_chunk(rid, self.name, chat, i, None if chat else "", payload))
                else:
                    left -= 1
                    yield sse(ApiError(500, str(payload)).body())
            self.count_generated(requests)
            if include_usage:
                yield sse(usage_chunk(rid, self.name, chat, sum(len(r.prompt_ids) for r in requests),
                                      sum(len(r.row.tokens) for r in requests)))
            yield "data: [DONE]\n\n"
        finally:  # the client left (or the stream ended): free the slots
            for r in requests:
                if not r.finished:
                    self.backend.cancel(r)

    async def label(self, request: HttpRequest, name: str) -> Response:
        self.needs(name, f"/v1/{name}")
        body = await self.body(request)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "'input' must be a string or a non-empty list of strings", "input")
        if len(texts) > MAX_INPUTS:
            raise ApiError(413, f"'input' has {len(texts)} texts; at most {MAX_INPUTS} per request", "input")
        for i, t in enumerate(texts):
            if not t.strip():
                raise ApiError(400, f"input[{i}] is empty", f"input[{i}]")
            if len(t) > MAX_TEXT_CHARS:
                raise ApiError(413, f"input[{i}] has {len(t)} characters; at most {MAX_TEXT_CHARS}", f"input[{i}]")
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(ok: bool, value):
            if not future.done():
                future.set_result((ok, value))

        job = TextRequest(texts, on_done=lambda rows: loop.call_soon_threadsafe(settle, True, rows),
                          on_error=lambda message: loop.call_soon_threadsafe(settle, False, message))
        self.submit([job])
        ok, rows = await future
        if not ok:
            raise ApiError(500, f"labelling failed: {rows}")
        for row in rows:
            if "entities" in row:  # as `jaxfound predict` prints them
                row.pop("tags")
        return JSONResponse({"object": "list", "model": self.name, "data": rows})


# ---------------------------------------------------------------- the driver


def read_api_key(path) -> str:
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise JaxfoundError(f"--api-key-file {path}: cannot read it ({e})") from None
    if not key or any(c.isspace() for c in key):
        raise JaxfoundError(f"--api-key-file {path}: the key must be one non-empty word")
    return key


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), so the port is known before the server runs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise JaxfoundError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    sock.listen(2048)
    return sock


class Background:
    """A compiled Server run by uvicorn on a thread (notebooks, tests): `with Background(server) as url: ...`."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0):
        self.server, self.sock = server, bind(host, port)
        self.url = "http://{}:{}".format(*self.sock.getsockname()[:2])
        self.runner = uvicorn.Server(uvicorn.Config(server.app(), log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=server.options.shutdown_timeout))
        self.thread = threading.Thread(target=self.runner.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.start_timeout = start_timeout

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.runner.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise JaxfoundError(f"the server on {self.url} did not start within {self.start_timeout} s")
            time.sleep(0.02)
        return self.url

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting, let in-flight requests finish, stop the engine."""
        self.runner.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(path, options: ServeOptions, progress: Callable[[str], None] = print) -> int:
    """Open the model, compile every shape, listen, serve until SIGTERM / SIGINT; 0 after a clean drain."""
    if options.max_batch < 1 or options.max_queue < 0:
        raise JaxfoundError(f"--max-batch must be >= 1 and --max-queue >= 0; got {options.max_batch}, "
                            f"{options.max_queue}")
    run, kind = open_servable(path)
    server = Server(run, kind, options, progress)
    if options.compile_cache:  # a restart with the same model and bounds loads its executables instead of compiling
        jax.config.update("jax_compilation_cache_dir", str(options.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    progress(f"compiling {server.name} ({kind}) for batches up to {options.max_batch} ...")
    seconds = server.compile()
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=options.shutdown_timeout,
                            lifespan="on")
    runner = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it after the drain; a no-op handler turns that into a clean exit 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        progress(f"compiled in {seconds:.1f} s; serving {server.name} on http://{host}:{port} (endpoints: "
                 f"{'/v1/completions, /v1/chat/completions' if kind == 'decoder' else '/v1/' + kind}, /v1/models, "
                 "/health, /metrics)")
        runner.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    progress(f"stopped {server.name}: in-flight requests finished")
    return 0


__all__ = ["Background", "Metrics", "ServeOptions", "Server", "open_servable", "read_api_key", "serve"]
