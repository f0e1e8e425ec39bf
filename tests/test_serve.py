"""`jaxfound serve` on loopback, driven by the official openai client and plain HTTP: answers equal `jaxfound
generate` / `jaxfound predict`, bad input gets its status and a JSON error naming the field, overload gets 503 while
requests in flight finish, a client that leaves frees its slot, SIGTERM drains and exits 0. Every server is stopped."""

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import hypothesis as hyp
import pytest
from hypothesis import settings
from hypothesis import strategies as st

from jaxfound.app import evaluate
from jaxfound.app import generate as generate_app
from jaxfound.app.quantize import quantize_run
from jaxfound.app.serve import Background, ServeOptions, Server, open_servable
from tests.test_finetune import tiny_bert_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "def main():", "Hello"]
QUESTIONS = ["What is 2 + 2?", "Name a colour.", "Why is the sky blue?", "Say hi."]
IOB = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
TEXTS = ["John Smith lives in Paris today", "the Google office in Berlin is big", "nobody came here"]


@pytest.fixture(scope="module")
def chat_dir(smollm2_tokenizer, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and chat template, as a transformers dir."""
    torch.manual_seed(0)
    tok = smollm2_tokenizer
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("tiny_chat")
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def decoder(chat_dir):
    """(server, url): 4 slots, 128 tokens per request, running for the module."""
    run, kind = open_servable(chat_dir)
    server = Server(run, kind, ServeOptions(max_batch=4, max_len=128, max_queue=64, model_name="tiny"),
                    progress=lambda line: None)
    server.compile()
    with Background(server) as url:
        yield server, url


def client(url, key="unused"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def reference(chat_dir, prompt, chat=False, max_new_tokens=24, **options):
    return generate_app.generate(chat_dir, [prompt], chat=chat, max_new_tokens=max_new_tokens, **options)


# ---------------------------------------------------------------- decoders: answers


def test_completions_equal_jaxfound_generate_with_usage(decoder, chat_dir, smollm2_tokenizer):
    server, url = decoder
    for prompt in PROMPTS:
        out = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
        ref = reference(chat_dir, prompt)
        assert out.choices[0].text == ref.texts[0]
        assert out.choices[0].finish_reason == ref.finish_reasons[0]
        assert out.usage.prompt_tokens == len(smollm2_tokenizer(prompt)["input_ids"])
        assert out.usage.completion_tokens == len(ref.tokens[0])
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_streamed_and_not_equals_jaxfound_generate_chat(decoder, chat_dir):
    server, url = decoder
    for question in QUESTIONS[:2]:
        ref = reference(chat_dir, question, chat=True, max_new_tokens=20)
        messages = [{"role": "user", "content": question}]
        whole = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
        assert whole.choices[0].message.role == "assistant"
        assert whole.choices[0].message.content == ref.texts[0]
        chunks = list(client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == ref.texts[0]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reasons[0]
        assert chunks[-1].usage.completion_tokens == len(ref.tokens[0])


def test_stop_strings_and_seeds_behave_as_in_generate(decoder, chat_dir):
    server, url = decoder
    free = reference(chat_dir, PROMPTS[0], max_new_tokens=24).texts[0]
    stop = free.split()[2]  # a word the greedy text holds
    out = client(url).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop])
    assert out.choices[0].text == reference(chat_dir, PROMPTS[0], stop=[stop]).texts[0]
    assert out.choices[0].text == free[:free.index(stop)] and out.choices[0].finish_reason == "stop"
    sampled = [client(url).completions.create(model="tiny", prompt="Hello", max_tokens=16, temperature=1.0,
                                              seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] == reference(chat_dir, "Hello", max_new_tokens=16, temperature=1.0,
                                                 seed=7).texts[0]
    assert sampled[2] != sampled[0]


def test_32_concurrent_streamed_requests_all_finish_with_the_right_text(decoder, chat_dir):
    server, url = decoder
    expected = {q: reference(chat_dir, q, chat=True, max_new_tokens=16).texts[0] for q in QUESTIONS}

    async def one(api, question):
        stream = await api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                                   max_tokens=16, temperature=0, stream=True)
        return question, "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        return await asyncio.wait_for(asyncio.gather(*(one(api, QUESTIONS[i % 4]) for i in range(32))), 300)

    results = asyncio.run(main())
    assert len(results) == 32
    assert all(text == expected[q] for q, text in results)
    assert server.backend.active == 0


# ---------------------------------------------------------------- decoders: bad input, load, clients that leave


BAD = [  # (path, raw body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b'{"prompt": 5}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": "ten"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": 7}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "n": 2}', 400, "n"),
    ("/v1/completions", b'{"prompt": "hi", "stop": [1]}', 400, "stop"),
    ("/v1/completions", b'{"prompt": "hi", "logprobs": 3}', 400, "logprobs"),
    ("/v1/completions", b'{"prompt": [1, 99999999]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 500}', 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "word " * 200}).encode(), 413, "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "model": "gpt-5"}', 404, "model"),
    ("/v1/completions", b'{"prompt": "' + b"a" * (9 << 20) + b'"}', 413, None),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "messages[0].role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 3}]}', 400, "messages[0].content"),
    ("/v1/ner", b'{"input": "x"}', 404, None),
    ("/v1/nothing", b"{}", 404, None),
]


@pytest.mark.parametrize("path,raw,status,param", BAD, ids=[f"{p}-{s}-{i}" for i, (p, _, s, _) in enumerate(BAD)])
def test_bad_input_gets_its_status_and_a_json_error_naming_the_field(decoder, path, raw, status, param):
    server, url = decoder
    r = httpx.post(url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["param"] == param
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"  # still serving


def test_the_openai_client_sees_the_errors_as_its_own_exceptions(decoder):
    server, url = decoder
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client(url).completions.create(model="other", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(url).completions.create(model="tiny", prompt="hi", max_tokens=100000)


def test_one_failing_request_does_not_stop_the_server(decoder, monkeypatch):
    server, url = decoder
    monkeypatch.setattr(server.tokenizer, "apply_chat_template", lambda *a, **k: 1 / 0)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, timeout=60)
    assert r.status_code == 500 and "ZeroDivisionError" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert client(url).completions.create(model="tiny", prompt="hi", max_tokens=3).choices[0].text is not None


def _stream_until_first_chunk(url, body, started: threading.Event, results: list):
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        lines = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                started.set()
                lines.append(json.loads(line[6:]))
        results.append((r.status_code, lines))


def test_overload_gets_503_with_retry_after_while_requests_in_flight_finish(decoder):
    server, url = decoder
    server.backend.on_step = lambda kind, size, seconds: time.sleep(0.01)  # steps slow enough to overlap
    results, threads = [], []
    try:
        for i in range(4):  # all four slots busy
            started = threading.Event()
            t = threading.Thread(target=_stream_until_first_chunk, args=(
                url, {"prompt": PROMPTS[i], "max_tokens": 60, "temperature": 0}, started, results))
            t.start()
            threads.append(t)
            assert started.wait(60)
        server.backend.max_queue = 0  # nothing may wait: the queue is full
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "retry later" in r.json()["error"]["message"]
    finally:
        server.backend.max_queue = 64
        for t in threads:
            t.join(120)
        server.backend.on_step = server.metrics.on_step
    assert len(results) == 4
    assert all(status == 200 and chunks[-1]["choices"][0]["finish_reason"] == "length" for status, chunks in results)


def test_a_client_that_disconnects_frees_its_slot(decoder):
    server, url = decoder
    seen = []
    submit = server.backend.submit
    server.backend.submit = lambda r: seen.append(r) or submit(r)
    server.backend.on_step = lambda kind, size, seconds: time.sleep(0.01)
    try:
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "Once", "max_tokens": 100, "temperature": 0, "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data: {"))
        deadline = time.monotonic() + 30
        while (server.backend.active or not seen[0].finished) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen[0].row.finish_reason == "cancelled" and len(seen[0].row.tokens) < 100
        assert server.backend.active == 0
    finally:
        server.backend.submit = submit
        server.backend.on_step = server.metrics.on_step


def test_api_key_is_required_when_set(decoder):
    server, url = decoder
    server.options = dataclasses.replace(server.options, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        assert [m.id for m in client(url, key="s3cret").models.list()] == ["tiny"]
        assert httpx.get(url + "/health", timeout=10).status_code == 200  # probes need no key
    finally:
        server.options = dataclasses.replace(server.options, api_key=None)


def test_metrics_count_requests_and_tokens_in_prometheus_text(decoder):
    server, url = decoder

    def sample(name, **labels):
        text = httpx.get(url + "/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    before_requests = sample("jaxfound_requests_total", endpoint="completions", status="200")
    before_tokens = sample("jaxfound_tokens_total", kind="generation")
    outs = [client(url).completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0) for p in PROMPTS]
    assert sample("jaxfound_requests_total", endpoint="completions", status="200") == before_requests + 4
    assert sample("jaxfound_tokens_total", kind="generation") == before_tokens + sum(
        o.usage.completion_tokens for o in outs)
    assert sample("jaxfound_batch_size_count", step="decode") > 0
    assert sample("jaxfound_queue_depth") == 0


# ---------------------------------------------------------------- encoders


def _tiny_bert(path, cls_name, labels):
    return tiny_bert_dir(path, cls_name, labels, initializer_range=0.5)


@pytest.fixture(scope="module")
def ner_dirs(tmp_path_factory):
    """A tiny tagger with CoNLL's IOB labels (transformers dir) and its W8A8 copy."""
    root = tmp_path_factory.mktemp("ner_serve")
    base = _tiny_bert(root / "fp32", "BertForTokenClassification", IOB)
    quantize_run(base, "w8a8", root / "w8a8")
    return base, root / "w8a8"


def _serve_encoder(path, **options):
    run, kind = open_servable(path)
    server = Server(run, kind, ServeOptions(max_batch=8, **options), progress=lambda line: None)
    server.compile()
    return server


@pytest.mark.parametrize("which", [0, 1], ids=["fp32", "w8a8"])
def test_ner_endpoint_answers_what_predict_prints_under_concurrency(ner_dirs, which):
    path = ner_dirs[which]
    expected = evaluate.predict(path, TEXTS)
    for row in expected:
        row.pop("tags")
    assert any(row["entities"] for row in expected)  # the random tagger does find some
    with Background(_serve_encoder(path)) as url:
        single = httpx.post(url + "/v1/ner", json={"input": TEXTS[0]}, timeout=60).json()
        assert single["data"] == expected[:1]

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                return await asyncio.gather(*(http.post("/v1/ner", json={"input": TEXTS[i % 3:i % 3 + 1]})
                                              for i in range(24)))

        answers = asyncio.run(main())
        assert all(a.status_code == 200 and a.json()["data"] == [expected[i % 3]] for i, a in enumerate(answers))
        r = httpx.post(url + "/v1/ner", json={"input": ["fine", "  "]}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]"
        r = httpx.post(url + "/v1/classify", json={"input": "x"}, timeout=60)
        assert r.status_code == 404 and "/v1/ner" in r.json()["error"]["message"]


def test_classify_endpoint_answers_what_predict_prints(tmp_path):
    path = _tiny_bert(tmp_path / "cls", "BertForSequenceClassification", ["negative", "neutral", "positive"])
    expected = evaluate.predict(path, TEXTS)
    with Background(_serve_encoder(path)) as url:
        r = httpx.post(url + "/v1/classify", json={"input": TEXTS}, timeout=60)
        assert r.status_code == 200 and r.json()["data"] == expected
        assert httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=60).status_code == 404


# ---------------------------------------------------------------- the CLI: start, SIGTERM during traffic


def test_cli_serve_drains_in_flight_requests_on_sigterm_and_exits_0(chat_dir, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("k3y\n")
    proc = subprocess.Popen([sys.executable, "-m", "jaxfound.cli", "serve", "--run", str(chat_dir), "--port", "0",
                             "--max-batch", "1", "--max-len", "128", "--api-key-file", str(key_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "XLA_FLAGS": ""})
    try:
        lines, url = [], None
        deadline = time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "serving" in line:
                url = line.split(" on ")[1].split()[0]
        assert url, "".join(lines)
        api = client(url, key="k3y")
        results, threads = {}, []
        for i in range(3):  # one slot: one decodes, two wait in the queue when SIGTERM comes
            def go(i=i):
                out = api.completions.create(model=chat_dir.name, prompt=PROMPTS[i], max_tokens=100, temperature=0)
                results[i] = (out.choices[0].finish_reason, out.usage.completion_tokens)
            threads.append(threading.Thread(target=go))
            threads[-1].start()
        deadline = time.monotonic() + 60
        while "jaxfound_active_slots 1.0" not in httpx.get(url + "/metrics", timeout=10).text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert proc.wait(120) == 0
        assert results == {i: ("length", 100) for i in range(3)}
        assert "in-flight requests finished" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


# ---------------------------------------------------------------- hostile bodies (property-based)

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=8)
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "n",
          "seed", "stream", "stream_options", "model", "logprobs", "echo"]
GOOD = {"prompt": st.sampled_from(["hi", "Once upon", ""]), "max_tokens": st.integers(-2, 200),
        "messages": st.just([{"role": "user", "content": "hi"}]), "model": st.sampled_from(["tiny", "x"])}
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6) | st.fixed_dictionaries(
    {}, optional={**{k: JSON_VALUES for k in FIELDS}, **GOOD})


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[hyp.HealthCheck.too_slow, hyp.HealthCheck.function_scoped_fixture])
@hyp.given(body=BODIES, chat=st.booleans())
def test_random_bodies_get_an_answer_or_a_4xx_json_error_never_a_5xx(decoder, body, chat):
    server, url = decoder
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = httpx.post(url + path, json=body, timeout=120)
    assert r.status_code in (200, 400, 404, 413), (body, r.status_code, r.text[:300])
    if r.status_code != 200:
        assert r.json()["error"]["message"]
    elif body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
