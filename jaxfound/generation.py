"""The generation engine of decoders: prefill the prompts into a KV cache, then decode a chunk of tokens per call.

    result = generate(model, params, [[1, 5, 9], [1, 7]], max_new_tokens=32, temperature=0.7, key=jax.random.key(0))
    result.tokens, result.finish_reasons, result.decode_tokens_per_second

Prompts are right-padded to a length bucket and prefilled together from slot 0; each row then decodes at its own
position (models.cache). The two steps are compiled once per (model, mesh, batch, prompt bucket, cache bucket,
greedy or sampling, decode chunk) and reused; temperature, top-k and top-p are traced values, so changing them does
not recompile. The cache is donated to each call and updated in place. One decode call runs DECODE_CHUNK steps in a
lax.scan and returns their tokens, so the host pays a call's dispatch (every params leaf) once per chunk, not per
token (benchmarks/generate.py --decode-chunk measures it); tokens past a row's end are ignored, and the cache has
slots for the last chunk in full. The host reads each chunk's tokens one call late: chunk c + 1 is dispatched before
the tokens of chunk c are read for the stop checks and the callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfound.config import MeshConfig
from jaxfound.errors import JaxfoundError
from jaxfound.models import abstract_params
from jaxfound.models.cache import CACHE_AXES, cache_shape, init_cache
from jaxfound.quant.packed import for_decoding
from jaxfound.sharding import LOGICAL_RULES, activation_sharding, logical_shardings, make_mesh

MIN_PROMPT_BUCKET = 16
MAX_COMPILED = 32  # compiled (prefill, decode) pairs kept; the oldest is dropped beyond this
DECODE_CHUNK = 8  # decode steps per call of generate (a call's host dispatch is paid once per chunk)
_COMPILED: dict = {}


@dataclass
class GenerationResult:
    """What generate returns: per row the new tokens (a stop token that ended the row included, as transformers
    returns it), the text (stop token and stop string cut off), why the row ended; timings of the whole batch."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # 'stop' (stop token or string) or 'length' (max_new_tokens)
    texts: list[str] | None = None  # with a tokenizer
    prompt_tokens: list[int] = field(default_factory=list)
    compile_seconds: float = 0.0  # compiling the steps in this call (0 when they were compiled before)
    prefill_seconds: float = 0.0  # from the call (after compiling) until the first tokens are on the host
    decode_seconds: float = 0.0  # from the first tokens to the last
    time_to_first_token: float = 0.0  # = prefill_seconds: placement, prefill and the first sample

    @property
    def num_generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        """All new tokens over prefill + decode time."""
        return self.num_generated / max(self.prefill_seconds + self.decode_seconds, 1e-9)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens of the decode steps (all but each row's first) over decode time."""
        return (self.num_generated - len(self.tokens)) / max(self.decode_seconds, 1e-9)


# ---------------------------------------------------------------- sampling (pure)


def filter_top_k_top_p(logits_BxV, top_k, top_p):
    """Logits with the tokens outside the top k, then outside the nucleus of probability top_p, set to -inf.

    top_k <= 0 and top_p >= 1 keep everything. Ties with the last kept logit are kept (as transformers does); the
    most likely token is always kept. The nucleus holds the most likely tokens whose probability before them is
    below top_p (transformers' TopPLogitsWarper).
    """
    V = logits_BxV.shape[-1]
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    rank_V = jnp.arange(V)
    keep_BxV = jnp.broadcast_to((top_k <= 0) | (rank_V < top_k), sorted_BxV.shape)
    sorted_BxV = jnp.where(keep_BxV, sorted_BxV, -jnp.inf)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV &= (before_BxV < top_p) | (top_p >= 1.0)
    keep_BxV = keep_BxV.at[:, 0].set(True)
    threshold_B = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1)
    return jnp.where(logits_BxV >= threshold_B[:, None], logits_BxV, -jnp.inf)


def sample(logits_BxV, key, step, sampling: dict, greedy: bool):
    """Next token per row: argmax (lowest id on ties) when greedy, else a draw from the temperature-scaled, top-k /
    top-p filtered distribution with key fold_in(fold_in(key, step), row)."""
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return _draw(logits_BxV, key, step, sampling)


def sample_vocab_major(logits_VxB, key, step, sampling: dict, greedy: bool):
    """sample for logits laid out (V, B), as the decoders give them with vocab_major (greedy reads them in place)."""
    if greedy:
        return jnp.argmax(logits_VxB, axis=0).astype(jnp.int32)
    return _draw(logits_VxB.T, key, step, sampling)


def _draw(logits_BxV, key, step, sampling: dict):
    logits_BxV = filter_top_k_top_p(logits_BxV / sampling["temperature"], sampling["top_k"], sampling["top_p"])
    step_key = jax.random.fold_in(key, step)
    keys_B = jax.vmap(lambda b: jax.random.fold_in(step_key, b))(jnp.arange(logits_BxV.shape[0]))
    return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


# ---------------------------------------------------------------- the two steps


def bucket(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """The power of two >= n (at least `minimum`): few shapes, so few compiles."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def make_steps(model, S: int, greedy: bool, mesh: Mesh):
    """(prefill, decode), pure: prefill(params, ids_BxP, lengths_B, key, sampling) -> (state, cache) with a fresh
    cache of S slots; decode(params, cache, state, key, sampling) -> (state, cache). state: the last sampled token,
    the next write index of each row and the step number."""
    def prefill(params, ids_BxP, lengths_B, key, sampling):
        with activation_sharding(mesh, LOGICAL_RULES):
            cache = init_cache(model.cfg, ids_BxP.shape[0], S)
            last_Bx1 = (lengths_B - 1)[:, None]
            logits_VxB, cache = model.apply({"params": params}, ids_BxP, cache=cache, cache_index=None,
                                            masked_positions=last_Bx1, vocab_major=True)  # None: a fresh cache
        token_B = sample_vocab_major(logits_VxB, key, 0, sampling, greedy)
        return {"token": token_B, "index": lengths_B, "step": jnp.int32(1)}, cache

    def decode(params, cache, state, key, sampling):
        with activation_sharding(mesh, LOGICAL_RULES):
            logits_VxB, cache = model.apply({"params": params}, state["token"][:, None], cache=cache,
                                            cache_index=state["index"], vocab_major=True)
        token_B = sample_vocab_major(logits_VxB, key, state["step"], sampling, greedy)
        return {"token": token_B, "index": state["index"] + 1, "step": state["step"] + 1}, cache

    return prefill, decode


def chunked(decode, chunk: int):
    """decode_chunk(params, cache, state, key, sampling) -> (state, cache, tokens_KxB), pure: `chunk` (K) calls of
    decode in a lax.scan, the token each step sampled in order. Each step samples with its own step number, so the
    tokens equal those of K single steps."""
    def decode_chunk(params, cache, state, key, sampling):
        def step(carry, _):
            state, cache = decode(params, carry[1], carry[0], key, sampling)
            return (state, cache), state["token"]

        (state, cache), tokens_KxB = jax.lax.scan(step, (state, cache), length=chunk)
        return state, cache, tokens_KxB

    return decode_chunk


def param_shardings(model, params, mesh: Mesh):
    """The params' shardings from their logical names (replicated if the tree differs from the model's own)."""
    boxed = abstract_params(model)
    if jax.tree.structure(nn.unbox(boxed)) != jax.tree.structure(params):
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
    return logical_shardings(boxed, mesh)


def cache_shardings(cfg, batch: int, S: int, mesh: Mesh):
    """The KV cache's shardings from its logical names (models.cache.CACHE_AXES)."""
    leaf = nn.LogicallyPartitioned(jax.ShapeDtypeStruct(cache_shape(cfg, batch, S), jnp.dtype(cfg.dtype)),
                                   names=CACHE_AXES)
    return logical_shardings({f"layer_{i}": {"k": leaf, "v": leaf} for i in range(cfg.num_layers)}, mesh)


def _spec(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def compiled_steps(model, params, mesh: Mesh, B: int, prompt_bucket: int, S: int, greedy: bool,
                   chunk: int | None = None):
    """(prefill, decode, the params' shardings, seconds spent compiling now): compiled once per model, mesh, params
    shapes, batch, prompt bucket, cache length, mode and chunk, then taken from _COMPILED. chunk None: decode is
    make_steps' single step; an int K: decode is chunked(decode, K), which also returns the K x B tokens."""
    signature = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(params))
    key = (model, mesh, B, prompt_bucket, S, greedy, chunk, jax.tree.structure(params), signature)
    if key in _COMPILED:
        return (*_COMPILED[key], 0.0)
    start = time.perf_counter()
    rep = NamedSharding(mesh, P())
    p_shardings, c_shardings = param_shardings(model, params, mesh), cache_shardings(model.cfg, B, S, mesh)
    params_spec = jax.tree.map(lambda x, s: _spec(x.shape, x.dtype, s), params, p_shardings)
    cache_spec = jax.tree.map(lambda s: _spec(cache_shape(model.cfg, B, S), jnp.dtype(model.cfg.dtype), s),
                              c_shardings)
    state_spec = {"token": _spec((B,), jnp.int32, rep), "index": _spec((B,), jnp.int32, rep),
                  "step": _spec((), jnp.int32, rep)}
    key_spec = _spec((), jax.random.key(0).dtype, rep)
    sampling_spec = {"temperature": _spec((), jnp.float32, rep), "top_k": _spec((), jnp.int32, rep),
                     "top_p": _spec((), jnp.float32, rep)}
    out_shardings = (jax.tree.map(lambda x: x.sharding, state_spec), c_shardings)
    prefill_fn, decode_fn = make_steps(model, S, greedy, mesh)
    prefill = jax.jit(prefill_fn, out_shardings=out_shardings).lower(
        params_spec, _spec((B, prompt_bucket), jnp.int32, rep), _spec((B,), jnp.int32, rep), key_spec,
        sampling_spec).compile()
    if chunk is not None:
        decode_fn, out_shardings = chunked(decode_fn, chunk), (*out_shardings, rep)
    decode = jax.jit(decode_fn, donate_argnums=(1,), out_shardings=out_shardings).lower(
        params_spec, cache_spec, state_spec, key_spec, sampling_spec).compile()
    while len(_COMPILED) >= MAX_COMPILED:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = (prefill, decode, p_shardings)
    return prefill, decode, p_shardings, time.perf_counter() - start


# ---------------------------------------------------------------- host side: checks, shapes, rows


def single_device_mesh() -> Mesh:
    """The (1, 1, 1) mesh of the first device: generation without a mesh runs the same code."""
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def steps_run(max_new_tokens: int, chunk: int) -> int:
    """Decode steps generate runs: the max_new_tokens - 1 after prefill's token, the last chunk in full."""
    return -(-(max_new_tokens - 1) // chunk) * chunk


def fitting_chunk(cfg, longest: int, max_new_tokens: int, chunk: int) -> int:
    """The decode chunk generate runs: at most `chunk` and the decode steps, and short enough that every step run
    (the discarded ones of the last chunk too) writes within the model's positions."""
    K = max(1, min(chunk, max_new_tokens - 1))
    while K > 1 and longest + steps_run(max_new_tokens, K) > cfg.max_position:
        K -= 1
    return K


def shapes(cfg, longest: int, max_new_tokens: int, chunk: int = 1) -> tuple[int, int]:
    """(prompt bucket, cache length): the padded prompt, and slots for it and every decode write (steps_run with this
    chunk), as buckets within the model's positions."""
    prompt_bucket = min(bucket(longest), cfg.max_position)
    slots = longest + max(max_new_tokens, steps_run(max_new_tokens, chunk))
    return prompt_bucket, min(bucket(max(prompt_bucket, slots)), cfg.max_position)


def check_request(model, prompts_ids, max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """A JaxfoundError naming the first argument or prompt that generation cannot serve."""
    cfg = model.cfg
    if cfg.arch not in ("gpt", "llama") or model.head != "lm":
        raise JaxfoundError(f"generation needs a decoder with an LM head (arch 'gpt' or 'llama', head 'lm'); got arch "
                            f"{cfg.arch!r} with head {model.head!r}")
    if not prompts_ids:
        raise JaxfoundError("no prompts: give at least one list of token ids")
    if max_new_tokens < 1:
        raise JaxfoundError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise JaxfoundError(f"temperature must be >= 0 (0: greedy), top_k >= 0 (0: off) and 0 < top_p <= 1; got "
                            f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
    for i, ids in enumerate(prompts_ids):
        if len(ids) == 0:
            raise JaxfoundError(f"prompt {i} is empty: give at least one token (e.g. the tokenizer's BOS)")
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise JaxfoundError(f"prompt {i} holds token id {min(ids) if min(ids) < 0 else max(ids)}; valid ids are "
                                f"0 .. {cfg.vocab_size - 1} (the model's vocab_size)")
        if len(ids) + max_new_tokens > cfg.max_position:
            raise JaxfoundError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                                f"the model's {cfg.max_position} positions (max_position): shorten the prompt or "
                                "lower max_new_tokens")


@dataclass
class TextRow:
    """One sequence's new tokens, text and stream position on the host (generate's rows, the engine's requests)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    streamed: str = ""  # the text handed out so far
    finish_reason: str | None = None


def held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Characters at the end of text not to stream yet: an incomplete UTF-8 character, or a stop string's start."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def advance(row: TextRow, token: int, max_new_tokens: int, stop_ids: frozenset, stop_strings, tokenizer,
            follow_text: bool = True) -> str:
    """Append token to an unfinished row, decide whether it ends the row ('stop' or 'length'), and return the new
    text that may be streamed (stop token and stop strings cut off; held back while it may be a stop's start).
    follow_text False (no tokenizer, or nothing streams and no stop strings): tokens only, text stays empty."""
    row.tokens.append(token)
    if token in stop_ids:
        row.finish_reason = "stop"
    elif len(row.tokens) >= max_new_tokens:
        row.finish_reason = "length"
    if tokenizer is None or not follow_text:
        return ""
    text = _decode(tokenizer, row.tokens[:-1] if token in stop_ids else row.tokens)
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    if cuts:
        text, row.finish_reason = text[:min(cuts)], "stop"
    row.text = text
    end = len(text) if row.finish_reason else len(text) - held_back(text, stop_strings)
    piece = text[len(row.streamed):end] if text.startswith(row.streamed) else ""  # else wait until it does
    row.streamed += piece
    return piece


def _consume(rows: list[TextRow], tokens_KxB: np.ndarray, max_new_tokens: int, stop_ids: frozenset, stop_strings,
             tokenizer, on_token) -> None:
    """advance every unfinished row by its new token of each step in order; stream the pieces."""
    for tokens_B in tokens_KxB:
        for b, row in enumerate(rows):
            if row.finish_reason:
                continue
            token = int(tokens_B[b])
            piece = advance(row, token, max_new_tokens, stop_ids, stop_strings, tokenizer,
                            follow_text=bool(on_token or stop_strings))
            if on_token:
                on_token(b, token, piece)


def _with_tokens(decode):
    """A single decode step in the chunked form: (state, cache, its tokens)."""
    def call(*args):
        state, cache = decode(*args)
        return state, cache, state["token"]

    return call


# ---------------------------------------------------------------- the library API


_PLACED: dict = {}  # id(params) -> (params, shardings, placed): the last params placed, reused while alive
_DECODING: dict = {}  # id(params) -> (params, mode, their decoding form): int8 weights are packed once, not per call


def decoding_params(model, params):
    """params in the form the decode steps read: int8 layers packed once for the native kernel (Llama: q / k / v and
    gate / up fused first; quant.packed.for_decoding), the last params given kept so repeated calls reuse them."""
    hit = _DECODING.get(id(params))
    if hit is not None and hit[0] is params and hit[1] == model.cfg.quant:
        return hit[2]
    ready = for_decoding(params, model.cfg.quant, fuse=model.cfg.arch == "llama")
    _DECODING.clear()
    _DECODING[id(params)] = (params, model.cfg.quant, ready)
    return ready


def _place(tree, shardings):
    """tree on its shardings; the params of the previous call are not placed again (that costs ~30 ms per call for
    a 270-array model even when nothing moves)."""
    hit = _PLACED.get(id(tree))
    if hit is not None and hit[0] is tree and hit[1] is shardings:
        return hit[2]
    placed = jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)
    _PLACED.clear()
    _PLACED[id(tree)] = (tree, shardings, placed)
    return placed


def decode_plan(cfg, longest: int, max_new_tokens: int, decode_chunk: int | None) -> tuple[int, int, int | None]:
    """(prompt bucket, cache length, chunk for compiled_steps: None for one step per call) of a generate call."""
    if decode_chunk is not None and decode_chunk < 1:
        raise JaxfoundError(f"decode_chunk must be >= 1 (1: one decode step per call), got {decode_chunk}")
    K = fitting_chunk(cfg, longest, max_new_tokens, DECODE_CHUNK if decode_chunk is None else decode_chunk)
    return (*shapes(cfg, longest, max_new_tokens, K), None if K == 1 else K)


def warmup(model, params, batch: int, prompt_len: int, max_new_tokens: int, *, greedy: bool = True,
           mesh: Mesh | None = None, decode_chunk: int | None = None) -> float:
    """Compile the steps generate will use for this batch size, prompt length, max_new_tokens and decode_chunk; the
    seconds it took (0 if done)."""
    prompt_bucket, S, chunk = decode_plan(model.cfg, prompt_len, max_new_tokens, decode_chunk)
    params = decoding_params(model, params)
    return compiled_steps(model, params, mesh or single_device_mesh(), batch, prompt_bucket, S, greedy, chunk)[3]


def generate(model, params, prompts_ids: list[list[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, key=None, stop_token_ids: Sequence[int] = (),
             stop_strings: Sequence[str] = (), tokenizer=None,
             on_token: Callable[[int, int, str], None] | None = None, mesh: Mesh | None = None,
             decode_chunk: int | None = None) -> GenerationResult:
    """Continue each prompt by up to max_new_tokens tokens: greedy when temperature == 0, else sampled.

    key: a jax PRNG key for sampling (default key(0)); the same key gives the same tokens. stop_token_ids end a row
    (the token is returned, not put in the text); stop_strings are looked for in the decoded text (needs tokenizer),
    which is cut before them. on_token(row, token_id, text_piece) is called for every returned token in order; the
    pieces of a row add up to its text. mesh: params and cache are sharded by their logical names. decode_chunk:
    decode steps per device call (default DECODE_CHUNK; 1: one call per token; shortened to the steps needed and to
    the model's positions); the tokens do not depend on it. The params placed by one call are reused by the next
    call given the same dict: treat params as immutable (JAX style).
    """
    cfg = model.cfg
    check_request(model, prompts_ids, max_new_tokens, temperature, top_k, top_p)
    if stop_strings and (tokenizer is None or not all(stop_strings)):
        raise JaxfoundError(f"stop_strings {list(stop_strings)}: each must be non-empty, and they need a tokenizer "
                            "(they are looked for in the decoded text)")
    mesh = mesh or single_device_mesh()
    B, longest = len(prompts_ids), max(len(ids) for ids in prompts_ids)
    prompt_bucket, S, chunk = decode_plan(cfg, longest, max_new_tokens, decode_chunk)
    greedy = temperature == 0.0
    params = decoding_params(model, params)
    prefill, decode, p_shardings, compile_seconds = compiled_steps(model, params, mesh, B, prompt_bucket, S, greedy,
                                                                   chunk)
    decode = _with_tokens(decode) if chunk is None else decode

    start = time.perf_counter()
    rep = NamedSharding(mesh, P())
    params = _place(params, p_shardings)
    ids_BxP = np.zeros((B, prompt_bucket), np.int32)
    for b, ids in enumerate(prompts_ids):
        ids_BxP[b, :len(ids)] = ids
    key = jax.random.key(0) if key is None else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    sampling = {"temperature": np.float32(max(temperature, 1e-6)), "top_k": np.int32(top_k),
                "top_p": np.float32(top_p)}
    key, sampling = jax.device_put((key, sampling), rep)
    state, cache = prefill(params, jax.device_put(ids_BxP, rep),
                           jax.device_put(np.array([len(p) for p in prompts_ids], np.int32), rep), key, sampling)

    rows, stop_ids = [TextRow() for _ in range(B)], frozenset(int(t) for t in stop_token_ids)
    pending, steps_dispatched, first_token_at = state["token"], 0, None  # prefill's tokens, then each call's K x B
    while not all(r.finish_reason for r in rows):
        following = None
        if steps_dispatched < max_new_tokens - 1:  # dispatch chunk c + 1 before reading the tokens of chunk c
            state, cache, following = decode(params, cache, state, key, sampling)
            steps_dispatched += chunk or 1
        _consume(rows, np.asarray(pending).reshape(-1, B), max_new_tokens, stop_ids, stop_strings, tokenizer,
                 on_token)
        first_token_at = first_token_at or time.perf_counter()
        pending = following
    end = time.perf_counter()

    texts = None
    if tokenizer is not None:  # rows followed on the host already hold their text
        texts = [r.text if on_token or stop_strings else
                 _decode(tokenizer, r.tokens[:-1] if r.tokens[-1] in stop_ids else r.tokens) for r in rows]
    return GenerationResult(
        tokens=[r.tokens for r in rows], finish_reasons=[r.finish_reason for r in rows], texts=texts,
        prompt_tokens=[len(p) for p in prompts_ids], compile_seconds=compile_seconds,
        prefill_seconds=first_token_at - start, decode_seconds=end - first_token_at,
        time_to_first_token=first_token_at - start)


def encode_prompts(tokenizer, prompts: list[str], chat: bool = False) -> list[list[int]]:
    """Token ids of text prompts: plain (BOS only where the tokenizer adds one) or through the chat template as one
    user turn with the assistant's turn opened (add_generation_prompt)."""
    if not chat:
        return [list(tokenizer(p)["input_ids"]) for p in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise JaxfoundError("chat=True but the tokenizer has no chat template (tokenizer_config.json "
                            "'chat_template'); generate without chat, or use a chat model's tokenizer")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]  # the template holds the BOS


def generate_text(model, params, tokenizer, prompts: list[str], chat: bool = False, *,
                  stop_token_ids: Sequence[int] | None = None, **options) -> GenerationResult:
    """generate for text prompts (see encode_prompts); stops at the tokenizer's EOS unless stop_token_ids is given."""
    if stop_token_ids is None:
        stop_token_ids = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    return generate(model, params, encode_prompts(tokenizer, prompts, chat), stop_token_ids=stop_token_ids,
                    tokenizer=tokenizer, **options)


__all__ = ["DECODE_CHUNK", "GenerationResult", "TextRow", "advance", "bucket", "cache_shardings", "check_request",
           "chunked", "compiled_steps", "decode_plan", "decoding_params", "encode_prompts", "filter_top_k_top_p",
           "fitting_chunk", "generate", "generate_text", "held_back", "make_steps", "param_shardings", "sample",
           "sample_vocab_major", "shapes", "single_device_mesh", "steps_run", "warmup"]
