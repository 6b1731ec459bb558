"""Label throughput through `kdforge serve` (1 and 4 requests in flight) vs the teacher loaded locally.

Serves the teacher in this process (`kdforge serve` on 127.0.0.1, ``--max-logprobs`` k), labels the same
conversations three times at k=64 (local teacher, served with request_concurrency 1, served with 4), checks
that the served caches equal the local one (ids, log-probs within 1e-4) and prints one JSON line:
  local_tokens_per_s, served_1_tokens_per_s, served_4_tokens_per_s   target tokens labelled per second
  served_1_vs_local, served_4_vs_local                               ratios
  max_abs_logprob_diff, ids_equal                                    served (4 in flight) vs local
The local run labels batches of 8 (packed rows), the server one unpadded conversation per request, so the
two differ by float rounding: enough to swap near-tied ids deep in the top-k and to flip a deep square-root
code (half a code step is ~0.1 nats 20 nats below the top-1), hence ids_equal false and a max diff ~0.1.
Against a local run at batch_size 1 the shards are byte for byte equal
(tests/test_served_teacher.py::test_label_through_the_server_equals_local).
Server and client share this machine's cores (on a real setup the teacher server has its own GPUs), so
the ratio measures the protocol's overhead, not a served teacher's speed.
Usage: python benchmarks/served_label.py [--teacher embedded:smollm2-135m-instruct] [--conversations 48]
       [--data JSONL_OR_GENERATE_DIR]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import TEACHER  # noqa: E402

from kdforge.data.prompts import load_prompt_set  # noqa: E402
from kdforge.models.loading import resolve_model  # noqa: E402
from kdforge.serve.launch import load_engine, run_server  # noqa: E402
from kdforge.softlabels.reader import SoftLabelCache  # noqa: E402
from kdforge.stages.label import LabelConfig  # noqa: E402
from kdforge.stages.label import run as run_label  # noqa: E402

ANSWER = ("Here is a short answer. First, think about what the question asks; then give the facts that "
          "matter, one by one, and end with a sentence that sums them up.")


def synthetic_data(path: Path, n: int) -> Path:
    """``n`` bundled prompts, each with the same fixed answer (labelling cost does not depend on the text)."""
    convs = load_prompt_set("bundled")[:n]
    path.write_text("".join(json.dumps({"id": c.id, "messages": c.prompt_messages + [
        {"role": "assistant", "content": ANSWER}]}) + "\n" for c in convs))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=TEACHER)
    ap.add_argument("--data", help="conversations to label (default: bundled prompts with a fixed answer)")
    ap.add_argument("--conversations", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "kdforge" / "bench" / "served-label"))
    args = ap.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    data = args.data or str(synthetic_data(root / "data.jsonl", args.conversations))
    folder = str(resolve_model(args.teacher).folder)  # the teacher's files: the client's tokenizer

    engine = load_engine(args.teacher, max_batch=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = run_server(engine, "teacher", port=port, in_thread=True, max_logprobs=args.top_k)
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}/v1"
    common = dict(data=data, top_k=args.top_k, split="all", batch_size=8)
    try:
        runs = {"local": run_label(LabelConfig(teacher=args.teacher, out=str(root / "local"), **common),
                                   overwrite=True)}
        for n in (1, 4):
            runs[f"served_{n}"] = run_label(LabelConfig(teacher=url, tokenizer=folder, out=str(root / f"served-{n}"),
                                                        request_concurrency=n, **common), overwrite=True)
    finally:
        server.should_exit = True
        engine.shutdown()
    local, served = SoftLabelCache(root / "local"), SoftLabelCache(root / "served-4")
    ids_equal, worst = True, 0.0
    for i in range(len(local.manifest.examples)):
        a, b = local.get(i), served.get(i)
        ids_equal &= bool(torch.equal(a.ids, b.ids))
        worst = max(worst, float((a.logprobs - b.logprobs).abs().max()) if len(a.logprobs) else 0.0)
    speed = {name: m["label_tokens_per_s"] for name, m in runs.items()}
    print(json.dumps({
        "teacher": args.teacher, "k": args.top_k, "examples": runs["local"]["examples"],
        "targets": runs["local"]["targets"],
        "local_tokens_per_s": speed["local"], "served_1_tokens_per_s": speed["served_1"],
        "served_4_tokens_per_s": speed["served_4"],
        "served_1_vs_local": round(speed["served_1"] / speed["local"], 3),
        "served_4_vs_local": round(speed["served_4"] / speed["local"], 3),
        "ids_equal": ids_equal, "max_abs_logprob_diff": round(worst, 6),
        "requests": runs["served_4"]["served"]["requests"], "retries": runs["served_4"]["served"]["retries"],
        "threads": torch.get_num_threads(), "note": "server and client share this machine's CPU cores",
    }))


if __name__ == "__main__":
    main()
