"""kdforge serve: the OpenAI API (official client), the continuous-batching engine, robustness, schema fuzzing."""

from __future__ import annotations

import io
import socket
import sys
import threading
import time
import types
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, settings

from kdforge.data.chat import encode_prompt
from kdforge.runtime.sampling import SamplingParams, make_generator, sample_token
from kdforge.serve.api import create_app
from kdforge.serve.detokenize import REPLACEMENT, IncrementalDetokenizer, StopStringFilter
from kdforge.serve.engine import ContextLengthExceeded
from kdforge.serve.hf import TransformersEngine
from kdforge.serve.launch import load_engine, run_server

MODEL = "tiny"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And another one?"},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: a second OpenMP thread only adds contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(engine, **kw) -> tuple[str, object]:
    port = _free_port()
    server = run_server(engine, MODEL, port=port, in_thread=True, **kw)
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


def _stop(server) -> None:
    server.should_exit = True
    time.sleep(0.1)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    eng = load_engine(str(tiny_llama_dir), max_batch=8)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def base_url(engine):
    url, server = _start(engine)
    yield url
    _stop(server)


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _wait_idle(engine, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while engine.num_in_flight or engine.num_active:
        assert time.time() < deadline, "engine did not become idle"
        time.sleep(0.01)


@pytest.fixture
def slow_engine(engine, monkeypatch):
    """The same engine with every forward taking >= 20 ms, so requests stay in flight a while."""
    real = engine._forward

    def slow(*a, **kw):
        time.sleep(0.02)
        return real(*a, **kw)

    monkeypatch.setattr(engine, "_forward", slow)
    yield engine
    _wait_idle(engine)


# ---- the official openai client -------------------------------------------------------------------
def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(base_url + "/health").json()
    assert health["status"] == "ok" and health["backend"] == "transformers"


def test_chat_stream_equals_non_stream(client, engine):
    kw = dict(model=MODEL, messages=CHAT, temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    # The multi-turn history went through the model's chat template.
    assert full.usage.prompt_tokens == len(encode_prompt(engine.tokenizer, CHAT))
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    for include_usage in (False, True):
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks = list(client.chat.completions.create(stream=True, **kw, **extra))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == choice.message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [choice.finish_reason]  # exactly once, and the same as non-streamed
        assert chunks[0].choices[0].delta.role == "assistant"
        if include_usage:
            assert all(c.usage is None for c in chunks[:-1])
            assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
        else:
            assert all(c.usage is None for c in chunks)


def test_completions_stream_equals_non_stream(client):
    kw = dict(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=16)
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 16
    for include_usage in (False, True):
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks = list(client.completions.create(stream=True, **kw, **extra))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        usages = [c.usage for c in chunks if c.usage is not None]
        assert usages == ([full.usage] if include_usage else [])
        if include_usage:
            assert chunks[-1].usage == full.usage and chunks[-1].choices == []
    echoed = client.completions.create(echo=True, **kw)
    assert echoed.choices[0].text == "Once upon a time" + full.choices[0].text
    empty = client.completions.create(model=MODEL, prompt="", max_tokens=2)  # starts from BOS, as OpenAI does
    assert empty.usage.prompt_tokens == 1 and empty.usage.completion_tokens <= 2


def test_stop_string_cuts_text(client):
    kw = dict(model=MODEL, prompt="Hello", temperature=0, max_tokens=24)
    text = client.completions.create(**kw).choices[0].text
    assert len(text) >= 8
    stop = text[4:7]
    expected = text[: text.find(stop)]
    cut = client.completions.create(stop=[stop, "never-appears"], **kw)
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, messages=CHAT, temperature=1.0, top_p=0.9, max_tokens=16, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_concurrent_requests_share_decode_steps(client, engine):
    prompts = [f"Request {i}: " + "tell me a story " * (i + 1) for i in range(6)]

    def ask(p: str) -> str:
        r = client.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=32,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 32
        return r.choices[0].text

    serial = [ask(p) for p in prompts]
    engine.stats.batch_sizes.clear()
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(ask, prompts))
    assert concurrent == serial  # batching (left padding, shared steps) does not change greedy answers
    assert max(engine.stats.batch_sizes) > 1, engine.stats.batch_sizes


# ---- errors --------------------------------------------------------------------------------------
def _error(resp: httpx.Response, status: int | tuple[int, ...]) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert resp.status_code in statuses, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body,param", [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
])
def test_bad_parameters_are_400(base_url, body, param):
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    err = _error(httpx.post(base_url + "/v1/chat/completions", json=payload), (400, 422))
    assert err["type"] == "invalid_request_error" and err["param"].startswith(param)


def test_error_shapes(client, base_url):
    url = base_url + "/v1/chat/completions"
    _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    _error(httpx.post(url, content=b"hello", headers={"content-type": "text/plain"}), (400, 415))
    _error(httpx.post(url, json=[1, 2]), 400)
    err = _error(httpx.post(url, json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404)
    assert err["code"] == "model_not_found"
    _error(httpx.get(base_url + "/no/such/route"), 404)
    _error(httpx.post(base_url + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]}), 400)
    _error(httpx.post(base_url + "/v1/completions", json={"model": MODEL, "prompt": [10**9]}), 400)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 600}])
    assert e.value.code == "context_length_exceeded"
    # The prompt fits but prompt + max_tokens does not.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 500, max_tokens=100)
    assert e.value.code == "context_length_exceeded"


def test_api_key(engine, monkeypatch):
    url, server = _start(engine, api_key="sekret")
    try:
        _error(httpx.get(url + "/v1/models"), 401)
        err = _error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert err["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200  # health checks need no key
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.models.list().data[0].id == MODEL
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()
    finally:
        _stop(server)
    monkeypatch.setenv("KDFORGE_API_KEY", "from-env")
    url, server = _start(engine)
    try:
        _error(httpx.get(url + "/v1/models"), 401)
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    finally:
        _stop(server)


def test_over_capacity_is_429_with_retry_after(slow_engine):
    url, server = _start(slow_engine, max_in_flight=1)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()  # keep a reference: a collected iterator closes the connection
            next(lines)  # the first request is in flight
            second = httpx.post(url + "/v1/completions", json={**body, "stream": False})
            err = _error(second, (429, 503))
            assert int(second.headers["Retry-After"]) >= 1 and err["type"]
    finally:
        _stop(server)


def test_streaming_disconnect_cancels_generation(slow_engine, base_url):
    stats = slow_engine.stats
    cancelled = stats.cancelled
    body = {"model": MODEL, "prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        next(lines)
        next(lines)
    t = time.time()
    _wait_idle(slow_engine, timeout=5)
    assert stats.cancelled == cancelled + 1
    assert time.time() - t < 2.0  # 400 tokens at >= 20 ms a step would take 8 s


def test_non_streaming_disconnect_cancels_generation(slow_engine, base_url):
    cancelled = slow_engine.stats.cancelled
    body = {"model": MODEL, "prompt": "x", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(base_url + "/v1/completions", json=body, timeout=0.3)
    _wait_idle(slow_engine, timeout=5)
    assert slow_engine.stats.cancelled == cancelled + 1


def test_cancel_takes_effect_at_the_next_step(tiny_llama_dir, tokenizer):
    # Driven by hand (no thread): a cancelled sequence gets no further token after one step.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    eng = TransformersEngine(model, tokenizer, [2], max_batch=4)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    a = eng.submit(tokenizer("one")["input_ids"], params)
    b = eng.submit(tokenizer("two two")["input_ids"], params)
    eng._drain_inbox()
    eng._step()  # prefill both (one token each) and one shared decode step (a second token each)
    assert eng.num_active == 2 and eng.stats.batch_sizes[2] == 1
    a.cancel()
    tokens_before = eng._active[0].completion_tokens
    eng._step()
    assert eng.num_active == 1 and eng._active[0].handle is b
    assert eng.stats.cancelled == 1 and tokens_before == 2
    outs = list(a._queue.queue)
    assert outs[-1].finish_reason == "cancelled" and outs[-1].completion_tokens == tokens_before


def test_greedy_answers_equal_model_generate(tiny_model_dir, tokenizer):
    # Llama (tied embeddings) and Qwen2 (biases, untied), several prompt lengths decoded together.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    eng = TransformersEngine(model, tokenizer, [2], max_batch=4).start()
    try:
        prompts = [tokenizer("word " * n)["input_ids"] for n in (1, 5, 17)]
        params = SamplingParams(max_tokens=12, temperature=0)
        handles = [eng.submit(p, params) for p in prompts]
        for p, h in zip(prompts, handles):
            ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=2,
                                 pad_token_id=2)[0, len(p):]
            assert "".join(o.text for o in h) == tokenizer.decode(ref, skip_special_tokens=True)
    finally:
        eng.shutdown()


def test_engine_rejects_what_does_not_fit(engine):
    with pytest.raises(ContextLengthExceeded):
        engine.resolve_max_tokens(engine.context_length, None)
    with pytest.raises(ContextLengthExceeded):
        engine.resolve_max_tokens(10, engine.context_length)
    assert engine.resolve_max_tokens(10, None) == engine.context_length - 10


# ---- text: detokenization, stop strings, sampling ------------------------------------------------
def test_incremental_detokenizer_never_splits_characters(tokenizer):
    text = "你好，世界！今天天气很好。🙂🎉 naïve café — 日本語 👩‍💻 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert any(p == "" for p in pieces[:-1])  # some tokens were only part of a character and were held
    # Single tokens really do split characters here (else the test would prove nothing).
    assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids)


def test_stop_string_filter_holds_back_possible_starts():
    f = StopStringFilter(["END", "\n\n"])
    assert f.push("Hello E") == "Hello "  # "E" may start "END"
    assert f.push("Nx") == "ENx"  # it did not
    assert f.push(" wor\n") == " wor"
    assert f.push("\nmore") == "" and f.stopped
    g = StopStringFilter(["END"])
    assert g.push("abcEN") == "abc" and g.flush() == "EN"  # no stop completed: held text is output
    assert StopStringFilter([]).push("x") == "x"


def test_sampling_parameters():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    greedy = SamplingParams(max_tokens=1, temperature=0)
    assert sample_token(logits, greedy, make_generator(0)) == 1
    narrow = SamplingParams(max_tokens=1, temperature=1.5, top_p=0.01)  # only the top token survives
    assert {sample_token(logits, narrow, make_generator(s)) for s in range(20)} == {1}
    wide = SamplingParams(max_tokens=1, temperature=1.0, seed=7)
    draws = [sample_token(logits, wide, make_generator(s)) for s in range(200)]
    assert set(draws) >= {1, 2} and draws == [sample_token(logits, wide, make_generator(s)) for s in range(200)]
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)


# ---- terminal chat, UI, llama.cpp backend --------------------------------------------------------
def test_terminal_chat_keeps_history_and_resets(engine):
    lines = iter(["Hi there", "And again", "/reset", "Fresh start", "/exit"])
    out = io.StringIO()
    history = run_chat_quiet(engine, lambda _: next(lines), out)
    assert [m["role"] for m in history] == ["system", "user", "assistant"]  # /reset dropped the first two turns
    assert history[1]["content"] == "Fresh start"
    assert out.getvalue().count("assistant> ") == 3 and "(new conversation)" in out.getvalue()


def run_chat_quiet(engine, read, out):
    from kdforge.serve.chat_cli import run_chat

    return run_chat(engine, MODEL, system="Be brief.", temperature=0, max_tokens=8, read=read, out=out)


def test_ui_streams_with_history(engine):
    pytest.importorskip("gradio")
    from kdforge.serve.ui import build_ui, history_messages, respond_stream

    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Yo"}]}]
    msgs = history_messages(history, "sys", "Next?")
    assert msgs == [{"role": "system", "content": "sys"}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Next?"}]
    growing = list(respond_stream(engine, "Next?", history, "sys", 0.0, 12))
    assert growing and all(b.startswith(a) for a, b in zip(growing, growing[1:]))
    assert build_ui(engine, MODEL) is not None


class _FakeLlama:
    """Mimics llama-cpp-python's Llama (n_tokens, input_ids, scores, eval, reset) on an HF model."""

    def __init__(self, model, n_ctx: int = 512):
        self.model, self._n_ctx, self.n_tokens = model, n_ctx, 0
        self.input_ids = np.zeros(n_ctx, dtype=np.intc)
        self.scores = np.zeros((n_ctx, model.config.vocab_size), dtype=np.single)
        self.evaluated = 0

    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self.model.config.vocab_size

    def reset(self) -> None:
        self.n_tokens = 0

    @torch.inference_mode()
    def eval(self, tokens) -> None:
        self.input_ids[self.n_tokens:self.n_tokens + len(tokens)] = tokens
        self.n_tokens += len(tokens)
        self.evaluated += len(tokens)
        ids = torch.tensor(self.input_ids[: self.n_tokens], dtype=torch.long)[None]
        self.scores[: self.n_tokens] = self.model(ids).logits[0].numpy()


def test_llama_cpp_backend_plumbing(tiny_llama_dir, tokenizer, engine, monkeypatch):
    from transformers import AutoModelForCausalLM

    from kdforge.serve.llamacpp import LlamaCppEngine

    fake = _FakeLlama(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval())
    eng = LlamaCppEngine(fake, tokenizer, [2], read_logits=lambda: fake.scores[fake.n_tokens - 1]).start()
    try:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        first = encode_prompt(tokenizer, CHAT[:2])
        a = "".join(o.text for o in eng.submit(first, params))
        assert a == "".join(o.text for o in engine.submit(first, params))  # same answer as the HF engine
        evaluated = fake.evaluated
        second = first + tokenizer("more", add_special_tokens=False)["input_ids"]
        list(eng.submit(second, params))
        assert fake.evaluated - evaluated < len(first)  # the shared prefix was not evaluated again
    finally:
        eng.shutdown()
    # A missing llama-cpp-python gives a clear error, not an ImportError.
    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))
    from kdforge.models.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="llama-cpp-python"):
        LlamaCppEngine.from_gguf("x.gguf")


def test_llama_cpp_backend_real(tokenizer, monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp")  # noqa: F841 (optional extra: kdforge[llamacpp])
    import kdforge.serve.llamacpp as backend
    from kdforge.models.loading import embedded_gguf_path

    # The GGUF's tokenizer is the fixture's (converted from it); skip the slow GGUF tokenizer read.
    monkeypatch.setattr(backend, "load_tokenizer", lambda spec: tokenizer)
    eng = load_engine(str(embedded_gguf_path("smollm2-135m-instruct")), max_model_len=1024)
    try:
        assert eng.backend == "llama.cpp" and eng.context_length == 1024
        prompt = encode_prompt(eng.tokenizer, CHAT)
        outs = list(eng.submit(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
        assert outs[-1].completion_tokens == 8 and outs[-1].finish_reason == "length"
        # The same tokens as llama.cpp's own greedy loop: only the sampling moved to kdforge.
        own = []
        for token in eng.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            own.append(token)
            if len(own) == 8:
                break
        assert "".join(o.text for o in outs) == eng.tokenizer.decode(own, skip_special_tokens=True)
    finally:
        eng.shutdown()


def test_cli_registers_serving_commands():
    from kdforge.cli import build_parser

    args = build_parser().parse_args(["serve", "some/model", "--port", "9000", "--api-key", "k", "--ui"])
    assert (args.command, args.port, args.api_key, args.ui, args.host) == ("serve", 9000, "k", True, "127.0.0.1")
    assert build_parser().parse_args(["chat", "m"]).command == "chat"
    assert build_parser().parse_args(["app", "m"]).port == 7860


# ---- schema fuzzing ------------------------------------------------------------------------------
FUZZ_CALLS: Counter = Counter()


# The server's own schema, as /openapi.json serves it (routes do not touch the engine to build it).
fuzz_schema = schemathesis.openapi.from_dict(create_app(None, MODEL).openapi())


@pytest.fixture
def capped_url(engine, base_url):
    # Short answers keep 50 examples per endpoint fast; the cap is a server option (--max-tokens-limit).
    cap = engine.max_tokens_cap
    engine.max_tokens_cap = 4
    yield base_url
    engine.max_tokens_cap = cap


@fuzz_schema.parametrize()
@settings(max_examples=50, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_schema_fuzz_never_500(case, capped_url):
    from schemathesis.checks import not_a_server_error

    # Half the bodies name the served model, so fuzzing reaches tokenization and generation
    # instead of stopping at 404 model_not_found.
    if isinstance(case.body, dict) and zlib.crc32(repr(case.body).encode()) % 2:
        case.body["model"] = MODEL
    FUZZ_CALLS[f"{case.method} {case.path}"] += 1
    response = case.call_and_validate(base_url=capped_url, checks=[not_a_server_error])
    FUZZ_CALLS[f"{case.method} {case.path} {response.status_code}"] += 1


def test_schema_fuzz_covered_each_post_endpoint():
    for op in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert FUZZ_CALLS[op] >= 50, FUZZ_CALLS
        assert FUZZ_CALLS[f"{op} 200"] >= 5, FUZZ_CALLS  # fuzzing reached generation, not only validation


def test_client_thread_safety_smoke(engine):
    # Many handles from many threads at once: every one finishes, none is lost.
    params = SamplingParams(max_tokens=3, temperature=0)
    results: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        outs = list(engine.submit(engine.tokenizer(f"n{i}")["input_ids"], params))
        with lock:
            results.append(outs[-1].completion_tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 20 and all(1 <= r <= 3 for r in results)
