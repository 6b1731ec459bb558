"""`kdforge generate` and `kdforge label` under torchrun: 2 processes over gloo on the CPU give the files one
process gives (same records in the same order, same shard bytes and manifest), and a killed or damaged
parallel run resumes with nothing lost or doubled, at the same or another world size.

Every run is a subprocess with one thread per process (OMP_NUM_THREADS=1): a float sum split over another
number of threads may differ in its last bit, and these tests compare bytes. The teachers are tiny random
Llama (tied embeddings) and Qwen2 (q/k/v biases, GQA: 4 query heads over 2 key/value heads) models with
their logits sharpened (the final norm scaled), so that greedy answers do not hang on float noise.
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

from .conftest import make_tiny

pytestmark = pytest.mark.integration

LAUNCH_TIMEOUT = 150  # seconds per launch; a hung collective fails the test instead of the suite
CONVS = [[{"role": "user", "content": f"Tell me about the number {i}."},
          {"role": "assistant", "content": f"The number {i} comes after {i - 1}." + " It is fine." * (i % 4)}]
         for i in range(11)]
LABEL_ARGS = ["--top-k", "8", "--batch-size", "2", "--set", "shard_size=2"]  # 11 conversations: 6 shards


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _command(nproc: int, args: list[str]) -> list[str]:
    """One process: plain `python -m kdforge.cli` (no launcher at all); more: torchrun on a free port."""
    if nproc == 1:
        return [sys.executable, "-m", "kdforge.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port()), "-m", "kdforge.cli", *args]


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and its ranks by pid (torchrun starts each worker in a session of its own, so the
    launcher's process group does not hold them)."""
    import psutil

    try:
        launcher = psutil.Process(pid)
        ranks = launcher.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in [*ranks, launcher]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    # Not the launcher: psutil would reap it, and Popen.wait() would then report 0 instead of -SIGKILL.
    psutil.wait_procs(ranks, timeout=10)


def kdforge(nproc: int, *args: str) -> str:
    """Run a kdforge command in ``nproc`` processes; its stdout (it must succeed within LAUNCH_TIMEOUT)."""
    proc = subprocess.Popen(_command(nproc, list(args)), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{args[0]} in {nproc} process(es) ran past {LAUNCH_TIMEOUT} s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return stdout


def kill_when(nproc: int, args: list[str], ready) -> int:
    """Start a kdforge command in ``nproc`` processes; once ``ready()``, SIGKILL every rank and the launcher (as
    a scheduler ending the job does); the launcher's return code (-SIGKILL when it was killed)."""
    proc = subprocess.Popen(_command(nproc, args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + LAUNCH_TIMEOUT
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                _kill_tree(proc.pid)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
        proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tokenizer) -> dict[str, Path]:
    from .conftest import QWEN_STYLE_TEMPLATE

    out = {}
    for arch in ("llama", "qwen2"):
        model = make_tiny(arch, len(tokenizer), seed=11)
        if arch == "qwen2":  # what a Qwen2.5 teacher has: attention biases and grouped key/value heads
            attn = model.model.layers[0].self_attn
            assert attn.q_proj.bias is not None and attn.k_proj.out_features < attn.q_proj.out_features
        with torch.no_grad():
            model.model.norm.weight.mul_(8.0)  # sharper logits: clear greedy choices, as in a trained model
        folder = tmp_path_factory.mktemp(f"teacher-{arch}")
        model.save_pretrained(folder)
        tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
        if arch == "qwen2":
            tok.chat_template = QWEN_STYLE_TEMPLATE
        tok.save_pretrained(folder)
        out[arch] = folder
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    # 9 prompts of several lengths: batches of 2 give 5 batches, an uneven share (rank 0: 3, rank 1: 2).
    rows = [{"id": f"p{i}", "prompt": f"Name a colour, number {i}." + " Say why." * (i % 4),
             "split": "validation" if i >= 7 else "train"} for i in range(9)]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def label_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n" for i, m in enumerate(CONVS)))
    return path


GENERATE_CASES = {"llama": ["--max-new-tokens", "8"],  # greedy
                  "qwen2": ["--max-new-tokens", "6", "--preset", "recipe", "--num-samples", "2", "--seed", "3"]}
_generated: dict[tuple[str, int], Path] = {}


def generated(teachers, prompts, tmp_path_factory, arch: str, nproc: int) -> Path:
    """The generate folder of ``arch``'s teacher in ``nproc`` processes (made once per module)."""
    if (arch, nproc) not in _generated:
        out = tmp_path_factory.mktemp(f"gen-{arch}-{nproc}") / "gen"
        kdforge(nproc, "generate", str(teachers[arch]), "--prompts", str(prompts), "--out", str(out),
                "--batch-size", "2", *GENERATE_CASES[arch])
        _generated[arch, nproc] = out
    return _generated[arch, nproc]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_in_two_processes_writes_the_one_process_file(arch, teachers, prompts, tmp_path_factory):
    """Greedy (Llama) and per-record seeded sampling, 2 samples a prompt (Qwen2): data.jsonl byte for byte."""
    one = generated(teachers, prompts, tmp_path_factory, arch, 1)
    two = generated(teachers, prompts, tmp_path_factory, arch, 2)
    assert (two / "data.jsonl").read_bytes() == (one / "data.jsonl").read_bytes()
    records = [json.loads(x) for x in (two / "data.jsonl").read_text().splitlines()]
    assert len(records) == len({r["id"] for r in records}) == (9 if arch == "llama" else 18)
    assert not list(two.glob("data.rank-*.jsonl"))  # merged and removed
    meta = json.loads((two / "meta.json").read_text())
    assert meta["complete"] and meta["metrics"]["processes"] == 2 and meta["metrics"]["records"] == len(records)


def test_generate_resumes_a_killed_parallel_run_at_any_world_size(teachers, prompts, tmp_path_factory, tmp_path):
    """A parallel run killed mid-way leaves part files (one a rank, the last line maybe torn); resuming in
    2 processes gives the uninterrupted run's file byte for byte, resuming in 1 the same records."""
    fresh = generated(teachers, prompts, tmp_path_factory, "llama", 1)
    lines = (fresh / "data.jsonl").read_text().splitlines(keepends=True)
    for nproc in (2, 1):
        out = tmp_path / f"resume-{nproc}"
        out.mkdir()
        shutil.copy(fresh / "config.yaml", out / "config.yaml")
        # What a kill leaves: batches 0 and 2 from rank 0, batch 1 from rank 1 with its last line torn.
        (out / "data.rank-0.jsonl").write_text(lines[0] + lines[1] + lines[4] + lines[5])
        (out / "data.rank-1.jsonl").write_text(lines[2] + lines[3][:25])
        stdout = kdforge(nproc, "generate", str(teachers["llama"]), "--prompts", str(prompts), "--out", str(out),
                         "--batch-size", "2", *GENERATE_CASES["llama"])
        assert "'resumed_records': 5" in stdout
        assert not list(out.glob("data.rank-*.jsonl"))
        if nproc == 2:  # a parallel run merges every part in the one-process order
            assert (out / "data.jsonl").read_bytes() == (fresh / "data.jsonl").read_bytes()
        else:  # one process merges the parts first, then appends what it answers, as it always has
            assert sorted((out / "data.jsonl").read_text().splitlines()) == sorted(x.rstrip("\n") for x in lines)


_labelled: dict[tuple[str, int], Path] = {}


def labelled(teachers, label_data, tmp_path_factory, arch: str, nproc: int) -> Path:
    if (arch, nproc) not in _labelled:
        out = tmp_path_factory.mktemp(f"labels-{arch}-{nproc}") / "labels"
        extra = ["--hidden-layers", "0,1"] if arch == "qwen2" else []  # hidden states share the shards
        kdforge(nproc, "label", str(teachers[arch]), "--data", str(label_data), "--out", str(out), *LABEL_ARGS,
                *extra)
        _labelled[arch, nproc] = out
    return _labelled[arch, nproc]


def _cache_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))} | {
        "manifest.json": (folder / "manifest.json").read_bytes()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_label_in_two_processes_writes_the_one_process_cache(arch, teachers, label_data, tmp_path_factory):
    """Shards 0, 2, 4 from rank 0 and 1, 3, 5 from rank 1, the manifest from rank 0: every byte as one process."""
    from kdforge.softlabels.reader import SoftLabelCache

    one = labelled(teachers, label_data, tmp_path_factory, arch, 1)
    two = labelled(teachers, label_data, tmp_path_factory, arch, 2)
    assert _cache_bytes(two) == _cache_bytes(one)  # bytewise: the log-probs are equal, not merely close
    assert len(_cache_bytes(two)) == 7 and not list(two.glob(".*.json"))  # 6 shards; no sidecars left
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["teacher"]["precision"] == "fp32" and manifest["counts"]["examples"] == len(CONVS)
    assert len(SoftLabelCache(two)) == len(CONVS)  # checksums verified
    meta = json.loads((two / "meta.json").read_text())
    assert meta["metrics"]["processes"] == 2 and meta["metrics"]["shards"] == 6


def test_label_rebuilds_lost_shards_in_two_processes(teachers, label_data, tmp_path_factory, tmp_path):
    """Two shards of a finished cache deleted, one truncated: a 2-process re-run relabels those three (and no
    other), and the cache is the uninterrupted one's again."""
    fresh = labelled(teachers, label_data, tmp_path_factory, "llama", 1)
    out = tmp_path / "labels"
    shutil.copytree(fresh, out)
    (out / "shard-00001.safetensors").unlink()
    (out / "shard-00004.safetensors").unlink()
    shard = out / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    stdout = kdforge(2, "label", str(teachers["llama"]), "--data", str(label_data), "--out", str(out), *LABEL_ARGS)
    assert "'reused_examples': 5" in stdout  # shards 0, 3 (2 each) and 5 (1): the three intact ones
    assert _cache_bytes(out) == _cache_bytes(fresh)
    assert not list(out.glob(".*.json"))


def test_label_killed_in_two_processes_resumes_with_no_shard_lost_or_doubled(teachers, tmp_path):
    """SIGKILL every rank of a 2-process run once a few shards are on disk; a 2-process re-run reuses them
    and the manifest lists each shard exactly once, in order, every checksum verified."""
    from kdforge.softlabels.reader import SoftLabelCache

    data = tmp_path / "data.jsonl"
    convs = CONVS * 20  # 220 shards of 1 conversation: seconds of writing shards, for the kill to land in
    data.write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n" for i, m in enumerate(convs)))
    out = tmp_path / "killed"
    args = ["label", str(teachers["llama"]), "--data", str(data), "--out", str(out), "--top-k", "8",
            "--batch-size", "1", "--set", "shard_size=1"]
    rc = kill_when(2, args, lambda: out.is_dir() and len(list(out.glob("shard-*.safetensors"))) >= 6)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "manifest.json").exists()
    finished = len(list(out.glob("shard-*.safetensors")))
    assert 6 <= finished < len(convs)
    stdout = kdforge(2, *args)
    reused = int(stdout.split("'reused_examples': ")[1].split(",")[0])
    assert finished - 2 <= reused <= finished  # at most the shard in flight on each rank is redone
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(len(convs))]
    assert sorted(out.glob("shard-*.safetensors")) == [out / s["file"] for s in manifest["shards"]]
    cache = SoftLabelCache(out, verify=True)
    assert len(cache) == len(convs) and [e.id for e in cache.manifest.examples] == [f"c{i}" for i in range(len(convs))]
    assert not list(out.glob(".*.json")) and not list(out.glob(".*tmp*"))
