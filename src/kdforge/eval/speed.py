"""Speed and size, measured the same way for every model.

Each model is loaded and timed in its own process, so that its peak resident memory (Linux
``VmHWM``) is its own and not the sum of every model the report holds:

    main process ──stdin/stdout──► speed server (imports torch + transformers once, runs no ops)
                                     └─ fork per model: load, set threads, time, report, exit

Forking from a server that has imported the libraries but run no tensor op costs one import per
report instead of one per model, and a forked child starts where a fresh process would be after
its imports. ``peak_rss_mb`` is therefore "a fresh Python process with torch and transformers
imported, after loading this model and decoding at batch 1 and at batch ``batch``".
Where fork is not available (not Linux), each model runs in a fresh ``python -m`` process.

Timings come from the model's runtime, ``CausalLM.decode_speed`` (`kdforge.runtime`; greedy,
``new_tokens`` forced tokens after the prompt, best of two after a warm-up), one code path for
every backend:
- ``ttft_ms``: one ``generate`` call producing one token: the prompt's prefill plus one step;
- ``decode_tokens_per_s``: tokens after the first, per second: batch × (n − 1) / (t(n) − t(1)).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# .onnx.data: the external weights of an .onnx graph (ONNX Runtime GenAI folders)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".onnx.data")


def bytes_on_disk(spec: str) -> int:
    """Bytes of the weight files a model spec points to (a GGUF file: its size; an HF folder: its
    weight files; an ONNX Runtime GenAI folder: its .onnx graph and .onnx.data weights; the embedded
    teacher: its shipped GGUF)."""
    from kdforge.models.loading import EMBEDDED_PREFIX, embedded_gguf_path

    if spec.startswith(EMBEDDED_PREFIX):
        return embedded_gguf_path(spec[len(EMBEDDED_PREFIX):]).stat().st_size
    path = Path(spec).expanduser()
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def measure_one(job: dict[str, Any]) -> dict[str, Any]:
    """Open ``job['spec']`` in its runtime and time it at batch 1 and at ``job['batch']`` (runs in the
    child). A runtime that decodes fewer sequences at once (llama.cpp: one) reports None at that batch."""
    import torch

    from kdforge.data.chat import encode_prompt
    from kdforge.runtime import open_model

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    rss_start = (_status_kb("VmRSS") or 0) / 1024
    # threads: llama.cpp gets as many as torch would use, so both runtimes get the same cores.
    with open_model(job["spec"], job.get("backend", "auto"), job.get("device", "auto"), threads=job.get("threads"),
                    trust_remote_code=job.get("trust_remote_code", False)) as lm:
        prompt_ids = encode_prompt(lm.tokenizer, job["prompt"])
        b1 = lm.decode_speed(prompt_ids, job["new_tokens"])
        fits = lm.max_batch is None or job["batch"] <= lm.max_batch
        bn = lm.decode_speed(prompt_ids, job["new_tokens"], batch=job["batch"]) if fits else None
        params = lm.num_parameters()
    return {"params": params, "threads": b1["threads"], "prompt_tokens": len(prompt_ids),
            "batch": job["batch"], "new_tokens": job["new_tokens"],
            "ttft_ms_b1": b1["ttft_s"] * 1000, "decode_tokens_per_s_b1": b1["decode_tokens_per_s"],
            "ttft_ms_bn": bn["ttft_s"] * 1000 if bn else None,
            "decode_tokens_per_s_bn": bn["decode_tokens_per_s"] if bn else None,
            "rss_start_mb": rss_start, "peak_rss_mb": _peak_rss_mb()}


def _child(job: dict[str, Any], fd: int) -> None:
    os.dup2(2, 1)  # stray prints from libraries must not reach the server's stdout (the protocol)
    try:
        res = measure_one(job)
    except Exception as e:  # reported to the parent, which raises it with the model's name
        res = {"error": f"{type(e).__name__}: {e}"}
    os.write(fd, json.dumps(res).encode())
    os.close(fd)


def serve() -> None:
    """The speed server: one job (JSON) a line on stdin, one result (JSON) a line on stdout."""
    import torch  # noqa: F401  (imported before forking: children start with it loaded)
    import transformers  # noqa: F401

    import kdforge.data.chat  # noqa: F401
    import kdforge.models.loading  # noqa: F401
    import kdforge.runtime.transformers  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                _child(job, w)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(w)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        os.close(r)
        os.waitpid(pid, 0)
        out = b"".join(chunks).decode() or json.dumps({"error": "the measuring process died"})
        print(out, flush=True)


def measure_models(specs: list[str], prompt: list[dict[str, str]], new_tokens: int, batch: int,
                   threads: int | None = None, device: str = "auto", trust_remote_code: bool = False,
                   backends: list[str] | None = None) -> list[dict[str, Any]]:
    """Speed and memory of each model, each measured in its own (forked) process; ``backends`` (one per
    spec, default ``auto``) are the runtimes they open in (`kdforge.runtime.backend_for`'s choices)."""
    backends = backends or ["auto"] * len(specs)
    jobs = [{"spec": s, "prompt": prompt, "new_tokens": new_tokens, "batch": batch, "threads": threads,
             "device": device, "trust_remote_code": trust_remote_code, "backend": b} for s, b in zip(specs, backends)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if hasattr(os, "fork") and Path("/proc/self/status").exists():
        proc = subprocess.Popen([sys.executable, "-m", "kdforge.eval.speed", "--serve"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            if "ready" not in (proc.stdout.readline() or ""):
                raise RuntimeError("the speed server did not start")
            results = []
            for job in jobs:
                proc.stdin.write(json.dumps(job) + "\n")
                proc.stdin.flush()
                results.append(json.loads(proc.stdout.readline() or '{"error": "the speed server died"}'))
        finally:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=60)
    else:
        results = []
        for job in jobs:
            done = subprocess.run([sys.executable, "-m", "kdforge.eval.speed", "--one", json.dumps(job)],
                                  capture_output=True, text=True, env=env)
            lines = done.stdout.strip().splitlines()
            results.append(json.loads(lines[-1]) if lines else {"error": done.stderr[-2000:]})
    for spec, res in zip(specs, results):
        if "error" in res:
            raise RuntimeError(f"speed measurement of {spec} failed: {res['error']}")
    return results


if __name__ == "__main__":
    from kdforge.quiet import quiet_transformers

    quiet_transformers()  # a fresh interpreter: the CLI's settings do not reach it
    if sys.argv[1:2] == ["--serve"]:
        serve()
    elif sys.argv[1:2] == ["--one"]:
        print(json.dumps(measure_one(json.loads(sys.argv[2]))), flush=True)
    else:
        sys.exit("usage: python -m kdforge.eval.speed --serve | --one JOB_JSON")
