"""Every stage on a CUDA device, bf16 where the stage offers it, on a small random Qwen2 teacher.

Not a test (CI has no GPU): run it by hand on a GPU machine. It builds a 6-layer, width-512 Qwen2
teacher with 128 padded embedding rows (as Qwen2.5 has) around a real tokenizer, then runs
generate -> label -> student -> distill (online, bf16) -> distill (from the cache, bf16) -> eval ->
quantize (nf4 and int8 through bitsandbytes, when installed) -> serve (one streamed and one plain
request through the OpenAI-shaped API), all with ``device=cuda``, and prints one JSON line: the
seconds each stage took, the distilled students' validation KL against the undistilled one's, and
whether the served answer at temperature 0 equals the streamed one.

Then the FSDP2 section ("fsdp" in the JSON): `kdforge distill` with ``distributed.strategy=fsdp`` and
``precision=bf16`` under ``torchrun --nproc-per-node N`` (N: every visible GPU unless --nproc; with one
GPU that is FSDP2 at world size 1, which kdforge wraps only when fsdp is named under a launcher), on a
larger random Qwen2 teacher (--bench-hidden, --bench-layers) and its half-depth student: once with the
live teacher (distill has no teacher placement fields: the teacher is loaded whole on the rank's GPU in
bf16 and FSDP2 shards it forward-only) and once from a cache that `kdforge label` wrote with the teacher
placed by ``device_map=auto`` in bf16 (the placement fields generate and label have). It measures the
GPU's bf16 matmul throughput in the same run (8192 x 8192 matmuls timed with CUDA events) and reports
each run's tokens/s and model FLOPs as a share of it (the formula is printed with the figures).

    python benchmarks/cuda_check.py --tokenizer DIR   # DIR: any folder with the SmolLM2 tokenizer
    python benchmarks/cuda_check.py --tokenizer DIR --device cpu   # the FSDP2 section alone, tiny, 2 steps
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
import time
from pathlib import Path

import torch


def build_teacher(tokenizer_dir: str, out: Path, hidden: int = 512, layers: int = 6, ffn: int = 1408,
                  heads: int = 8, kv_heads: int = 2, positions: int = 1024) -> Path:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok) + 128, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=positions,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# --- the FSDP2 section -----------------------------------------------------------------------------------

FLOPS_FORMULA = ("model FLOPs a step = 6*Ns*T + 6*Hs*Tt (student forward + backward) + 2*Nt*T + 2*Ht*Tt (live "
                 "teacher forward; absent from the cache); N: decoder parameters (embeddings excluded: looked up, "
                 "not multiplied), H: output head V*h, applied only at the Tt target tokens (kdforge projects "
                 "those alone), T: tokens through the models (Tt x the data's tokens per target); attention's "
                 "score matmuls not counted. share = model FLOP/s / the measured bf16 matmul FLOP/s")


def matmul_tflops(device: str) -> dict:
    """bf16 matmul throughput measured here: n x n by n x n (8192 on CUDA, timed with CUDA events)."""
    n, iters = (8192, 20) if device == "cuda" else (512, 3)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        seconds = time.perf_counter() - t0
    return {"tflops": round(2 * n**3 * iters / seconds / 1e12, 2), "shape": f"{n}x{n} @ {n}x{n} bf16 x {iters}"}


def synthetic_data(tokenizer_dir: str, out: Path, n: int, prompt_tokens: int, answer_tokens: int) -> Path:
    """``n`` conversations of random vocabulary (about ``prompt_tokens`` + ``answer_tokens`` tokens each)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(0)
    hi = min(len(tok), 20000)

    def text(k: int) -> str:
        return tok.decode([rng.randrange(1000 if hi > 2000 else 0, hi) for _ in range(k)])
    rows = [{"id": f"b{i}", "messages": [{"role": "user", "content": text(prompt_tokens)},
                                         {"role": "assistant", "content": text(answer_tokens)}]} for i in range(n)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def tokens_per_target(student: str, data: str, max_length: int) -> float:
    """Tokens through the models per target token in this data, as the trainer counts them (real tokens;
    targets: the labels after the first position)."""
    from kdforge.data.chat import IGNORE_INDEX
    from kdforge.data.formats import load_training_data, select_split
    from kdforge.distill.trainer import encode_dataset
    from kdforge.models.loading import load_tokenizer

    encoded, _ = encode_dataset(load_tokenizer(student), select_split(load_training_data(data), "train"), max_length)
    tokens = sum(len(e.input_ids) for e in encoded)
    targets = sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in encoded)
    return tokens / max(targets, 1)


def matmul_params(folder: str) -> tuple[int, int]:
    """(decoder parameters, output-head V*h) of an HF folder, from its config.json (kdforge.planning's counts)."""
    from kdforge.planning.architecture import resolve

    arch = resolve(folder)
    return arch.params - arch.embedding - arch.head, arch.vocab_size * arch.hidden_size


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_distill(nproc: int, argv: list[str]) -> float:
    """`kdforge distill` under torchrun with ``nproc`` processes; its wall seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "kdforge.cli", "distill", *argv]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    if r.returncode != 0:
        raise SystemExit(f"cuda_check: fsdp distill exited {r.returncode}:\n{r.stderr[-4000:]}")
    return round(time.time() - t0, 2)


def run_figures(out: Path, student: tuple[int, int], teacher: tuple[int, int] | None, ratio: float,
                matmul: float) -> dict:
    """tokens/s and the share of the matmul throughput of a finished distill run (its first logged window,
    the warm-up, left out when there are later ones)."""
    meta = json.loads((out / "meta.json").read_text())
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "target_tokens" in r]
    timed = rows[1:] if len(rows) > 1 else rows
    targets = sum(r["target_tokens"] for r in timed)
    seconds = sum(r["seconds"] for r in timed)
    tokens = targets * ratio
    (ns, hs), (nt, ht) = student, teacher or (0, 0)
    flops = 6 * ns * tokens + 6 * hs * targets + 2 * nt * tokens + 2 * ht * targets
    per_s = flops / max(seconds, 1e-9)
    return {"strategy": meta["strategy"], "world_size": meta["metrics"]["world_size"],
            "global_batch": meta["metrics"]["global_batch_size"],
            "timed_steps": timed[-1]["step"] - (rows[0]["step"] if len(rows) > 1 else 0),
            "target_tokens_per_s": round(targets / max(seconds, 1e-9), 1),
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "model_tflops": round(per_s / 1e12, 4),
            "share_of_matmul": round(per_s / (matmul * 1e12), 4)}


def fsdp_section(tokenizer_dir: str, root: Path, device: str, nproc: int, steps: int, hidden: int,
                 layers: int, conversations: int, length: int, batch: int) -> dict:
    """distill with FSDP2 and bf16 under torchrun, live and from a device-mapped teacher's cache."""
    from kdforge.cli import main as kd
    from kdforge.softlabels.reader import SoftLabelCache

    heads = max(hidden // 64, 1)
    t = str(build_teacher(tokenizer_dir, root / "bench_teacher", hidden, layers, int(hidden * 2.75) // 64 * 64,
                          heads, max(heads // 4, 1), max(1024, 2 * length)))
    s = str(root / "bench_student")
    if kd(["student", t, "--out", s, "--num-layers", str(max(layers // 2, 1))]) != 0:
        raise SystemExit("cuda_check: student exited non-zero")
    data = str(synthetic_data(tokenizer_dir, root / "bench_data.jsonl", conversations, length // 2, length // 2))
    max_length = length + 64
    result: dict = {"nproc": nproc, "flops_formula": FLOPS_FORMULA, "matmul": matmul_tflops(device),
                    "teacher": {"hidden": hidden, "layers": layers}, "student_layers": max(layers // 2, 1)}
    result["teacher_placement"] = ("live teacher: distill has no teacher placement fields yet, so it is loaded "
                                   "whole on the rank's device (bf16 on CUDA) and FSDP2 shards it forward-only; "
                                   "device_map=auto: the label run below (the teacher fields generate and label "
                                   "have), whose cache the second distill run trains from")
    labels = root / "bench_labels"
    t0 = time.time()
    placement = ["--set", "device_map=auto"] + (["--precision", "bf16"] if device == "cuda" else [])
    if kd(["label", t, "--data", data, "--out", str(labels), "--top-k", "32", "--set", f"max_length={max_length}",
           *placement]) != 0:
        raise SystemExit("cuda_check: label with device_map=auto exited non-zero")
    result["label_device_map"] = {"seconds": round(time.time() - t0, 2),
                                  "precision": getattr(SoftLabelCache(str(labels)).manifest.teacher, "precision", None)}
    ratio = tokens_per_target(s, data, max_length)
    result["tokens_per_target"] = round(ratio, 3)
    sp, tp = matmul_params(s), matmul_params(t)
    result["student_params"], result["teacher_params"] = {"decoder": sp[0], "head": sp[1]}, {"decoder": tp[0],
                                                                                            "head": tp[1]}
    common = ["--student", s, "--data", data, "--steps", str(steps), "--batch-size", str(batch), "--lr", "1e-4",
              "--set", "precision=bf16", "--set", "distributed.strategy=fsdp", "--set", f"device={device}",
              "--set", f"max_length={max_length}", "--set", f"pack_length={max_length}",
              "--set", f"log_every={max(steps // 3, 1)}", "--set", "warmup_steps=0"]
    for name, source, teacher in (("online", ["--teacher", t], tp), ("cached", ["--labels", str(labels)], None)):
        out = root / f"bench_{name}"
        wall = torchrun_distill(nproc, [*source, *common, "--out", str(out)])
        result[name] = run_figures(out, sp, teacher, ratio, result["matmul"]["tflops"]) | {"wall_s": wall}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--work", default=None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: only the FSDP2 section, on a tiny model for 2 steps (checks the code path here)")
    ap.add_argument("--nproc", type=int, default=None, help="FSDP2 section: processes (default: every visible GPU)")
    ap.add_argument("--fsdp-steps", type=int, default=30)
    ap.add_argument("--bench-hidden", type=int, default=1024, help="FSDP2 section: the teacher's width")
    ap.add_argument("--bench-layers", type=int, default=8, help="FSDP2 section: the teacher's layers (student: half)")
    ap.add_argument("--bench-length", type=int, default=1024, help="FSDP2 section: tokens per conversation")
    ap.add_argument("--bench-batch", type=int, default=8, help="FSDP2 section: conversations per micro-batch")
    args = ap.parse_args()
    if args.device == "cpu":
        root = Path(args.work or tempfile.mkdtemp(prefix="kdforge-fsdp-cpu-"))
        fsdp = fsdp_section(args.tokenizer, root, "cpu", args.nproc or 1, 2, 64, 2, 8, 64, 2)
        print(json.dumps({"device": "cpu (dry run of the FSDP2 section)", "torch": torch.__version__, "fsdp": fsdp}))
        return
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
    torch.cuda.empty_cache()  # the torchrun ranks below share this GPU with this process
    t0 = time.time()
    result["fsdp"] = fsdp_section(args.tokenizer, root, "cuda", args.nproc or torch.cuda.device_count(),
                                  args.fsdp_steps, args.bench_hidden, args.bench_layers, 128, args.bench_length,
                                  args.bench_batch)
    times["fsdp_section"] = round(time.time() - t0, 2)
    result["seconds"] = times
    print(json.dumps(result))


if __name__ == "__main__":
    main()
