"""kdforge serve / chat on an ONNX Runtime GenAI folder (`kdforge export --to onnx` of a tiny random Llama):
the OpenAI app through FastAPI's TestClient (chat completion equal to transformers' greedy answer, streaming
equal to non-streaming, prompt log-probabilities, seeded sampling, 4xx on bad requests), one request at a
time, and the terminal chat."""

from __future__ import annotations

import io
import json
import threading

import pytest
import torch

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx_ir")

from fastapi.testclient import TestClient  # noqa: E402

from kdforge.data.chat import encode_prompt  # noqa: E402
from kdforge.runtime import ONNX_GENAI, SamplingParams  # noqa: E402
from kdforge.serve.api import create_app  # noqa: E402
from kdforge.serve.launch import default_model_name, load_engine  # noqa: E402
from tests.conftest import save_tiny  # noqa: E402

MODEL = "tiny-onnx"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    return save_tiny(tmp_path_factory.mktemp("onnx-serve-hf"), "llama", tokenizer)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, hf_dir):
    """The tiny Llama exported at fp32 (no round trip: tests/test_onnx.py checks that; ~20 s)."""
    from kdforge.export.onnx import export_onnx
    from kdforge.models.loading import load_model

    model, tok = load_model(str(hf_dir), device="cpu", dtype="float32")
    folder = tmp_path_factory.mktemp("onnx-serve") / "onnx-fp32"
    export_onnx(model, tok, str(hf_dir), folder, "fp32")
    return folder


@pytest.fixture(scope="module")
def engine(onnx_dir):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the ONNX runtime takes torch's thread count: one, on a shared 2-core machine
    eng = load_engine(str(onnx_dir))
    yield eng
    eng.shutdown()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, MODEL)) as c:
        yield c


def _greedy_reference(hf_dir, tokenizer, prompt: list[int], eos: list[int], n: int) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id)[0, len(prompt):]
    return tokenizer.decode(out, skip_special_tokens=True)


def _events(resp) -> list[dict]:
    lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_load_engine_picks_the_onnx_engine(engine, onnx_dir, client):
    assert engine.backend == ONNX_GENAI and engine.max_batch == 1
    assert engine.context_length == 512  # the tiny model's max_position_embeddings, from genai_config.json
    assert default_model_name(str(onnx_dir)) == "onnx-fp32"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["backend"] == ONNX_GENAI
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL]


def test_chat_completion_equals_transformers_greedy(client, engine, hf_dir, tokenizer):
    body = {"model": MODEL, "messages": CHAT, "temperature": 0, "max_tokens": 16}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    prompt = encode_prompt(engine.tokenizer, CHAT)
    assert out["usage"]["prompt_tokens"] == len(prompt)
    assert out["usage"]["completion_tokens"] >= 1 and choice["finish_reason"] in ("stop", "length")
    # fp32 ONNX computes the source's logits: greedy through ORT GenAI's generator = transformers' greedy
    assert choice["message"]["content"] == _greedy_reference(hf_dir, tokenizer, prompt, sorted(engine.eot_ids), 16)

    # streamed token by token through the same generator: the same text, one finish, the usage chunk last
    with client.stream("POST", "/v1/chat/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = _events(resp)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == choice["message"]["content"]
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finishes == [choice["finish_reason"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == out["usage"]
    assert sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content")) > 1  # several deltas


def test_completions_stream_logprobs_and_seeds(client):
    body = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 12, "ignore_eos": True}
    full = client.post("/v1/completions", json=body).json()
    assert full["usage"]["completion_tokens"] == 12 and full["choices"][0]["finish_reason"] == "length"
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        streamed = "".join(e["choices"][0]["text"] for e in _events(resp) if e["choices"])
    assert streamed == full["choices"][0]["text"]
    # echo with logprobs: the prompt's tokens scored by the plain onnxruntime session (all positions)
    echoed = client.post("/v1/completions", json={**body, "echo": True, "logprobs": 2, "max_tokens": 2}).json()
    lp = echoed["choices"][0]["logprobs"]
    assert echoed["choices"][0]["text"].startswith("Once upon a time")
    assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
    assert len(lp["tokens"]) == echoed["usage"]["prompt_tokens"] + 2
    # seeded sampling is reproducible (kdforge's sampler on ORT GenAI's logits)
    sampled = {"model": MODEL, "messages": CHAT, "temperature": 1.0, "top_p": 0.9, "max_tokens": 12, "seed": 1234}
    a = client.post("/v1/chat/completions", json=sampled).json()["choices"][0]["message"]["content"]
    b = client.post("/v1/chat/completions", json=sampled).json()["choices"][0]["message"]["content"]
    assert a == b


@pytest.mark.parametrize("body,status", [
    ({"temperature": 2.5}, (400, 422)),
    ({"max_tokens": 0}, (400, 422)),
    ({"messages": []}, (400, 422)),
    ({"model": "gpt-9"}, (404,)),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, (400,)),  # past the 512-token context
    ({"max_tokens": 10_000}, (400,)),
])
def test_bad_requests_are_4xx(client, body, status):
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    r = client.post("/v1/chat/completions", json=payload)
    assert r.status_code in status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_concurrent_requests_are_answered_one_at_a_time(engine, tokenizer):
    """max_batch 1: requests queue and run in turn; the answers are those each gets alone."""
    prompts = [tokenizer("word " * n)["input_ids"] for n in (1, 4, 9)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = ["".join(o.text for o in engine.submit(p, params)) for p in prompts]
    engine.stats.batch_sizes.clear()
    handles = [engine.submit(p, params) for p in prompts]  # all queued before the first finishes
    results: list[str] = [""] * len(handles)

    def read(i: int) -> None:
        results[i] = "".join(o.text for o in handles[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == alone
    assert set(engine.stats.batch_sizes) == {1} and engine.stats.max_active == 1


def test_cancel_and_device_refusal(engine, onnx_dir, tokenizer):
    from kdforge.config import ConfigError

    h = engine.submit(tokenizer("word word")["input_ids"], SamplingParams(max_tokens=400, temperature=0,
                                                                        ignore_eos=True))
    outs = []
    for o in h:
        outs.append(o)
        if len(outs) == 2:
            h.cancel()
    assert outs[-1].finish_reason == "cancelled" and outs[-1].completion_tokens < 400
    with pytest.raises(ConfigError, match="CPU"):
        load_engine(str(onnx_dir), device="cuda")


def test_terminal_chat_on_the_onnx_folder(engine):
    from kdforge.serve.chat_cli import run_chat

    lines = iter(["Hi there", "And again", "/exit"])
    out = io.StringIO()
    history = run_chat(engine, MODEL, system="Be brief.", temperature=0, max_tokens=6, read=lambda _: next(lines),
                       out=out)
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert out.getvalue().count("assistant> ") == 2
