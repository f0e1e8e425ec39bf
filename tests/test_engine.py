"""The continuous-batching engine against generation.generate (itself checked against transformers): the same tokens
for every request whatever its neighbours, slots reused, queue bounded, cancelled requests leave their slot."""

import threading
import time

import jax
import numpy as np
import pytest

from jaxfound import generation
from jaxfound.engine import Engine, EngineClosed, EngineFull, Request
from jaxfound.errors import JaxfoundError
from jaxfound.interop.hf import from_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama (grouped-query attention, untied head): (model, params)."""
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0)
    out = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(out)
    return from_pretrained(out, head="lm")


@pytest.fixture(scope="module")
def engine(llama):
    """3 slots over at most 128 positions, compiled once and running for the module."""
    model, params = llama
    engine = Engine(model, params, None, slots=3, max_len=128, max_queue=64)
    engine.compile()
    engine.start()
    yield engine
    engine.stop(30)


def run_all(engine, requests, timeout=60.0):
    """Submit every request, wait until each is done; the finish reasons in order."""
    done = threading.Semaphore(0)
    reasons = {}
    for i, r in enumerate(requests):
        def on_event(kind, payload, i=i):
            if kind in ("done", "error"):
                reasons[i] = payload
                done.release()
        r.on_event = on_event
        engine.submit(r)
    for _ in requests:
        assert done.acquire(timeout=timeout), "a request did not finish in time"
    return [reasons[i] for i in range(len(requests))]


def test_every_request_gets_generates_greedy_tokens_whatever_its_neighbours(engine, llama):
    """8 requests of different lengths through 3 slots (queueing, slots reused, the cache resized on the way)."""
    model, params = llama
    rng = np.random.default_rng(0)
    lengths, budgets = [5, 17, 3, 40, 9, 70, 2, 33], [10, 30, 50, 20, 5, 50, 60, 90]
    prompts = [[int(t) for t in rng.integers(3, 101, size=n)] for n in lengths]
    requests = [Request(p, max_tokens=m) for p, m in zip(prompts, budgets)]
    assert run_all(engine, requests) == ["length"] * 8
    for p, m, r in zip(prompts, budgets, requests):
        reference = generation.generate(model, params, [p], max_new_tokens=m)
        assert r.row.tokens == reference.tokens[0]
    assert engine.active == 0 and engine.queue_depth == 0


def test_a_seeded_request_draws_what_generate_draws_with_that_key(engine, llama):
    model, params = llama
    requests = [Request([5, 6, 7], max_tokens=20, temperature=0.8, top_p=0.9, seed=3),
                Request([9, 8], max_tokens=12, temperature=1.3, top_k=5, seed=11),
                Request([4, 4, 4, 4], max_tokens=16)]  # a greedy neighbour in the same steps
    run_all(engine, requests)
    for r in requests:
        reference = generation.generate(model, params, [r.prompt_ids], max_new_tokens=r.max_tokens,
                                        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                        key=jax.random.key(r.seed))
        assert r.row.tokens == reference.tokens[0]
    again = Request([5, 6, 7], max_tokens=20, temperature=0.8, top_p=0.9, seed=4)
    run_all(engine, [again])
    assert again.row.tokens != requests[0].row.tokens  # another seed, another draw


def test_stop_token_ends_a_request_and_is_returned(engine, llama):
    model, params = llama
    free = Request([7, 3, 9], max_tokens=30)
    run_all(engine, [free])
    stop_at = free.row.tokens[4]
    stopped = Request([7, 3, 9], max_tokens=30, stop_token_ids=frozenset({stop_at}))
    assert run_all(engine, [stopped]) == ["stop"]
    assert stopped.row.tokens == free.row.tokens[:free.row.tokens.index(stop_at) + 1]


def test_a_cancelled_request_leaves_its_slot(engine, llama):
    model, params = llama
    engine.on_step = lambda kind, size, seconds: time.sleep(0.01)  # slow steps: cancel lands mid-generation
    try:
        long = Request([5, 5, 5], max_tokens=120)
        done = threading.Event()
        long.on_event = lambda kind, payload: done.set() if kind == "done" else None
        engine.submit(long)
        deadline = time.monotonic() + 30
        while not long.row.tokens and time.monotonic() < deadline:
            time.sleep(0.005)
        engine.cancel(long)
        assert done.wait(30)
        assert long.row.finish_reason == "cancelled" and len(long.row.tokens) < 120
        assert engine.active == 0
    finally:
        engine.on_step = lambda kind, size, seconds: None


def test_queue_is_bounded_and_a_stopped_engine_refuses(llama):
    model, params = llama
    engine = Engine(model, params, None, slots=1, max_len=32, max_queue=2)  # never started: requests only wait
    engine.submit(Request([1, 2], max_tokens=4))
    engine.submit(Request([1, 2], max_tokens=4))
    with pytest.raises(EngineFull, match="bound is 2"):
        engine.submit(Request([1, 2], max_tokens=4))
    engine.stop()
    with pytest.raises(EngineClosed):
        engine.submit(Request([1, 2], max_tokens=4))


def test_requests_the_engine_cannot_hold_are_refused_by_name(llama):
    model, params = llama
    engine = Engine(model, params, None, slots=1, max_len=32)
    with pytest.raises(JaxfoundError, match="over the 32"):
        engine.check(Request(list(range(3, 23)), max_tokens=20))
    with pytest.raises(JaxfoundError, match="token id 500"):
        engine.check(Request([1, 500], max_tokens=2))
    with pytest.raises(JaxfoundError, match="temperature"):
        engine.check(Request([1, 5], max_tokens=2, temperature=-1))
    with pytest.raises(JaxfoundError, match="stop strings need a tokenizer"):
        engine.check(Request([1, 5], max_tokens=2, stop=("x",)))


def test_a_w4_model_serves_the_tokens_generate_gives_it(llama):
    """4-bit weights (quant.int4, packed once for the native W4A8 kernel) through the engine's slots."""
    import dataclasses

    from jaxfound.models import build_model
    from jaxfound.quant.int4 import quantize_params

    model, params = llama
    qmodel = build_model(dataclasses.replace(model.cfg, quant="w4"), "lm")
    qparams = quantize_params(params, "w4")
    engine = Engine(qmodel, qparams, None, slots=2, max_len=64, max_queue=8)
    engine.compile()
    engine.start()
    try:
        rng = np.random.default_rng(1)
        prompts = [[int(t) for t in rng.integers(3, 101, size=n)] for n in (4, 11, 7)]
        requests = [Request(p, max_tokens=m) for p, m in zip(prompts, (9, 5, 12))]
        assert run_all(engine, requests) == ["length"] * 3
    finally:
        engine.stop(30)
    for p, r in zip(prompts, requests):
        assert r.row.tokens == generation.generate(qmodel, qparams, [p], max_new_tokens=len(r.row.tokens)).tokens[0]
