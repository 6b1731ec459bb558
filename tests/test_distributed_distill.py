"""Distributed distillation equals one process: DDP and FSDP2 over gloo with 2 CPU processes.

Each case trains tiny random Llama (tied embeddings) and Qwen2 (biases, GQA, untied) students with
`torchrun --nproc-per-node 2 -m kdforge.cli distill` and with one process at the same global batch,
and compares every step's loss (train_log.jsonl, log_every=1) and the final weights. Kills and
resumes check that a sharded checkpoint continues the same run at world size 2 and at world size 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdforge.cli import main

from .conftest import save_tiny, write_conversations

pytestmark = pytest.mark.integration

STEPS = 5
TOL = 1e-5  # losses and weights: float32 reduction order (two partial sums instead of one) differs by ~1e-7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = os.environ.copy()
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "kdforge.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("dist")
    data = write_conversations(root / "data.jsonl", [
        (f"Question {i}: what is {i} times {i + 1}?", f"{i} times {i + 1} is {i * (i + 1)}." + " Indeed." * (i % 3))
        for i in range(16)])
    paths = {"data": data}
    for arch in ("llama", "qwen2"):
        paths[f"teacher-{arch}"] = save_tiny(root / f"teacher-{arch}", arch, tokenizer, layers=4)
        paths[f"student-{arch}"] = save_tiny(root / f"student-{arch}", arch, tokenizer, seed=1, layers=2)
        labels = root / f"labels-{arch}"
        assert main(["label", str(paths[f"teacher-{arch}"]), "--data", str(data), "--out", str(labels),
                     "--set", "device=cpu", "--set", "top_k=16"]) == 0
        paths[f"labels-{arch}"] = labels
    return root, paths


def _args(paths, arch: str, source: str, out: Path, global_batch: int | None, *extra: str) -> list[str]:
    signal_args = (["--teacher", str(paths[f"teacher-{arch}"])] if source == "live"
                   else ["--labels", str(paths[f"labels-{arch}"])])
    return ["distill", *signal_args, "--student", str(paths[f"student-{arch}"]), "--data", str(paths["data"]),
            "--out", str(out), "--steps", str(STEPS), "--batch-size", "2",
            *(["--set", f"global_batch_size={global_batch}"] if global_batch else []),
            "--set", "log_every=1", "--set", "warmup_steps=0",
            "--set", "device=cpu", "--set", "precision=fp32", "--set", "temperature=2.0", *extra]


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def _one_process(setup, arch: str, source: str, global_batch: int, cache: dict = {}) -> Path:  # noqa: B006
    """The one-process reference run of a case (made once per case and module)."""
    root, paths = setup
    key = (arch, source, global_batch)
    if key not in cache:
        out = root / f"one-{arch}-{source}-{global_batch}"
        assert main(_args(paths, arch, source, out, global_batch)) == 0
        cache[key] = out
    return cache[key]


def _assert_same_run(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == STEPS
    assert la == pytest.approx(lb, abs=TOL, rel=0), (la, lb)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < TOL, f"final weights differ by {worst}"


@pytest.mark.parametrize("arch,source,strategy,global_batch", [
    ("llama", "live", "ddp", 4),
    ("llama", "live", "fsdp", 4),
    ("qwen2", "cache", "ddp", 4),
    ("qwen2", "cache", "fsdp", 4),
    ("qwen2", "live", "fsdp", 8),   # 2 micro-batches accumulated per rank; teacher sharded too
    ("llama", "cache", "ddp", 8),
])
def test_two_processes_equal_one(setup, arch, source, strategy, global_batch):
    root, paths = setup
    ref = _one_process(setup, arch, source, global_batch)
    out = root / f"two-{arch}-{source}-{strategy}-{global_batch}"
    r = torchrun(_args(paths, arch, source, out, global_batch, "--set", f"distributed.strategy={strategy}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{strategy} over 2 processes: global batch {global_batch}" in r.stdout
    assert r.stdout.count("distill done") == 1  # rank 0 reports, rank 1 does not
    _assert_same_run(ref, out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["metrics"]["world_size"] == 2 and meta["metrics"]["global_batch_size"] == global_batch
    assert meta["strategy"] == strategy


def test_killed_two_process_run_resumes_at_world_two_and_one(setup):
    """A 2-process FSDP2 run killed after its first sharded checkpoint, resumed with 2 processes and (a copy)
    with 1: both reproduce the uninterrupted run's losses and weights."""
    root, paths = setup
    steps = ["--steps", "12"]
    args = _args(paths, "qwen2", "live", root / "placeholder", 4, "--set", "save_every=3",
                 "--set", "distributed.strategy=fsdp")
    full = root / "resume-full"
    r = torchrun([*_with_out(args, full), *steps])
    assert r.returncode == 0, r.stderr[-3000:]

    killed = root / "resume-killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "kdforge.cli", *_with_out(args, killed), *steps]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (killed / "checkpoints" / "step-000003").is_dir():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    assert (killed / "checkpoints" / "step-000003" / "dcp").is_dir()
    assert not (killed / "meta.json").exists()  # it did not finish

    at_one = root / "resume-at-one"
    shutil.copytree(killed, at_one)
    r = torchrun([*_with_out(args, killed), *steps, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert main([*_with_out(args, at_one), *steps, "--resume"]) == 0
    for resumed in (killed, at_one):
        la, lf = _losses(resumed), _losses(full)
        assert la == pytest.approx(lf, abs=TOL, rel=0), (resumed.name, la, lf)
        wa, wf = _weights(resumed), _weights(full)
        assert max(float((wa[k] - wf[k]).abs().max()) for k in wa) < TOL


def test_resume_at_another_world_size_needs_the_same_global_batch(setup, capsys):
    """Without global_batch_size, grad_accum is per process: 1 process would train half the batch. Refused."""
    root, paths = setup
    out = root / "accum"
    args = _args(paths, "llama", "cache", out, None, "--set", "save_every=2", "--set", "grad_accum=1")
    r = torchrun(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "trained 2 micro-batches per step" in err and "set global_batch_size to 4" in err


def _with_out(args: list[str], out: Path) -> list[str]:
    i = args.index("--out")
    return [*args[:i + 1], str(out), *args[i + 2:]]


def test_accelerate_launch_with_an_fsdp_config_runs_fsdp(setup):
    """`accelerate launch --use_fsdp --fsdp_version 2`: strategy auto reads accelerate's choice; same losses."""
    root, paths = setup
    ref = _one_process(setup, "llama", "cache", 4)
    out = root / "accelerate-fsdp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "kdforge.cli",
           *_args(paths, "llama", "cache", out, 4)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fsdp over 2 processes" in r.stdout
    _assert_same_run(ref, out)


def test_fsdp_bf16_mixed_precision_tracks_one_process_bf16(setup):
    """FSDP2 with bf16 compute (MixedPrecisionPolicy: bf16 gathers, fp32 reduction and master weights) against one
    process with bf16 autocast: not bit-equal (different casts), but the same run to bf16 noise; fp32 weights saved."""
    root, paths = setup
    one, two = root / "bf16-one", root / "bf16-fsdp"
    assert main(_args(paths, "qwen2", "cache", one, 4, "--set", "precision=bf16")) == 0
    r = torchrun(_args(paths, "qwen2", "cache", two, 4, "--set", "precision=bf16",
                       "--set", "distributed.strategy=fsdp"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(two) == pytest.approx(_losses(one), rel=2e-3)
    assert all(t.dtype == torch.float32 for t in _weights(two).values())


@pytest.mark.parametrize("arch,source,zero_stage", [("qwen2", "cache", 2), ("qwen2", "cache", 3), ("llama", "live", 3)])
def test_deepspeed_zero_equals_one_process(setup, arch, source, zero_stage):
    """DeepSpeed ZeRO-2/3 (its CPU accelerator over gloo) through the same trainer: same losses and weights.
    DeepSpeed is an optional extra (kdforge[deepspeed]); without it this test cannot run."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'kdforge[deepspeed]')")
    root, paths = setup
    ref = _one_process(setup, arch, source, 4)
    out = root / f"zero{zero_stage}-{arch}-{source}"
    r = torchrun(_args(paths, arch, source, out, 4, "--set", "distributed.strategy=deepspeed",
                       "--set", f"distributed.zero_stage={zero_stage}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "deepspeed over 2 processes" in r.stdout
    _assert_same_run(ref, out)
