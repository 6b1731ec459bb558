"""`kdforge serve` throughput on the embedded teacher: 1 client vs 4 and 8 concurrent clients.

Starts the real HTTP server (continuous-batching engine) in this process and sends OpenAI chat
requests over HTTP from client threads. Every request asks for exactly ``--max-tokens`` tokens
(``ignore_eos``, temperature 0), so each client count does the same work per client.

Prints one JSON line: {"tokens_per_s": {"1": ..., "4": ..., "8": ...}, "ratio_4_vs_1", "ratio_8_vs_1",
"batch_sizes_seen", ...}. Aggregate tokens/s = all completion tokens / wall time of the round,
prefill included. Usage: python benchmarks/serve_throughput.py [--max-tokens 48] [--requests 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
import urllib.request

import torch

from kdforge.serve.launch import load_engine, run_server

TEACHER = "embedded:smollm2-135m-instruct"
QUESTIONS = [
    "Explain what a hash table is.", "Write a haiku about autumn.", "What causes tides?",
    "Give three tips for learning a language.", "How does a bicycle stay upright?",
    "Describe the water cycle.", "What is the capital of Australia and why?", "Why is the sky blue?",
]


def ask(url: str, question: str, max_tokens: int) -> int:
    body = {"model": "bench", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.load(resp)["usage"]["completion_tokens"]


def round_trip(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    tokens = [0] * clients

    def client(i: int) -> None:
        for r in range(requests):
            tokens[i] += ask(url, QUESTIONS[(i + r) % len(QUESTIONS)], max_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"tokens": sum(tokens), "seconds": round(wall, 2), "tokens_per_s": round(sum(tokens) / wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.clients.split(",")]

    engine = load_engine(TEACHER, max_batch=max(counts))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = run_server(engine, "bench", port=port, in_thread=True)
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    ask(url, "warm up", 4)

    results = {}
    for n in counts:
        engine.stats.batch_sizes.clear()
        results[n] = round_trip(url, n, args.requests, args.max_tokens)
        results[n]["max_batch_seen"] = max(engine.stats.batch_sizes, default=0)
    server.should_exit = True
    engine.shutdown()
    base = results[counts[0]]["tokens_per_s"]
    print(json.dumps({
        "tokens_per_s": {str(n): r["tokens_per_s"] for n, r in results.items()},
        **{f"ratio_{n}_vs_{counts[0]}": round(r["tokens_per_s"] / base, 2)
           for n, r in results.items() if n != counts[0]},
        "batch_sizes_seen": {str(n): r["max_batch_seen"] for n, r in results.items()},
        "seconds": {str(n): r["seconds"] for n, r in results.items()},
        "max_tokens": args.max_tokens, "requests_per_client": args.requests, "threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2), "model": TEACHER,
    }))


if __name__ == "__main__":
    main()
