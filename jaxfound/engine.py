"""Continuous batching of decoders: a fixed number of KV-cache slots; requests join at the next step, leave when done.

    engine = Engine(model, params, tokenizer, slots=8, max_len=1024)
    engine.compile()                     # every shape it will run, before traffic
    engine.start()
    request = engine.submit(Request(prompt_ids, max_tokens=64, on_event=print))
    ...
    engine.stop()                        # finishes what was admitted, then the thread ends

One engine thread owns the device state. Each loop turn: free slots take waiting requests (each prompt is prefilled
on its own at a power-of-two length bucket into a fresh cache, then copied into its slot), one decode step advances
every slot, and the tokens of the previous turn are read and routed (the host reads one step late, so the device
never waits on Python). The cache length follows the longest admitted request (prompt + max_tokens) in
power-of-two buckets, so decode attends over what is in use, not over the whole context; growing or shrinking it is
one copy. Every slot carries its own sampling settings and key: a request's tokens depend on its seed alone, not on
its neighbours (row r = 0 of `generation.generate` with key(seed): the same draws). All shapes are compiled by
compile(); nothing compiles under traffic.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfound.errors import JaxfoundError
from jaxfound.generation import (
    TextRow,
    advance,
    cache_shardings,
    check_request,
    decoding_params,
    filter_top_k_top_p,
    param_shardings,
    single_device_mesh,
)
from jaxfound.models.cache import cache_shape, init_cache
from jaxfound.sharding import LOGICAL_RULES, activation_sharding

MIN_PROMPT_BUCKET = 32  # the shortest prompt bucket compiled
MIN_CACHE_BUCKET = 64  # the shortest cache: fewer decode shapes to compile; short requests pay little for it
DEFAULT_MAX_LEN = 2048  # context served when the model allows more and none is asked for


class EngineFull(JaxfoundError):
    """The waiting queue is at its bound: try again later (HTTP 503 with Retry-After)."""


class EngineClosed(JaxfoundError):
    """The engine is stopping or stopped: it takes no new requests."""


@dataclass(eq=False)
class Request:
    """One prompt to continue. on_event(kind, payload) is called on the engine thread: ('text', piece) for each new
    piece of text, then ('done', finish_reason) once ('stop', 'length' or 'cancelled'), or ('error', message)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset = frozenset()
    on_event: Callable[[str, object], None] = lambda kind, payload: None
    row: TextRow = field(default_factory=TextRow)
    submitted_at: float = 0.0
    first_token_at: float | None = None
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.row.finish_reason is not None

    @property
    def need(self) -> int:
        """Cache slots this request can use: its prompt and every new token."""
        return len(self.prompt_ids) + self.max_tokens


# ---------------------------------------------------------------- device steps (pure)


def sample_slots(logits_VxN, state):
    """Each slot's next token: argmax where its temperature is 0, else a draw from its temperature-scaled, top-k /
    top-p filtered distribution with key fold_in(fold_in(key(seed), step), 0), as generate draws row 0."""
    temperature_N = state["temperature"]
    greedy_N = jnp.argmax(logits_VxN, axis=0).astype(jnp.int32)

    def draw(_):
        logits_NxV = logits_VxN.T / jnp.maximum(temperature_N, 1e-6)[:, None]
        needs_filter = jnp.any((state["top_k"] > 0) | (state["top_p"] < 1.0))
        filter_rows = jax.vmap(lambda x_V, k, p: filter_top_k_top_p(x_V[None], k, p)[0])
        logits_NxV = lax.cond(needs_filter, lambda x: filter_rows(x, state["top_k"], state["top_p"]), lambda x: x,
                              logits_NxV)
        keys_N = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.fold_in(k, s), 0))(
            jax.random.wrap_key_data(state["key"]), state["step"])
        return jnp.where(temperature_N > 0, jax.vmap(jax.random.categorical)(keys_N, logits_NxV).astype(jnp.int32),
                         greedy_N)

    return lax.cond(jnp.all(temperature_N <= 0), lambda _: greedy_N, draw, None)


def init_state(slots: int) -> dict:
    """The per-slot state: last token, next write index, step within its request, sampling settings and key."""
    return {"token": jnp.zeros((slots,), jnp.int32), "index": jnp.zeros((slots,), jnp.int32),
            "step": jnp.zeros((slots,), jnp.int32), "temperature": jnp.zeros((slots,), jnp.float32),
            "top_p": jnp.ones((slots,), jnp.float32), "top_k": jnp.zeros((slots,), jnp.int32),
            "key": jnp.zeros((slots, 2), jnp.uint32)}


def make_engine_steps(model, mesh: Mesh):
    """(prefill, insert, decode, resize), pure.

    prefill(params, state, ids_1xP, length, slot, settings) -> (state, cache_P): the prompt into a fresh cache of P
    slots, its first token sampled into the slot's state. insert(cache, cache_P, slot) -> cache: cache_P copied into
    the slot from position 0. decode(params, cache, state) -> (state, cache): one token for each of the first Nb
    slots, Nb the cache's rows. resize(cache, slots, L) -> the cache cut or zero-padded to slots x L positions."""
    cfg = model.cfg

    def prefill(params, state, ids_1xP, length, slot, settings):
        with activation_sharding(mesh, LOGICAL_RULES):
            cache_P = init_cache(cfg, 1, ids_1xP.shape[1])
            logits_Vx1, cache_P = model.apply({"params": params}, ids_1xP, cache=cache_P, cache_index=None,
                                              masked_positions=jnp.reshape(length - 1, (1, 1)), vocab_major=True)
        row = {"temperature": settings["temperature"][None], "top_p": settings["top_p"][None],
               "top_k": settings["top_k"][None], "key": settings["key"][None], "step": jnp.zeros((1,), jnp.int32)}
        token = sample_slots(logits_Vx1, row)[0]
        new = {"token": token, "index": length, "step": jnp.int32(1), **{k: settings[k] for k in
                                                                           ("temperature", "top_p", "top_k", "key")}}
        return {k: state[k].at[slot].set(new[k]) for k in state}, cache_P

    def insert(cache, cache_P, slot):
        put = lambda c, p: lax.dynamic_update_slice(c, p.astype(c.dtype), (slot, 0, 0, 0))
        return jax.tree.map(put, cache, cache_P)

    def decode(params, cache, state):
        Nb = jax.tree.leaves(cache)[0].shape[0]  # the cache holds the first Nb slots
        rows = {k: v[:Nb] for k, v in state.items()}
        with activation_sharding(mesh, LOGICAL_RULES):
            logits_VxNb, cache = model.apply({"params": params}, rows["token"][:, None], cache=cache,
                                             cache_index=rows["index"], vocab_major=True)
        rows = {**rows, "token": sample_slots(logits_VxNb, rows), "index": rows["index"] + 1,
                "step": rows["step"] + 1}
        return {k: lax.dynamic_update_slice_in_dim(state[k], rows[k], 0, axis=0) for k in state}, cache

    def resize(cache, slots: int, length: int):
        def one(c):
            c = c[:slots, :, :length]
            return jnp.pad(c, ((0, slots - c.shape[0]), (0, 0), (0, length - c.shape[2]), (0, 0)))

        return jax.tree.map(one, cache)

    return prefill, insert, decode, resize


def power_buckets(smallest: int, largest: int) -> list[int]:
    """Powers of two from smallest up, then largest itself (the context need not be a power of two)."""
    out, n = [], smallest
    while n < largest:
        out.append(n)
        n *= 2
    return out + [largest]


# ---------------------------------------------------------------- the engine (host side)


class RequestQueue:
    """A bounded queue of requests served by one thread (the engine's decode loop, the encoder batcher): submit
    raises EngineFull at the bound and EngineClosed once stopping; stop lets the thread finish what was queued."""

    thread_name = "jaxfound-worker"

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._waiting: collections.deque = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.error: BaseException | None = None  # set when the thread died: it takes no more requests
        self.compiled = False
        self.compile_seconds = 0.0

    def compile(self) -> float:
        raise NotImplementedError

    def _run(self) -> None:
        raise NotImplementedError

    def enqueue(self, request):
        with self._lock:
            if self._closing or self.error is not None:
                raise EngineClosed("the server is stopping and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise EngineFull(f"{len(self._waiting)} requests are waiting (the bound is {self.max_queue}); "
                                 "retry later")
            request.submitted_at = time.perf_counter()
            self._waiting.append(request)
            self._lock.notify()
        return request

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def start(self):
        if not self.compiled:
            self.compile()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Take no new requests, finish the queued ones, end the thread (waits up to timeout s)."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)


class Engine(RequestQueue):
    """Continuous batching over `slots` KV-cache rows for one decoder (see the module docstring)."""

    thread_name = "jaxfound-engine"

    def __init__(self, model, params, tokenizer=None, *, slots: int = 8, max_len: int | None = None,
                 max_queue: int = 256, mesh: Mesh | None = None, prefill_tokens_per_step: int = 2048,
                 on_step: Callable[[str, int, float], None] | None = None):
        check_request(model, [[0]], 1, 0.0, 0, 1.0)  # a decoder with an LM head
        if slots < 1 or max_queue < 0:
            raise JaxfoundError(f"slots must be >= 1 and max_queue >= 0; got slots={slots}, max_queue={max_queue}")
        super().__init__(max_queue)
        cfg = model.cfg
        self.max_len = min(max_len or DEFAULT_MAX_LEN, cfg.max_position)
        if self.max_len < 2:
            raise JaxfoundError(f"max_len must be >= 2 (a prompt token and a new one); got {max_len}")
        self.model, self.tokenizer, self.slots = model, tokenizer, slots
        self.mesh = mesh or single_device_mesh()
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.on_step = on_step or (lambda kind, size, seconds: None)
        self.prompt_buckets = power_buckets(min(MIN_PROMPT_BUCKET, self.max_len), self.max_len)
        self.cache_buckets = power_buckets(min(MIN_CACHE_BUCKET, self.max_len), self.max_len)  # cache lengths
        self.slot_buckets = power_buckets(1, slots)  # decode covers the first Nb slots (requests take the lowest)
        self._params_tree = decoding_params(model, params)  # int8 w8a8 weights packed once for the native kernel
        self._compiled: dict = {}
        self._active: list[Request | None] = [None] * slots

    # ------------------------------------------------------------ compile

    def _spec(self, shape, dtype, sharding=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding or NamedSharding(self.mesh, P()))

    def compile(self, progress: Callable[[str], None] | None = None) -> float:
        """Compile every prefill (per prompt bucket), decode and resize (per cache bucket) and insert shape; place
        the params and an empty cache. The seconds it took."""
        start = time.perf_counter()
        cfg, N, dtype = self.model.cfg, self.slots, jnp.dtype(self.model.cfg.dtype)
        p_shardings = param_shardings(self.model, self._params_tree, self.mesh)
        self.params = jax.tree.map(lambda x, s: jax.device_put(x, s), self._params_tree, p_shardings)
        params_spec = jax.tree.map(lambda x, s: self._spec(x.shape, x.dtype, s), self.params, p_shardings)
        rep = NamedSharding(self.mesh, P())
        state = jax.device_put(init_state(N), rep)
        state_spec = jax.tree.map(lambda x: self._spec(x.shape, x.dtype), state)
        settings_spec = {"temperature": self._spec((), jnp.float32), "top_p": self._spec((), jnp.float32),
                         "top_k": self._spec((), jnp.int32), "key": self._spec((2,), jnp.uint32)}
        scalar = self._spec((), jnp.int32)
        prefill, insert, decode, resize = make_engine_steps(self.model, self.mesh)

        def cache_spec(batch, length):
            return jax.tree.map(lambda s: self._spec((batch, *cache_shape_tail(cfg, length)), dtype, s),
                                cache_shardings(cfg, batch, length, self.mesh))

        def cache_out(batch, length):
            return cache_shardings(cfg, batch, length, self.mesh)

        state_out = jax.tree.map(lambda x: x.sharding, state_spec)
        jobs = {}  # key -> (function, its specs): lowered here, compiled in parallel (XLA releases the GIL)
        for P_ in self.prompt_buckets:
            jobs["prefill", P_] = (jax.jit(prefill, out_shardings=(state_out, cache_out(1, P_))),
                                   (params_spec, state_spec, self._spec((1, P_), jnp.int32), scalar, scalar,
                                    settings_spec))
        for Nb in self.slot_buckets:
            for L in self.cache_buckets:
                jobs["decode", Nb, L] = (jax.jit(decode, donate_argnums=(1,),
                                                 out_shardings=(state_out, cache_out(Nb, L))),
                                         (params_spec, cache_spec(Nb, L), state_spec))
                for P_ in (p for p in self.prompt_buckets if p <= L):
                    jobs["insert", P_, Nb, L] = (jax.jit(insert, donate_argnums=(0,), out_shardings=cache_out(Nb, L)),
                                                 (cache_spec(Nb, L), cache_spec(1, P_), scalar))
        shapes = [(Nb, L) for Nb in self.slot_buckets for L in self.cache_buckets]
        for a in shapes:
            for b in shapes:
                if self._next_shape(a, b) == b and a != b:
                    jobs["resize", a, b] = (jax.jit(functools.partial(resize, slots=b[0], length=b[1]),
                                                    out_shardings=cache_out(*b)), (cache_spec(*a),))

        def build(key):
            fn, specs = jobs[key]
            compiled = fn.lower(*specs).compile()
            _say(progress, " ".join(map(str, key)))
            return key, compiled

        heavy_first = sorted(jobs, key=lambda k: k[0] not in ("prefill", "decode"))
        with concurrent.futures.ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 4))) as pool:
            self._compiled.update(pool.map(build, heavy_first))
        self._state = state
        self._shape = (self.slot_buckets[0], self.cache_buckets[0])
        self._cache = jax.device_put(init_cache(cfg, *self._shape), cache_out(*self._shape))
        self.compiled, self.compile_seconds = True, time.perf_counter() - start
        return self.compile_seconds

    # ------------------------------------------------------------ requests

    def check(self, request: Request) -> None:
        """A JaxfoundError naming what this engine cannot serve in the request (prompt ids, lengths, sampling)."""
        check_request(self.model, [request.prompt_ids], max(request.max_tokens, 1), request.temperature,
                      request.top_k, request.top_p)
        if request.max_tokens < 1:
            raise JaxfoundError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if request.need > self.max_len:
            raise JaxfoundError(f"the prompt has {len(request.prompt_ids)} tokens; with max_tokens="
                                f"{request.max_tokens} that is {request.need} tokens, over the {self.max_len} this "
                                "server holds per request (--max-len): shorten the prompt or lower max_tokens")
        if request.stop and self.tokenizer is None:
            raise JaxfoundError("stop strings need a tokenizer (they are looked for in the decoded text)")

    def submit(self, request: Request) -> Request:
        """Queue a request (checked first); EngineFull when max_queue requests wait, EngineClosed when stopping."""
        self.check(request)
        return self.enqueue(request)

    def cancel(self, request: Request) -> None:
        """Stop a request (its client left): it leaves its slot at the next step, or the queue before it starts."""
        request.cancelled = True

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._active)

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        pending: list = []  # dispatched, not yet read: (kind, token array, [(slot, request)])
        try:
            while True:
                with self._lock:
                    idle = not pending and self.active == 0 and not self._waiting
                    if idle and self._closing:
                        return
                    if idle:
                        self._lock.wait(0.5)
                        continue
                dispatched = self._admit()
                occupied = [(s, r) for s, r in enumerate(self._active) if r is not None]
                if occupied:
                    self._fit_cache()
                    start = time.perf_counter()
                    self._state, self._cache = self._compiled["decode", *self._shape](self.params, self._cache,
                                                                                      self._state)
                    dispatched.append(("decode", self._state["token"], occupied, start))
                for item in pending:
                    self._route(*item)
                pending = dispatched
        except BaseException as e:  # the device failed: fail every request, take no more
            self.error = e
            with self._lock:
                self._closing = True
                everyone = [r for r in self._active if r is not None] + list(self._waiting)
                self._waiting.clear()
            for r in everyone:
                if not r.finished:
                    r.row.finish_reason = "error"
                    r.on_event("error", f"the engine failed: {type(e).__name__}: {e}")

    def _admit(self) -> list:
        """Prefill waiting requests into free slots (up to prefill_tokens_per_step prompt tokens this turn)."""
        dispatched, budget = [], self.prefill_tokens_per_step
        while budget > 0:
            with self._lock:
                free = [s for s, r in enumerate(self._active) if r is None]
                if not free or not self._waiting:
                    break
                request = self._waiting.popleft()
            if request.cancelled:
                self._finish(request, "cancelled")
                continue
            slot, n = free[0], len(request.prompt_ids)
            P_ = next(p for p in self.prompt_buckets if p >= n)
            self._active[slot] = request
            self._fit_cache()
            ids = np.zeros((1, P_), np.int32)
            ids[0, :n] = request.prompt_ids
            settings = {"temperature": np.float32(request.temperature), "top_p": np.float32(request.top_p),
                        "top_k": np.int32(request.top_k),
                        "key": np.asarray(jax.random.key_data(jax.random.key(request.seed)), np.uint32)}
            start = time.perf_counter()
            self._state, cache_P = self._compiled["prefill", P_](self.params, self._state, ids, np.int32(n),
                                                                 np.int32(slot), settings)
            self._cache = self._compiled["insert", P_, *self._shape](self._cache, cache_P, np.int32(slot))
            dispatched.append(("prefill", self._state["token"], [(slot, request)], start))
            budget -= n
        return dispatched

    def _next_shape(self, shape: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
        """One bucket step from shape towards target: slots first, then length."""
        for axis, buckets in ((0, self.slot_buckets), (1, self.cache_buckets)):
            if shape[axis] != target[axis]:
                i = buckets.index(shape[axis])
                step = buckets[i + 1] if target[axis] > shape[axis] else buckets[i - 1]
                return (step, shape[1]) if axis == 0 else (shape[0], step)
        return shape

    def _fit_cache(self) -> None:
        """Grow or shrink the cache to the buckets of the highest busy slot and the longest request in the slots."""
        busy = [s for s, r in enumerate(self._active) if r is not None]
        need = max(self._active[s].need for s in busy)
        target = (next(b for b in self.slot_buckets if b > busy[-1]), next(b for b in self.cache_buckets if b >= need))
        while self._shape != target:
            step = self._next_shape(self._shape, target)
            self._cache = self._compiled["resize", self._shape, step](self._cache)
            self._shape = step

    def _route(self, kind: str, tokens, occupied, start: float) -> None:
        """Hand each request of a dispatched step its token; free the slots of those that ended."""
        tokens_N = np.asarray(tokens)
        now = time.perf_counter()
        self.on_step(kind, len(occupied), now - start)
        for slot, request in occupied:
            if request.finished:
                continue
            if request.cancelled:
                self._finish(request, "cancelled", slot)
                continue
            piece = advance(request.row, int(tokens_N[slot]), request.max_tokens, request.stop_token_ids,
                            request.stop, self.tokenizer)
            if request.first_token_at is None:
                request.first_token_at = now
            if piece:
                request.on_event("text", piece)
            if request.finished:
                self._finish(request, request.row.finish_reason, slot)

    def _finish(self, request: Request, reason: str, slot: int | None = None) -> None:
        request.row.finish_reason = reason
        if slot is not None:
            self._active[slot] = None
        request.on_event("done", reason)


def cache_shape_tail(cfg, length: int) -> tuple[int, int, int]:
    """(K, S, H) of a cache of `length` positions."""
    return cache_shape(cfg, 1, length)[1:]


def _say(progress, message: str) -> None:
    if progress is not None:
        progress(message)


__all__ = ["Engine", "EngineClosed", "EngineFull", "Request", "RequestQueue", "init_state", "make_engine_steps",
           "power_buckets", "sample_slots"]
