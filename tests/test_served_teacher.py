"""A teacher behind a server (runtime/served.py): `kdforge label URL` and `kdforge generate URL` against
`kdforge serve` on the tiny random Qwen2 and Llama teachers equal the local teacher's; a server killed
mid-label resumes; another tokenizer is refused; 429 is retried; vLLM's recorded responses parse."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch

from kdforge.errors import UserError
from kdforge.runtime import SERVED, backend_for
from kdforge.runtime.sampling import SamplingParams
from kdforge.runtime.served import ServedModelError, ServedRuntime, parse_prompt_logprobs, parse_spec
from kdforge.serve.launch import load_engine
from kdforge.softlabels.reader import SoftLabelCache
from kdforge.stages.generate import GenerateConfig
from kdforge.stages.generate import run as run_generate
from kdforge.stages.label import LabelConfig
from kdforge.stages.label import run as run_label

from . import test_serve
from .conftest import make_tiny
from .test_serve import _free_port, _stop

one_thread = test_serve.one_thread  # one torch thread: tiny models on a shared machine
FIXTURES = Path(__file__).parent / "fixtures" / "vllm"
CONVS = [[{"role": "user", "content": f"Tell me about the number {i}."},
          {"role": "assistant", "content": f"The number {i} comes after {i - 1}." + " It is fine." * (i % 4)}]
         for i in range(10)]


def _serve(engine, port: int | None = None, **kw):
    from kdforge.serve.launch import run_server

    port = port or _free_port()
    server = run_server(engine, "tiny", port=port, in_thread=True, **{"max_logprobs": 64, **kw})
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}/v1", server, port


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """(teacher folder, engine, URL): the Llama and the Qwen2 teacher, each behind kdforge serve."""
    eng = load_engine(str(tiny_model_dir), max_batch=4)
    url, server, _ = _serve(eng)
    yield tiny_model_dir, eng, url
    _stop(server)
    eng.shutdown()


def _data(tmp_path: Path, convs=CONVS) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n" for i, m in enumerate(convs)))
    return data


def _same_cache(a: Path, b: Path, n: int) -> None:
    ra, rb = SoftLabelCache(a), SoftLabelCache(b)
    for i in range(n):
        x, y = ra.get(i), rb.get(i)
        assert torch.equal(x.ids, y.ids), i
        torch.testing.assert_close(x.logprobs, y.logprobs, atol=1e-4, rtol=0)
        torch.testing.assert_close(x.tail_logmass, y.tail_logmass, atol=1e-4, rtol=0)


# ---- the spec ---------------------------------------------------------------------------------------
def test_spec_parsing_and_backend():
    assert parse_spec("http://a:1/v1") == (["http://a:1/v1"], None)
    assert parse_spec("http://a:1/v1/,https://b:2#m") == (["http://a:1/v1", "https://b:2/v1"], "m")
    with pytest.raises(ServedModelError, match="different models"):
        parse_spec("http://a:1/v1#x,http://b:1/v1#y")
    assert backend_for("http://a:1/v1") == SERVED and backend_for("https://a/v1", "transformers") == SERVED
    with pytest.raises(UserError, match="llama.cpp"):
        backend_for("http://a:1/v1", "llama.cpp")
    with pytest.raises(ValueError, match="needs its tokenizer"):
        LabelConfig(teacher="http://a:1/v1", data="x")
    with pytest.raises(ValueError, match="hidden states"):
        LabelConfig(teacher="http://a:1/v1", data="x", tokenizer="t", hidden_layers=[0])
    with pytest.raises(ValueError, match="re-tempered"):
        LabelConfig(teacher="http://a:1/v1", data="x", tokenizer="t", temperature=2.0)
    with pytest.raises(ValueError, match="applies to a served teacher"):
        GenerateConfig(model="some/folder", tokenizer="t")


# ---- label and generate through kdforge serve ----------------------------------------------------------
def test_label_through_the_server_equals_local(served, tmp_path):
    t_dir, _, url = served
    data = _data(tmp_path)
    common = dict(data=str(data), top_k=16, shard_size=4, batch_size=1)
    local = run_label(LabelConfig(teacher=str(t_dir), out=str(tmp_path / "local"), **common))
    remote = run_label(LabelConfig(teacher=url, tokenizer=str(t_dir), out=str(tmp_path / "served"), **common))
    assert remote["examples"] == local["examples"] == 10 and remote["targets"] == local["targets"]
    assert remote["served"]["model"] == "tiny" and remote["served"]["requests"] == 10
    _same_cache(tmp_path / "local", tmp_path / "served", 10)
    a = json.loads((tmp_path / "local" / "manifest.json").read_text())
    b = json.loads((tmp_path / "served" / "manifest.json").read_text())
    assert list(a) == list(b) and a["tokenizer"] == b["tokenizer"]  # same layout, same tokenizer hashes
    assert b["teacher"]["spec"] == url and b["teacher"]["served_model"] == "tiny"
    assert b["teacher"]["tokenizer"] == str(Path(t_dir).resolve())
    assert (a["teacher_layers"], a["teacher_hidden_size"]) == (b["teacher_layers"], b["teacher_hidden_size"])
    for key in ("k", "temperature", "vocab_size", "counts", "examples", "dtypes"):
        assert a[key] == b[key], key
    # The same arrays: every shard's bytes are the local run's.
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_generate_through_the_server_at_temperature_0_is_local_greedy(served, prompts_file, tmp_path):
    t_dir, _, url = served
    common = dict(prompts=str(prompts_file), max_new_tokens=12, batch_size=4)
    run_generate(GenerateConfig(model=str(t_dir), out=str(tmp_path / "local"), **common))
    m = run_generate(GenerateConfig(model=url, tokenizer=str(t_dir), out=str(tmp_path / "served"), **common))
    assert m["records"] == 9

    def records(folder):
        rows = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]
        return {r["id"]: (r["messages"], r["completion_tokens"], r["finish_reason"]) for r in rows}

    assert records(tmp_path / "served") == records(tmp_path / "local")


def test_chat_and_generate_agree(served):
    t_dir, _, url = served
    from kdforge.data.chat import encode_prompt

    with ServedRuntime.load(url, tokenizer=str(t_dir)) as lm:
        msgs = [{"role": "user", "content": "Name a colour."}]
        params = SamplingParams(max_tokens=10, temperature=0)
        ids = lm.generate([encode_prompt(lm.tokenizer, msgs)], params, lm.stop_ids())[0]
        chat = lm.chat([msgs], params)[0]
        assert chat["text"].strip() == lm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        # Seeded samples are the local runtime's: the server draws with the generator's seed.
        from kdforge.runtime import make_generator, open_model

        sampled = SamplingParams(max_tokens=8, temperature=1.0)
        prompt = encode_prompt(lm.tokenizer, msgs)
        there = lm.generate([prompt, prompt], sampled, lm.stop_ids(), [make_generator(5), make_generator(6)])
        with open_model(str(t_dir)) as local:
            here = local.generate([prompt, prompt], sampled, local.stop_ids(), [make_generator(5), make_generator(6)],
                                  batch_size=1)
        assert there == here


def test_k_above_the_servers_cap_says_max_logprobs(served, tmp_path):
    t_dir, eng, _ = served
    url, server, _ = _serve(eng, max_logprobs=20)
    try:
        with pytest.raises(UserError, match="--max-logprobs 32"):
            run_label(LabelConfig(teacher=url, tokenizer=str(t_dir), data=str(_data(tmp_path)),
                                  out=str(tmp_path / "o"), top_k=32, request_retries=0))
    finally:
        _stop(server)


def test_a_server_that_tokenizes_otherwise_is_refused(tokenizer, tmp_path):
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["quick brown"])  # the probe text holds it: one token there, two here
    folder = tmp_path / "other"
    make_tiny("llama", len(other)).save_pretrained(folder)
    other.save_pretrained(folder)
    mine = tmp_path / "mine"
    tokenizer.save_pretrained(mine)
    eng = load_engine(str(folder), max_batch=2)
    url, server, _ = _serve(eng)
    try:
        with pytest.raises(UserError, match="tokenizes differently"):
            run_label(LabelConfig(teacher=url, tokenizer=str(mine), data=str(_data(tmp_path)),
                                  out=str(tmp_path / "o"), top_k=8))
        assert not (tmp_path / "o" / "manifest.json").exists()
    finally:
        _stop(server)
        eng.shutdown()


# ---- overload and a server that dies ------------------------------------------------------------------
class _Proxy:
    """An HTTP server in a thread that answers the first ``busy`` POSTs to /v1/completions with 429 (and
    ``Retry-After: 0``) and passes everything else to ``target``, or answers from ``replies`` (path -> JSON)."""

    def __init__(self, target: str | None = None, busy: int = 0, replies: dict | None = None):
        self.busy, self.seen, self.replies = busy, [], replies or {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _answer(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0)) if method == "POST" else None
                proxy.seen.append((method, self.path, json.loads(body) if body else None))
                if method == "POST" and self.path.endswith("/completions") and proxy.busy > 0:
                    proxy.busy -= 1
                    return self._send(429, {"error": {"message": "overloaded", "code": 429}}, {"Retry-After": "0"})
                if self.path in proxy.replies:
                    return self._send(200, proxy.replies[self.path])
                resp = httpx.request(method, target + self.path, content=body,
                                     headers={"content-type": "application/json"}, timeout=60)
                self._send(resp.status_code, resp.json())

            def _send(self, status: int, obj, headers=None) -> None:
                raw = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_overload_429_is_retried(served, tmp_path):
    t_dir, _, url = served
    proxy = _Proxy(target=url[: -len("/v1")], busy=3)
    try:
        data = _data(tmp_path)
        m = run_label(LabelConfig(teacher=proxy.url, tokenizer=str(t_dir), data=str(data), out=str(tmp_path / "o"),
                                  top_k=8, shard_size=4, batch_size=1))
        assert m["examples"] == 10 and m["served"]["retries"] == 3 and proxy.busy == 0
        run_label(LabelConfig(teacher=str(t_dir), data=str(data), out=str(tmp_path / "local"), top_k=8,
                              shard_size=4, batch_size=1))
        _same_cache(tmp_path / "o", tmp_path / "local", 10)
    finally:
        proxy.close()


@pytest.mark.integration
def test_server_killed_mid_label_and_restarted_resumes(tiny_llama_dir, tmp_path, monkeypatch):
    """The server stops while label runs: label fails after its retries with finished shards on disk; the
    server comes back on the same port; the re-run keeps those shards and the cache is a whole run's."""
    eng = load_engine(str(tiny_llama_dir), max_batch=2)
    real = eng._score_group

    def slow(*a, **kw):
        time.sleep(0.03)
        return real(*a, **kw)

    monkeypatch.setattr(eng, "_score_group", slow)
    url, server, port = _serve(eng)
    convs = CONVS * 3  # 30 conversations, 15 shards of 2
    data = _data(tmp_path, convs)
    out = tmp_path / "labels"
    cfg = LabelConfig(teacher=url, tokenizer=str(tiny_llama_dir), data=str(data), out=str(out), top_k=8,
                      shard_size=2, batch_size=1, request_concurrency=1, request_retries=1)
    failed: list[BaseException] = []

    def label():
        try:
            run_label(cfg)
        except BaseException as e:  # noqa: BLE001  (the test looks at it)
            failed.append(e)

    worker = threading.Thread(target=label)
    worker.start()
    deadline = time.time() + 60
    while len(list(out.glob("shard-*.safetensors"))) < 3:
        assert time.time() < deadline and worker.is_alive(), "label finished before the server could be stopped"
        time.sleep(0.005)
    server.should_exit = True
    worker.join(60)
    try:
        assert failed and isinstance(failed[0], UserError) and "re-run" in str(failed[0]), failed
        assert not (out / "manifest.json").exists()
        finished = len(list(out.glob("shard-*.safetensors")))
        assert 3 <= finished < 15
        url2, server, _ = _serve(eng, port=port)  # the same server back, on the same port
        assert url2 == url
        m = run_label(cfg)
        assert m["reused_examples"] == 2 * finished and m["shards"] == 15
        man = json.loads((out / "manifest.json").read_text())
        assert [s["file"] for s in man["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(15)]
        run_label(LabelConfig(teacher=str(tiny_llama_dir), data=str(data), out=str(tmp_path / "whole"), top_k=8,
                              shard_size=2, batch_size=1))
        _same_cache(out, tmp_path / "whole", len(convs))
    finally:
        _stop(server)
        eng.shutdown()


# ---- vLLM's recorded responses ------------------------------------------------------------------------
class _FixtureTokenizer:
    """What the client needs of a tokenizer for the fixtures' Qwen2.5 ids ("Hello, world!")."""

    eos_token_id, unk_token_id = 151645, None

    def __call__(self, text, add_special_tokens=True):
        assert text == "Hello, world!"
        return {"input_ids": [9707, 11, 1879, 0]}

    def __len__(self):
        return 151665

    def convert_tokens_to_ids(self, token):
        return None


def _exchange(name: str, i: int = 0) -> dict:
    return json.loads((FIXTURES / name).read_text())["exchanges"][i]


def test_client_parses_vllms_recorded_responses():
    top = _exchange("completion_prompt_logprobs.json")
    echo = _exchange("completion_echo_loglikelihood.json")
    tok = _exchange("tokenize_detokenize.json")
    model = top["request"]["model"]
    proxy = _Proxy(replies={"/v1/models": {"object": "list", "data": [{"id": model, "object": "model"}]},
                            "/tokenize": tok["response"], "/v1/completions": top["response"]})
    try:
        lm = ServedRuntime(proxy.url, _FixtureTokenizer(), "fixture", backoff=0.01, check_tokenizer=False)
        assert lm.model_name == model  # from /v1/models
        lm.check_tokenizer(proxy.url, "Hello, world!")
        prompt = top["request"]["prompt"][0]
        got = lm.prompt_topk([prompt], 2)[0]
        # Per position: the likeliest two, whether or not the prompt's own token (listed first) is one.
        assert got.ids.tolist() == [[0, 11], [358, 1052], [0, 13]]
        torch.testing.assert_close(got.logprobs, torch.tensor([[-1.102, -1.6713], [-1.8875, -2.6402],
                                                               [-0.4302, -1.6588]]))
        sent = proxy.seen[-1][2]
        assert sent["prompt"] == prompt and sent["prompt_logprobs"] == 2 and sent["max_tokens"] == 1
        assert sent["return_tokens_as_token_ids"] is True and sent["model"] == model
        # The generated token, from logprobs.tokens written token_id:N.
        assert lm.generate([prompt], SamplingParams(max_tokens=1, temperature=0), [151645]) == [[358]]
        lm.close()
    finally:
        proxy.close()
    # lm-eval's echo shape: positions keyed by id, the prompt's own token first; k=1 keeps the likeliest.
    for choice, prompt in zip(echo["response"]["choices"], echo["request"]["prompt"]):
        parsed = parse_prompt_logprobs(choice["prompt_logprobs"], 1, prompt)
        assert parsed.ids.shape == (len(prompt) - 1, 1)
        for row, entry in zip(parsed.logprobs[:, 0].tolist(), choice["prompt_logprobs"][1:]):
            assert row == pytest.approx(max(e["logprob"] for e in entry.values()))
    with pytest.raises(ServedModelError, match="another prompt"):
        parse_prompt_logprobs(top["response"]["choices"][0]["prompt_logprobs"], 2, [9707, 12, 1879, 0])


# ---- distill's teacher source (distill/served_teacher.py; not wired into the stage yet) ---------------------
def test_served_teacher_source_gives_the_local_top_k_signal(served):
    t_dir, _, url = served
    from kdforge.data.batching import collate
    from kdforge.data.chat import encode_conversation
    from kdforge.distill.losses import sparse_divergence
    from kdforge.distill.served_teacher import ServedTeacher, tail_logmass
    from kdforge.distill.teacher_source import TeacherRequest
    from kdforge.models.forward import target_logits
    from kdforge.models.loading import load_model

    model, tok = load_model(str(t_dir))
    batch = collate([encode_conversation(tok, c, 256) for c in CONVS[:4]], tok.pad_token_id)
    with ServedRuntime.load(url, tokenizer=str(t_dir)) as lm:
        signal = ServedTeacher(lm, 8, len(tok))(batch, TeacherRequest()).signal
        with pytest.raises(UserError, match="log-probabilities only"):
            ServedTeacher(lm, 8, len(tok))(batch, TeacherRequest(layers=(0,), hidden=True))
    with torch.no_grad():
        logits, _ = target_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"], len(tok))
    top, ids = torch.log_softmax(logits.float(), -1).topk(8, -1)
    assert torch.equal(signal.ids, ids)
    torch.testing.assert_close(signal.logprobs, top, atol=1e-4, rtol=0)
    student = torch.randn_like(logits)
    local = sparse_divergence(student, ids, top, tail_logmass(top), "forward_kl", temperature=2.0)
    there = sparse_divergence(student, signal.ids, signal.logprobs, signal.tail_logmass, "forward_kl",
                              temperature=2.0, capture_temperature=signal.capture_temperature)
    torch.testing.assert_close(there, local, atol=1e-4, rtol=1e-4)


def test_distill_from_the_server_trains_as_from_the_cache(served, tmp_path, tokenizer):
    """`kdforge distill --teacher URL`: the top-k signal asked of the server every step gives the losses of the
    same teacher's top-k label cache (which differs only by its fp16 / square-root quantisation)."""
    from kdforge.cli import main

    from .conftest import save_tiny

    t_dir, _, url = served
    arch = json.loads((Path(t_dir) / "config.json").read_text())["model_type"]
    student = save_tiny(tmp_path / "student", arch, tokenizer, seed=3)  # another model: a real divergence
    from safetensors.torch import load_file, save_file

    weights = load_file(str(student / "model.safetensors"))
    weights["model.norm.weight"] *= 32  # peaked predictions: a KL term of nats, not of 1e-5 (random models are flat)
    save_file(weights, str(student / "model.safetensors"), metadata={"format": "pt"})
    data = _data(tmp_path)
    assert main(["label", str(t_dir), "--data", str(data), "--out", str(tmp_path / "labels"), "--set", "top_k=16",
                 "--set", "device=cpu", "--set", "batch_size=1"]) == 0
    common = ["--student", str(student), "--data", str(data), "--steps", "3", "--batch-size", "2",
              "--set", "log_every=1", "--set", "device=cpu", "--set", "precision=fp32", "--set", "warmup_steps=0"]
    assert main(["distill", "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "cache"), *common]) == 0
    assert main(["distill", "--teacher", url, "--set", f"teacher_server.tokenizer={t_dir}",
                 "--set", "teacher_top_k=16", "--out", str(tmp_path / "served"), *common]) == 0

    def rows(name):
        return [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]

    served_rows, cache_rows = rows("served"), rows("cache")
    assert [r["soft"] for r in served_rows] == pytest.approx([r["soft"] for r in cache_rows], rel=1e-3)
    assert [r["loss"] for r in served_rows] == pytest.approx([r["loss"] for r in cache_rows], rel=1e-3)
    assert main(["distill", "--teacher", url, "--out", str(tmp_path / "no-tok"), *common]) == 2  # no tokenizer


def test_on_policy_distillation_from_the_server(served, tmp_path, tokenizer):
    """On-policy steps with a served teacher: the student samples, the server scores exactly those tokens (its
    top-k at every sampled position); the first step samples what a run with the local teacher samples."""
    from kdforge.cli import main

    from .conftest import save_tiny

    t_dir, _, url = served
    arch = json.loads((Path(t_dir) / "config.json").read_text())["model_type"]
    student = save_tiny(tmp_path / "student", arch, tokenizer, seed=3)
    data = _data(tmp_path)
    common = ["--student", str(student), "--data", str(data), "--steps", "2", "--batch-size", "2",
              "--set", "log_every=1", "--set", "device=cpu", "--set", "precision=fp32", "--set", "warmup_steps=0",
              "--set", "on_policy=1.0", "--set", "rollout.max_new_tokens=6"]
    assert main(["distill", "--teacher", url, "--set", f"teacher_server.tokenizer={t_dir}",
                 "--set", "teacher_top_k=16", "--out", str(tmp_path / "served"), *common]) == 0
    assert main(["distill", "--teacher", str(t_dir), "--out", str(tmp_path / "local"), *common]) == 0

    def rows(name):
        return [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]

    served_rows, local_rows = rows("served"), rows("local")
    assert all(r["on_policy_steps"] == 1 and r["gen_tokens"] > 0 and r["soft"] > 0 for r in served_rows)
    assert served_rows[0]["gen_tokens"] == local_rows[0]["gen_tokens"]
    assert served_rows[0]["target_tokens"] == local_rows[0]["target_tokens"]
