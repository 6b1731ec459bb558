"""Teacher generation throughput on the embedded teacher: batch 1 vs the default batch size.

Prints one JSON line: {"batch1_tokens_per_s", "batched_tokens_per_s", "batch_size", "ratio", ...}.
Tokens are the answer tokens actually produced (up to and including the end-of-turn token);
positions a finished sequence spends waiting for the rest of its batch do not count.
Usage: python benchmarks/generate_throughput.py [--prompts-b1 8] [--prompts-batched 32] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from kdforge.stages.generate import GenerateConfig
from kdforge.stages.generate import run as run_generate

TEACHER = "embedded:smollm2-135m-instruct"


def measure(batch_size: int, n_prompts: int, max_new_tokens: int, root: str) -> dict:
    cfg = GenerateConfig(model=TEACHER, split="train", limit=n_prompts, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, out=f"{root}/b{batch_size}")
    m = run_generate(cfg)
    return {"tokens": m["generated_tokens_this_run"], "tokens_per_s": m["tokens_per_s_this_run"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts-b1", type=int, default=8)
    ap.add_argument("--prompts-batched", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    default_bs = GenerateConfig.model_fields["batch_size"].default
    with tempfile.TemporaryDirectory() as root:
        measure(default_bs, 4, 4, root + "/warmup")  # converts/caches the teacher and warms kernels up
        b1 = measure(1, args.prompts_b1, args.max_new_tokens, root)
        bn = measure(default_bs, args.prompts_batched, args.max_new_tokens, root)
    print(json.dumps({
        "batch1_tokens_per_s": b1["tokens_per_s"], "batched_tokens_per_s": bn["tokens_per_s"],
        "batch_size": default_bs, "ratio": round(bn["tokens_per_s"] / b1["tokens_per_s"], 2),
        "max_new_tokens": args.max_new_tokens, "tokens": {"batch1": b1["tokens"], "batched": bn["tokens"]},
        "threads": torch.get_num_threads(), "model": TEACHER,
    }))


if __name__ == "__main__":
    main()
