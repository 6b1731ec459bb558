"""Every stage on a CUDA device, bf16 where the stage offers it, on a small random Qwen2 teacher.

Not a test (CI has no GPU): run it by hand on a GPU machine. It builds a 6-layer, width-512 Qwen2
teacher with 128 padded embedding rows (as Qwen2.5 has) around a real tokenizer, then runs
generate -> label -> student -> distill (online, bf16) -> distill (from the cache, bf16) -> eval ->
quantize (nf4 and int8 through bitsandbytes, when installed) -> serve (one streamed and one plain
request through the OpenAI-shaped API), all with ``device=cuda``, and prints one JSON line: the
seconds each stage took, the distilled students' validation KL against the undistilled one's, and
whether the served answer at temperature 0 equals the streamed one.

    python benchmarks/cuda_check.py --tokenizer DIR   # DIR: any folder with the SmolLM2 tokenizer
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def build_teacher(tokenizer_dir: str, out: Path) -> Path:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok) + 128, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_check: no CUDA device")
    from kdforge.cli import main as kd

    root = Path(args.work or tempfile.mkdtemp(prefix="kdforge-cuda-"))
    t = str(build_teacher(args.tokenizer, root / "teacher"))
    times: dict[str, float] = {}

    def stage(name: str, argv: list[str]) -> None:
        t0 = time.time()
        rc = kd(argv + ([] if argv[0] == "student" else ["--set", "device=cuda"]))
        times[name] = round(time.time() - t0, 2)
        if rc != 0:
            raise SystemExit(f"cuda_check: {name} exited {rc}")

    g, lb, s = str(root / "gen"), str(root / "labels"), str(root / "student")
    stage("generate", ["generate", t, "--limit", "64", "--max-new-tokens", "48", "--batch-size", "32", "--out", g,
                       "--set", "dtype=bfloat16"])
    stage("label", ["label", t, "--data", g, "--out", lb, "--top-k", "32", "--hidden-layers", "2,5",
                    "--set", "dtype=bfloat16"])
    stage("student", ["student", t, "--out", s, "--num-layers", "3"])
    common = ["--student", s, "--data", g, "--steps", "30", "--batch-size", "8", "--lr", "1e-3",
              "--set", "precision=bf16", "--set", "eval_every=30"]
    stage("distill_online", ["distill", "--teacher", t, *common, "--out", str(root / "d_online")])
    stage("distill_cached", ["distill", "--labels", lb, *common, "--out", str(root / "d_cached")])
    stage("eval", ["eval", "--teacher", t, "--students", s, str(root / "d_online"), str(root / "d_cached"),
                   "--names", "raw", "online", "cached", "--data", g, "--out", str(root / "eval"),
                   "--task-limit", "4", "--set", "decode_tokens=16", "--set", "stability_prompts=2"])
    rows = {r["name"]: r for r in json.loads((root / "eval" / "report.json").read_text())["models"]}
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "kl": {k: round(v["kl"], 4) for k, v in rows.items()},
                    "decode_tok_s_b1": {k: v.get("decode_tokens_per_s") for k, v in rows.items()}}
    try:
        import bitsandbytes  # noqa: F401

        for method in ("nf4", "bnb-int8"):
            stage(f"quantize_{method}", ["quantize", str(root / "d_online"), "--method", method,
                                         "--out", str(root / f"q_{method}")])
            meta = json.loads((root / f"q_{method}" / "meta.json").read_text())
            result[f"quantize_{method}"] = meta.get("metrics")
    except ImportError:
        result["quantize"] = "bitsandbytes not installed"

    import httpx

    from kdforge.serve.launch import load_engine, run_server

    t0 = time.time()
    eng = load_engine(str(root / "d_online"), device="cuda", dtype="bfloat16", max_batch=8)
    server = run_server(eng, "student", port=8765, in_thread=True)
    while not server.started:
        time.sleep(0.05)
    body = {"model": "student", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 24,
            "temperature": 0}
    plain = httpx.post("http://127.0.0.1:8765/v1/chat/completions", json=body, timeout=60).json()
    streamed = ""
    with httpx.stream("POST", "http://127.0.0.1:8765/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    streamed += choice["delta"].get("content") or ""
    server.should_exit = True
    eng.shutdown()
    times["serve"] = round(time.time() - t0, 2)
    result["serve"] = {"engine_device": str(getattr(eng, "device", "?")), "usage": plain["usage"],
                       "stream_equals_plain": streamed == plain["choices"][0]["message"]["content"]}
    result["seconds"] = times
    print(json.dumps(result))


if __name__ == "__main__":
    main()
