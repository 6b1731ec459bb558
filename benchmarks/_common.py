"""Shared set-up for the benchmarks: teacher-answered data and the 8-layer student."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kdforge.stages.generate import GenerateConfig
from kdforge.stages.generate import run as run_generate
from kdforge.stages.student import StudentConfig
from kdforge.stages.student import run as run_student

TEACHER = "embedded:smollm2-135m-instruct"


def bench_setup(default_steps: int, train: int | None, val: int, max_new_tokens: int = 128,
                extra_args: Callable[[argparse.ArgumentParser], None] | None = None):
    """Parse --steps/--data/--workdir; return (args, workdir, data folder, 8-layer student folder).

    ``train`` None means ``steps * 4`` training conversations (one pass at batch 4);
    ``extra_args`` adds a script's own flags.
    """
    ap = argparse.ArgumentParser()
    if extra_args is not None:
        extra_args(ap)
    ap.add_argument("--steps", type=int, default=default_steps)
    ap.add_argument("--data", help="a generate folder with teacher answers (default: generated here)")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "kdforge" / "bench"))
    args = ap.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    n_train = train if train is not None else args.steps * 4
    data = Path(args.data) if args.data else teacher_answers(root, n_train, val, max_new_tokens)
    return args, root, data, layer_student(root)


def teacher_answers(root: Path, train: int, val: int, max_new_tokens: int = 128) -> Path:
    """A generate artifact with ``train`` + ``val`` teacher answers (resumes if already there)."""
    out = root / f"generate-{train}-{val}-{max_new_tokens}"
    run_generate(GenerateConfig(model=TEACHER, out=str(out), split="all", limit=train, val_limit=val,
                                max_new_tokens=max_new_tokens))
    return out


def layer_student(root: Path, layers: int = 8) -> Path:
    out = root / f"student-{layers}"
    if not (out / "meta.json").is_file():
        run_student(StudentConfig(teacher=TEACHER, out=str(out), method="layers", num_layers=layers))
    return out


def matmul_flops_per_s(n: int = 1024, repeats: int = 10) -> float:
    """Best fp32 matrix-multiply rate on this machine, measured now (the same threads as training)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
