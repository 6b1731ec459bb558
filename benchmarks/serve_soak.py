"""Soak test of `kdforge serve`: a few hundred mixed requests against one server; memory must stay flat.

Starts `kdforge serve` in a child process on 127.0.0.1 (a tiny random Llama with the embedded teacher's
tokenizer by default, or ``--model embedded:smollm2-135m-instruct`` / any model folder) and sends, from
``--clients`` threads, a deterministic mix: short and long chat answers streamed and not, text
completions with prompts of 5..300 words, streams the client abandons after two events, non-streamed
requests that time out on the client side, logprobs requests, bad requests (400) and oversized bodies
(413). The server's resident memory (VmRSS of the child) is read after the warm-up requests and at the
end; latency percentiles are per kind and overall.

Prints one JSON line: {"requests", "ok", "client_gave_up", "unexpected", "rss_mb_after_warmup",
"rss_mb_end", "rss_growth_pct", "flat" (growth within 10%), "latency_ms": {"p50", "p90", "p99"},
"by_kind": {kind: {"n", "p50", "p99"}}, "seconds"}.
Usage: python benchmarks/serve_soak.py [--requests 300] [--warmup 60] [--clients 6] [--max-seconds 300]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

KINDS = ("chat", "chat_stream", "completion", "completion_stream", "stream_abandoned", "client_timeout",
         "logprobs", "bad_request", "oversized")
WEIGHTS = (20, 20, 15, 15, 10, 4, 8, 4, 4)
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def tiny_model(root: Path) -> Path:
    """A 2-layer random Llama (width 64) with the embedded teacher's tokenizer, as the tests use."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kdforge.models.embedded import ensure_embedded_folder

    tok = AutoTokenizer.from_pretrained(ensure_embedded_folder("smollm2-135m-instruct"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def one_request(http: httpx.Client, url: str, kind: str, rng: random.Random) -> str:
    """Send one request of ``kind``; the outcome: "ok", "gave_up" (the client left on purpose) or an error."""
    chat = {"model": "soak", "messages": [{"role": "user", "content": prompt_text(rng, rng.randint(3, 120))}],
            "max_tokens": rng.choice((4, 16, 48)), "temperature": rng.choice((0, 0.8)), "seed": rng.randint(0, 99)}
    completion = {"model": "soak", "prompt": prompt_text(rng, rng.randint(5, 300)), "max_tokens": rng.choice((8, 32)),
                  "ignore_eos": True}
    if kind == "chat":
        r = http.post(url + "/v1/chat/completions", json=chat)
        return "ok" if r.status_code == 200 else f"status {r.status_code}"
    if kind == "completion":
        r = http.post(url + "/v1/completions", json=completion)
        return "ok" if r.status_code == 200 else f"status {r.status_code}"
    if kind == "logprobs":
        r = http.post(url + "/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 5})
        ok = r.status_code == 200 and r.json()["choices"][0]["logprobs"] is not None
        return "ok" if ok else f"status {r.status_code}"
    if kind in ("chat_stream", "completion_stream", "stream_abandoned"):
        path, body = ("/v1/chat/completions", chat) if kind == "chat_stream" else ("/v1/completions", completion)
        if kind == "stream_abandoned":
            body = {**completion, "max_tokens": 200}
        with http.stream("POST", url + path, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return f"status {r.status_code}"
            events = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events += 1
                    if kind == "stream_abandoned" and events == 2:
                        return "gave_up"  # leaving the with-block closes the connection mid-stream
                    if line == "data: [DONE]":
                        return "ok"
        return "no [DONE]"
    if kind == "client_timeout":
        try:
            http.post(url + "/v1/completions", json={**completion, "max_tokens": 400}, timeout=0.3)
        except httpx.TimeoutException:
            return "gave_up"
        return "ok"
    if kind == "bad_request":
        r = http.post(url + "/v1/chat/completions", json={**chat, "stop": ["a", "b", "c", "d", "e"]})
        return "ok" if r.status_code == 400 else f"status {r.status_code}"
    if kind == "oversized":
        r = http.post(url + "/v1/chat/completions", content=b'{"model": "soak", "x": "' + b"a" * (6 << 20) + b'"}',
                      headers={"content-type": "application/json"})
        return "ok" if r.status_code == 413 else f"status {r.status_code}"
    raise ValueError(kind)


def run_batch(url: str, kinds: list[str], clients: int, seed: int, deadline: float) -> list[tuple[str, str, float]]:
    results: list[tuple[str, str, float]] = []
    lock = threading.Lock()
    local = threading.local()

    def work(i: int) -> None:
        if time.time() > deadline:
            return
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=120)
        rng = random.Random(seed * 100_003 + i)
        t = time.perf_counter()
        try:
            outcome = one_request(local.http, url, kinds[i], rng)
        except httpx.HTTPError as e:
            outcome = f"{type(e).__name__}"
        with lock:
            results.append((kinds[i], outcome, (time.perf_counter() - t) * 1000))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(work, range(len(kinds))))
    return results


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="model spec (default: a tiny random Llama with the embedded tokenizer)")
    ap.add_argument("--requests", type=int, default=300, help="requests after the warm-up")
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--max-seconds", type=float, default=300, help="stop sending after this long")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="kdforge-soak-")
    model = args.model or str(tiny_model(Path(tmp.name) / "tiny"))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "kdforge.cli", "serve", model, "--host", "127.0.0.1",
                               "--port", str(port), "--model-name", "soak", "--max-batch", "8"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        rng = random.Random(args.seed)
        t0 = time.time()
        stop_at = t0 + args.max_seconds
        warm = run_batch(url, rng.choices(KINDS, WEIGHTS, k=args.warmup), args.clients, args.seed, stop_at)
        time.sleep(1.0)
        rss_warm = rss_mb(server.pid)
        main_kinds = rng.choices(KINDS, WEIGHTS, k=args.requests)
        results = run_batch(url, main_kinds, args.clients, args.seed + 1, stop_at)
        time.sleep(1.0)
        rss_end = rss_mb(server.pid)
        seconds = time.time() - t0
        health = httpx.get(url + "/health", timeout=5).json()
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        tmp.cleanup()

    everything = warm + results
    unexpected = [(k, o) for k, o, _ in everything if o not in ("ok", "gave_up")]
    timed = [ms for k, o, ms in results if o == "ok"]
    by_kind = {}
    for kind in KINDS:
        ms = [t for k, o, t in results if k == kind and o == "ok"]
        if ms:
            by_kind[kind] = {"n": len(ms), "p50": percentile(ms, 0.5), "p99": percentile(ms, 0.99)}
    growth = (rss_end - rss_warm) / rss_warm * 100
    print(json.dumps({
        "requests": len(everything), "warmup": len(warm), "ok": sum(o == "ok" for _, o, _ in everything),
        "client_gave_up": sum(o == "gave_up" for _, o, _ in everything), "unexpected": len(unexpected),
        "unexpected_examples": unexpected[:5], "rss_mb_after_warmup": round(rss_warm, 1),
        "rss_mb_end": round(rss_end, 1), "rss_growth_pct": round(growth, 2), "flat": abs(growth) <= 10.0,
        "latency_ms": {"p50": percentile(timed, 0.5), "p90": percentile(timed, 0.9), "p99": percentile(timed, 0.99)},
        "by_kind": by_kind, "idle_after": health["active"] == 0 and health["waiting"] == 0,
        "seconds": round(seconds, 1), "model": args.model or "tiny-random-llama",
    }))


if __name__ == "__main__":
    main()
