"""kdforge serve speaks vLLM's protocol: prompt_logprobs, token-id prompts, echo with logprobs (lm-eval's
loglikelihood requests), --max-logprobs, return_tokens_as_token_ids, /tokenize and /detokenize; its answers
have the shapes of recorded vLLM responses (tests/fixtures/vllm); lm-eval's local-completions model scores
a task against it as lm-eval's hf model does on the same weights (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import torch

from kdforge.data.chat import encode_prompt
from kdforge.serve.api import create_app
from kdforge.serve.detokenize import TokenPieces
from kdforge.serve.launch import load_engine

from . import test_serve
from .conftest import EMBEDDED
from .test_serve import _FakeLlama, _start, _stop

# One server per module on a tiny model, as in test_serve.py: its fixtures (assigned, not imported, so that
# the test arguments naming them are no redefinitions) and helpers, not copies.
base_url, engine, one_thread = test_serve.base_url, test_serve.engine, test_serve.one_thread

MODEL = "tiny"
FIXTURES = Path(__file__).parent / "fixtures"
USER = [{"role": "user", "content": "Name a colour."}]


def _post(url: str, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(url + path, json={"model": MODEL, **body}, timeout=60)


def _ok(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()


def _error(resp: httpx.Response, status: int = 400) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _reference(model, prompt: list[int]) -> torch.Tensor:
    """(L, V) fp32 log_softmax of the model's own logits, one unpadded forward."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)


# ---- prompt_logprobs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    """Llama (tied embeddings) and Qwen2 (biases, untied) teachers, each behind its own server."""
    eng = load_engine(str(tiny_model_dir), max_batch=4)
    url, server = _start(eng)
    yield url, eng
    _stop(server)
    eng.shutdown()


def test_prompt_logprobs_equal_the_models_log_softmax(tiny_server):
    url, eng = tiny_server
    tok = eng.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("Once upon a time there was", "Hi", "a b c d e f g h i j k l m n o p")]
    calls = []
    hook = eng.model.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    try:
        body = _ok(_post(url, {"prompt": prompts, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 5,
                               "logprobs": 3}))
    finally:
        hook.remove()
    assert calls == [1]  # three prompts scored, and their first tokens sampled, in one forward pass
    pieces = TokenPieces(tok)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"] == {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 3,
                             "total_tokens": sum(map(len, prompts)) + 3}
    for prompt, choice in zip(prompts, body["choices"]):
        ref = _reference(eng.model, prompt)  # (L, V)
        got = choice["prompt_logprobs"]
        assert len(got) == len(prompt) and got[0] is None
        for i in range(1, len(prompt)):
            row, actual = ref[i - 1], prompt[i]
            entry = got[i]
            keys = list(entry)
            assert keys[0] == str(actual)  # the prompt's own token first
            mine = entry[str(actual)]
            assert mine["logprob"] == pytest.approx(float(row[actual]), abs=1e-5)
            assert mine["rank"] == int((row >= row[actual]).sum())
            assert mine["decoded_token"] == pieces(actual)[0]
            values, ids = row.topk(5)
            assert set(entry) == {str(actual), *map(str, ids.tolist())}  # 5 entries, or 6 when actual is not top
            for r, (tid, value) in enumerate(zip(ids.tolist(), values.tolist()), start=1):
                assert entry[str(tid)]["logprob"] == pytest.approx(value, abs=1e-5)
                if tid != actual:
                    assert entry[str(tid)]["rank"] == r
        # The generated token: greedy from the last position's logits, with its log-probability.
        best = int(ref[-1].argmax())
        lp = choice["logprobs"]
        assert lp["tokens"] == [pieces(best)[0]] and lp["token_logprobs"][0] == pytest.approx(float(ref[-1, best]),
                                                                                             abs=1e-5)
        assert len(lp["top_logprobs"][0]) == 3 and max(lp["top_logprobs"][0].values()) == lp["token_logprobs"][0]
    assert eng.num_in_flight == 0  # every prompt's slot was given back


def test_long_answers_still_get_prompt_logprobs(base_url, engine, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    prompt = engine.tokenizer("Tell me a story about")["input_ids"]
    body = _ok(_post(base_url, {"prompt": prompt, "max_tokens": 6, "temperature": 0, "prompt_logprobs": 0,
                                "ignore_eos": True}))
    choice = body["choices"][0]
    ref = _reference(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), prompt)
    assert [list(e) for e in choice["prompt_logprobs"][1:]] == [[str(t)] for t in prompt[1:]]  # 0: no alternatives
    for i, entry in enumerate(choice["prompt_logprobs"][1:], start=1):
        assert entry[str(prompt[i])]["logprob"] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-5)
    plain = _ok(_post(base_url, {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}))
    assert choice["text"] == plain["choices"][0]["text"] and body["usage"]["completion_tokens"] == 6
    assert plain["choices"][0]["prompt_logprobs"] is None


# ---- token-id prompts, several prompts ------------------------------------------------------------------
def test_token_id_prompts(base_url, engine):
    tok = engine.tokenizer
    texts = ["Once upon a time", "The colour of the sky is"]
    ids = [tok(t)["input_ids"] for t in texts]
    kw = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    singles = [_ok(_post(base_url, {"prompt": t, **kw}))["choices"][0]["text"] for t in texts]
    assert [_ok(_post(base_url, {"prompt": i, **kw}))["choices"][0]["text"] for i in ids] == singles
    batch = _ok(_post(base_url, {"prompt": ids, **kw}))
    assert [c["text"] for c in batch["choices"]] == singles and [c["index"] for c in batch["choices"]] == [0, 1]
    assert batch["usage"]["prompt_tokens"] == sum(map(len, ids)) and batch["usage"]["completion_tokens"] == 10
    assert _ok(_post(base_url, {"prompt": texts[:1], **kw}))["choices"][0]["text"] == singles[0]
    # Several texts stay refused (as before): several prompts travel as token ids.
    assert "token-id lists" in _error(_post(base_url, {"prompt": texts, **kw}))["message"]
    echoed = _ok(_post(base_url, {"prompt": ids, "echo": True, **kw}))
    assert [c["text"] for c in echoed["choices"]] == [t + s for t, s in zip(texts, singles)]
    # Out-of-range ids, a negative id, a float, several prompts streamed: 400s naming the parameter.
    for bad in ([[1, 2], [10**9]], [[-1]], [[1.5]]):
        assert _error(_post(base_url, {"prompt": bad, "max_tokens": 1}))["param"].startswith("prompt")
    assert _error(_post(base_url, {"prompt": ids, "stream": True, "max_tokens": 1}))["param"] == "stream"


def test_more_prompts_than_max_in_flight_is_a_400(engine):
    url, server = _start(engine, max_in_flight=2)
    try:
        err = _error(_post(url, {"prompt": [[1], [2], [3]], "max_tokens": 1}))
        assert err["param"] == "prompt" and "at most 2" in err["message"]
        assert len(_ok(_post(url, {"prompt": [[1], [2]], "max_tokens": 1}))["choices"]) == 2
    finally:
        _stop(server)


# ---- echo + logprobs: lm-eval's loglikelihood requests ---------------------------------------------------
@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_is_lm_evals_loglikelihood(base_url, engine, tiny_llama_dir, max_tokens):
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from transformers import AutoModelForCausalLM

    tok = engine.tokenizer
    context, continuation = tok("The capital of France is")["input_ids"], tok(" Paris, of course")["input_ids"]
    prompt = context + continuation
    # lm-eval's payload (openai_completions.py _create_payload), with max_tokens 0 too (vLLM's score-only form).
    body = _ok(_post(base_url, {"prompt": [prompt], "temperature": 0, "max_tokens": max_tokens, "logprobs": 1,
                                "seed": 1234, "echo": True}))
    choice = body["choices"][0]
    lp = choice["logprobs"]
    n = len(prompt) + max_tokens
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and lp["text_offset"][0] == 0
    assert choice["text"].startswith(tok.decode(prompt)) and "".join(lp["tokens"][:len(prompt)]) == tok.decode(prompt)
    assert lp["text_offset"] == sorted(lp["text_offset"])
    assert body["usage"]["completion_tokens"] == max_tokens and choice["finish_reason"] == "length"
    assert engine.num_in_flight == 0
    ref = _reference(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), prompt)
    for i in range(1, len(prompt)):
        assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-5)
        top = lp["top_logprobs"][i]
        assert list(top)[0] == lp["tokens"][i] and len(top) <= 2  # the token itself, then the likeliest
        assert max(top.values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-5)
    # vLLM also returns them as prompt_logprobs (echo with logprobs scores the prompt with that count).
    assert [e[str(t)]["logprob"] for e, t in zip(choice["prompt_logprobs"][1:], prompt[1:])] == \
        lp["token_logprobs"][1:len(prompt)]
    # lm-eval's own parser reads the continuation's log-likelihood and greediness from the answer. Its
    # [ctxlen:-1] slice assumes one generated token (its max_tokens 1).
    if max_tokens == 1:
        [(loglik, greedy)] = LocalCompletionsAPI.parse_logprobs(body, ctxlens=[len(context)])
        want = sum(float(ref[i - 1, prompt[i]]) for i in range(len(context), len(prompt)))
        assert loglik == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(ref[i - 1].argmax()) == prompt[i] for i in range(len(context), len(prompt)))


def test_echo_logprobs_streamed(base_url, engine):
    prompt = "Once upon a time"
    kw = {"prompt": prompt, "echo": True, "logprobs": 2, "temperature": 0, "max_tokens": 4, "ignore_eos": True}
    whole = _ok(_post(base_url, kw))["choices"][0]
    with httpx.stream("POST", base_url + "/v1/completions", json={"model": MODEL, "stream": True, **kw},
                      timeout=60) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    first = events[0]["choices"][0]
    assert first["text"] == prompt and first["logprobs"]["token_logprobs"][0] is None
    assert "prompt_logprobs" not in first  # never streamed
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
    tokens = [t for e in events for t in (e["choices"][0]["logprobs"] or {}).get("tokens", [])]
    offsets = [t for e in events for t in (e["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert tokens == whole["logprobs"]["tokens"] and offsets == whole["logprobs"]["text_offset"]
    # max_tokens 0, streamed: the echo is the finish chunk.
    with httpx.stream("POST", base_url + "/v1/completions", timeout=60, json={
            "model": MODEL, "stream": True, **kw, "max_tokens": 0, "stream_options": {"include_usage": True}}) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) == 3
    only = json.loads(lines[0][6:])["choices"][0]
    assert only["finish_reason"] == "length" and len(only["logprobs"]["tokens"]) == len(engine.tokenizer(prompt)[
        "input_ids"])
    assert json.loads(lines[1][6:])["usage"]["completion_tokens"] == 0


def test_refused_combinations(base_url):
    err = _error(_post(base_url, {"prompt": "x", "max_tokens": 0}))
    assert err["param"] == "max_tokens" and "echo" in err["message"]
    err = _error(_post(base_url, {"prompt": "x", "prompt_logprobs": 1, "stream": True}))
    assert err["param"] == "prompt_logprobs" and "stream" in err["message"]
    assert _error(_post(base_url, {"prompt": "x", "prompt_logprobs": -2}))["param"] == "prompt_logprobs"
    assert _error(_post(base_url, {"prompt": "x", "prompt_logprobs": "3"}))["param"] == "prompt_logprobs"
    # Chat keeps OpenAI's fields: max_tokens 0 is still refused there.
    assert _error(_post(base_url, {"messages": USER, "max_tokens": 0}, "/v1/chat/completions"))["param"] == \
        "max_tokens"


# ---- --max-logprobs --------------------------------------------------------------------------------------
def test_max_logprobs(base_url, engine):
    # vLLM's default cap is 20, and its messages.
    err = _error(_post(base_url, {"prompt": "x", "max_tokens": 1, "prompt_logprobs": 21}))
    assert err["message"] == "Requested prompt logprobs of 21, which is greater than max allowed: 20"
    assert err["param"] == "prompt_logprobs"
    err = _error(_post(base_url, {"prompt": "x", "max_tokens": 1, "logprobs": 21}))
    assert err["message"] == "Requested sample logprobs of 21, which is greater than max allowed: 20"
    vocab = len(engine.tokenizer)
    err = _error(_post(base_url, {"prompt": "x", "max_tokens": 1, "logprobs": -1}))  # -1: the whole vocabulary
    assert err["message"] == f"Requested sample logprobs of {vocab}, which is greater than max allowed: 20"
    assert len(_ok(_post(base_url, {"prompt": "x y", "max_tokens": 1, "prompt_logprobs": 20}))[
        "choices"][0]["prompt_logprobs"][1]) >= 20
    url, server = _start(engine, max_logprobs=2)
    try:
        err = _error(_post(url, {"messages": USER, "logprobs": True, "top_logprobs": 3}, "/v1/chat/completions"))
        assert err["param"] == "top_logprobs" and "max allowed: 2" in err["message"]
        _error(_post(url, {"prompt": "x", "prompt_logprobs": 3}))
        assert _ok(_post(url, {"prompt": "x", "max_tokens": 1, "prompt_logprobs": 2}))
    finally:
        _stop(server)
    url, server = _start(engine, max_logprobs=-1)  # no cap
    try:
        body = _ok(_post(url, {"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": -1}))
        assert len(body["choices"][0]["prompt_logprobs"][1]) == vocab
        assert math.isclose(sum(math.exp(v["logprob"]) for v in body["choices"][0]["prompt_logprobs"][1].values()),
                            1.0, abs_tol=1e-3)
    finally:
        _stop(server)
    with pytest.raises(ValueError):
        create_app(None, MODEL, max_logprobs=-2)


def test_serve_stage_takes_max_logprobs():
    from kdforge.cli import build_parser
    from kdforge.stages.serve import ServeConfig

    args = build_parser().parse_args(["serve", "some/model", "--max-logprobs", "64"])
    assert args.max_logprobs == 64
    assert ServeConfig(model="m").max_logprobs == 20
    with pytest.raises(ValueError):
        ServeConfig(model="m", max_logprobs=-2)


# ---- return_tokens_as_token_ids ---------------------------------------------------------------------------
def test_return_tokens_as_token_ids(base_url, engine):
    prompt = engine.tokenizer("Once upon a time")["input_ids"]
    kw = {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    as_ids = _ok(_post(base_url, {**kw, "return_tokens_as_token_ids": True}))["choices"][0]["logprobs"]
    plain = _ok(_post(base_url, kw))["choices"][0]["logprobs"]
    assert as_ids["tokens"][:len(prompt)] == [f"token_id:{t}" for t in prompt]
    assert all(t.startswith("token_id:") for t in as_ids["tokens"]) and len(as_ids["tokens"]) == len(prompt) + 3
    generated = [int(t.split(":")[1]) for t in as_ids["tokens"][len(prompt):]]
    assert "".join(plain["tokens"][len(prompt):]) == engine.tokenizer.decode(generated)
    assert as_ids["token_logprobs"] == plain["token_logprobs"] and as_ids["text_offset"] == plain["text_offset"]
    assert all(k.startswith("token_id:") for top in as_ids["top_logprobs"][1:] for k in top)
    assert [list(top.values()) for top in as_ids["top_logprobs"][1:]] == \
        [list(top.values()) for top in plain["top_logprobs"][1:]]


# ---- /tokenize, /detokenize, /tokenizer_info -------------------------------------------------------------
def test_tokenize_detokenize_round_trip(base_url, engine):
    tok = engine.tokenizer
    text = "Hello, world! 你好 🙂 <|im_start|>"
    body = _ok(_post(base_url, {"prompt": text}, "/tokenize"))
    assert body == {"count": len(tok(text)["input_ids"]), "max_model_len": engine.context_length,
                    "tokens": tok(text)["input_ids"], "token_strs": None}
    assert _ok(_post(base_url, {"tokens": body["tokens"]}, "/detokenize")) == {"prompt": text}
    # Without a model name (lm-eval's remote tokenizer sends none), with token strings, without special tokens.
    bare = httpx.post(base_url + "/tokenize", json={"prompt": text, "add_special_tokens": False,
                                                     "return_token_strs": True}).json()
    assert bare["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
    assert bare["token_strs"] == tok.convert_ids_to_tokens(bare["tokens"])
    assert httpx.post(base_url + "/detokenize", json={"tokens": []}).json() == {"prompt": ""}
    # Chat messages: the ids /v1/chat/completions runs (content stays text, the template's own markers).
    chat = _ok(_post(base_url, {"messages": USER}, "/tokenize"))
    assert chat["tokens"] == encode_prompt(tok, USER) and chat["count"] == len(chat["tokens"])
    whole = _ok(_post(base_url, {"messages": USER, "add_generation_prompt": False}, "/tokenize"))
    assert chat["tokens"][:len(whole["tokens"])] == whole["tokens"] and whole["count"] < chat["count"]
    # Errors are 4xx in the server's error shape.
    assert _error(_post(base_url, {"model": "nope", "prompt": "x"}, "/tokenize"), 404)["code"] == "model_not_found"
    assert _error(_post(base_url, {"prompt": "x", "messages": USER}, "/tokenize"))["param"] == "prompt"
    assert _error(_post(base_url, {}, "/tokenize"))["param"] == "prompt"
    assert _error(_post(base_url, {"messages": USER, "add_special_tokens": True}, "/tokenize"))["param"] == \
        "add_special_tokens"
    assert _error(_post(base_url, {"tokens": [10**9]}, "/detokenize"))["param"] == "tokens"
    assert _error(_post(base_url, {"tokens": ["a"]}, "/detokenize"))["param"].startswith("tokens")


def test_tokenizer_info_serves_lm_evals_remote_tokenizer(base_url, engine):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    info = httpx.get(base_url + "/tokenizer_info").json()
    assert info["eos_token"] == engine.tokenizer.eos_token and info["model_max_length"] == engine.context_length
    assert info["chat_template"] == engine.tokenizer.chat_template
    assert check_remote_tokenizer_support(base_url + "/v1/completions")
    remote = RemoteTokenizer(base_url + "/v1/completions")
    ids = remote.encode("Hello there")
    assert ids == engine.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    assert remote.decode(ids) == "Hello there"


def test_lm_evals_api_models_generate_against_kdforge_serve(base_url, engine, tiny_llama_dir):
    """lm-eval's local-completions (token ids) and local-chat-completions (messages) generate_until requests:
    the server answers them with its own greedy answers."""
    pytest.importorskip("tenacity")  # lm-eval's API models need it (lm_eval[api])
    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

    until = {"until": ["\n\n"], "max_gen_toks": 8}
    text = "Once upon a time"
    completions = LocalCompletionsAPI(base_url=base_url + "/v1/completions", model=MODEL,
                                      tokenizer=str(tiny_llama_dir), tokenizer_backend="huggingface")
    [got] = completions.generate_until([Instance("generate_until", {}, (text, dict(until)), 0)], disable_tqdm=True)
    want = _ok(_post(base_url, {"prompt": text, "max_tokens": 8, "temperature": 0, "stop": ["\n\n"]}))
    assert got == want["choices"][0]["text"]
    chat = LocalChatCompletion(base_url=base_url + "/v1/chat/completions", model=MODEL)
    [got] = chat.generate_until([Instance("generate_until", {}, (JsonChatStr(json.dumps(USER)), dict(until)), 0)],
                                disable_tqdm=True)
    want = _ok(_post(base_url, {"messages": USER, "max_tokens": 8, "temperature": 0, "stop": ["\n\n"]},
                     "/v1/chat/completions"))
    assert got == want["choices"][0]["message"]["content"]


def test_tokenizer_routes_need_the_api_key(engine):
    url, server = _start(engine, api_key="sekret")
    try:
        for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
            assert _error(httpx.post(url + path, json=body), 401)["code"] == "invalid_api_key"
            assert httpx.post(url + path, json=body, headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(url + "/tokenizer_info").status_code == 401
    finally:
        _stop(server)


# ---- recorded vLLM responses: the same keys and nesting ------------------------------------------------
# vLLM fields kdforge does not produce (the fixtures' README says why).
VLLM_ONLY = {"stop_reason", "token_ids", "prompt_token_ids", "service_tier", "system_fingerprint",
             "kv_transfer_params", "prompt_tokens_details"}


def _shape(value, key: str = ""):
    """The structure of a JSON value: dict keys (token-keyed dicts as one placeholder), element shapes."""
    if isinstance(value, dict):
        if key == "prompt_logprobs_position" or (value and all(k.isdigit() for k in value)):
            return {"<token id>": sorted({json.dumps(_shape(v), sort_keys=True) for v in value.values()})}
        if key == "top_logprobs_position":
            return {"<token>": sorted({json.dumps(_shape(v), sort_keys=True) for v in value.values()})}
        return {k: _shape(v, k) for k, v in value.items() if k not in VLLM_ONLY}
    if isinstance(value, list):
        inner = {"prompt_logprobs": "prompt_logprobs_position", "top_logprobs": "top_logprobs_position"}.get(key, "")
        return ["list", sorted({json.dumps(_shape(v, inner), sort_keys=True) for v in value})]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else type(value).__name__


@pytest.mark.parametrize("fixture", sorted(p.name for p in (FIXTURES / "vllm").glob("*.json")))
def test_responses_have_vllms_shapes(base_url, fixture):
    recorded = json.loads((FIXTURES / "vllm" / fixture).read_text())
    assert recorded["source"] and recorded["exchanges"]
    for exchange in recorded["exchanges"]:
        request = {**exchange["request"]}
        if "model" in request:
            request["model"] = MODEL
        mine = _ok(httpx.post(base_url + exchange["endpoint"], json=request, timeout=60))
        assert _shape(mine) == _shape(exchange["response"]), (exchange["endpoint"], request)


# ---- the llama.cpp engine scores too (its scoring context, faked as in test_serve.py) -----------------------
class _FakeScorer:
    def __init__(self, model):
        self.model, self.closed = model, False

    def sequence_logits(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(torch.tensor([ids])).logits[0].float()  # (T, V)

    def close(self) -> None:
        self.closed = True


def test_llama_cpp_engine_scores_prompts(tiny_llama_dir, tokenizer, engine):
    from transformers import AutoModelForCausalLM

    from kdforge.runtime.sampling import SamplingParams
    from kdforge.serve.llamacpp import LlamaCppEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    fake = _FakeLlama(model)
    scorer = _FakeScorer(model)
    eng = LlamaCppEngine(fake, tokenizer, [2], read_logits=lambda: fake.scores[fake.n_tokens - 1],
                         scorer=scorer).start()
    try:
        prompts = [tokenizer("Once upon a time")["input_ids"], tokenizer("Hi there")["input_ids"]]
        params = [SamplingParams(max_tokens=1, temperature=0)] * 2
        future, handles = eng.score(prompts, 3, params, logprobs=1)
        mine = future.result(timeout=30)
        theirs, _ = engine.score(prompts, 3)
        for a, b in zip(mine, theirs.result(timeout=30)):
            assert torch.allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)
            assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.ranks, b.ranks)
        for h, s in zip(handles, mine):
            outs = list(h)
            assert outs[-1].completion_tokens == 1 and outs[-1].finish_reason in ("stop", "length")
            entries = [e for o in outs for e in (o.logprobs or [])]
            if outs[-1].finish_reason == "length":  # the end-of-turn token carries no entry
                assert entries[0]["id"] == int(s.next_logits.argmax())
        assert eng.num_in_flight == 0
    finally:
        eng.shutdown()
    assert scorer.closed
    # Without a scoring context the server says so (a 400, not a 500).
    plain = _FakeLlama(model)
    bare = LlamaCppEngine(plain, tokenizer, [2], read_logits=lambda: plain.scores[plain.n_tokens - 1]).start()
    url, server = _start(bare)
    try:
        err = _error(_post(url, {"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 1}))
        assert err["code"] == "unsupported_parameter"
        assert _ok(_post(url, {"prompt": [1, 2, 3], "max_tokens": 1}))  # generation still works
    finally:
        _stop(server)
        bare.shutdown()


def test_llama_cpp_engine_scores_with_a_real_gguf(tokenizer, monkeypatch):
    pytest.importorskip("llama_cpp")  # optional extra: kdforge[llamacpp]
    import kdforge.serve.llamacpp as backend
    from kdforge.models.loading import embedded_gguf_path
    from kdforge.runtime.sampling import SamplingParams

    monkeypatch.setattr(backend, "load_tokenizer", lambda spec: tokenizer)  # the GGUF's own, read faster
    eng = load_engine(str(embedded_gguf_path("smollm2-135m-instruct")), max_model_len=512)
    try:
        prompt = encode_prompt(tokenizer, USER)
        future, [handle] = eng.score([prompt], 2, [SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)])
        [scores] = future.result(timeout=60)
        assert scores.token_logprobs.shape == (len(prompt) - 1,) and bool((scores.token_logprobs <= 0).all())
        assert bool((scores.ranks >= 1).all()) and scores.top_ids.shape == (len(prompt) - 1, 2)
        # The scoring context's last row and the decoding context agree on the greedy next token.
        decoded = list(eng.submit(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)))
        assert "".join(o.text for o in handle) == "".join(o.text for o in decoded)
    finally:
        eng.shutdown()


# ---- lm-evaluation-harness: local-completions against kdforge serve == hf on the same weights ----------------
@pytest.mark.slow
def test_lm_eval_local_completions_equals_hf(embedded_folder, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's API models need it (lm_eval[api])
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The task's YAML names its data relative to the repository root: point it at this checkout's file.
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    yaml = (FIXTURES / "lm_eval" / "kdforge_tiny_mc.yaml").read_text()
    data = FIXTURES / "lm_eval" / "kdforge_tiny_mc.jsonl"
    (task_dir / "kdforge_tiny_mc.yaml").write_text(yaml.replace("tests/fixtures/lm_eval/kdforge_tiny_mc.jsonl",
                                                                str(data)))
    tasks = TaskManager(include_path=str(task_dir))

    def run(model: str, model_args: str, batch_size: int) -> dict:
        out = simple_evaluate(model=model, model_args=model_args, tasks=["kdforge_tiny_mc"], task_manager=tasks,
                              batch_size=batch_size, device="cpu", log_samples=True)
        lls = [float(r[0]) for s in out["samples"]["kdforge_tiny_mc"] for r in s["filtered_resps"]]
        return {**out["results"]["kdforge_tiny_mc"], "lls": lls}

    hf = run("hf", f"pretrained={embedded_folder},dtype=float32", 8)
    eng = load_engine(EMBEDDED)  # the same weights: the embedded teacher's converted folder
    url, server = _start(eng)
    try:
        served = run("local-completions", f"base_url={url}/v1/completions,model={MODEL},tokenizer={embedded_folder},"
                     "tokenizer_backend=huggingface,tokenized_requests=True", 8)
    finally:
        _stop(server)
        eng.shutdown()
    print(f"\nlm-eval kdforge_tiny_mc: hf acc {hf['acc,none']:.4f} acc_norm {hf['acc_norm,none']:.4f}; "
          f"local-completions acc {served['acc,none']:.4f} acc_norm {served['acc_norm,none']:.4f}; "
          f"largest loglikelihood difference {max(abs(a - b) for a, b in zip(hf['lls'], served['lls'])):.2e}")
    assert len(hf["lls"]) == len(served["lls"]) == 96
    assert served["acc,none"] == hf["acc,none"] and served["acc_norm,none"] == hf["acc_norm,none"]
    assert max(abs(a - b) for a, b in zip(hf["lls"], served["lls"])) < 1e-4
