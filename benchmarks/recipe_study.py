"""Recipe study for the cached path: which alpha and temperature train the best student in one epoch.

Protocol (fixed before the first run; docs/recipes.md section 3 has the runs):
- Start, data, cache: those of benchmarks/quality_per_hour.py (its --workdir): the 20-layer depth-pruned student
  with the whole vocabulary, the teacher-answered conversations (594 train / 66 validation), the top-64 soft
  labels of `kdforge label` at temperature 1. Built here if missing, as that script builds them.
- Every arm: kdforge distill from the cache, batch 4, max length 256, lr 3e-4 peak, 10 warm-up steps then
  constant (quality_per_hour's schedule), --steps optimizer steps (default 150: one epoch, about what a 10-minute
  budget buys after labelling), seeds 0..--seeds-1 (the seed orders the batches). The arms differ only in:
    default   alpha 0.5, T 2 (kdforge's default)
    fkl_t1    alpha 0,   T 1 (forward KL alone at T 1: the best single run before this study)
    a05_t1    alpha 0.5, T 1
    a0_t2     alpha 0,   T 2
- Scoring: one `kdforge eval` over every final student and the start (the live teacher: the full-vocabulary
  KL(teacher || student) per answer token of the validation split, top-1 agreement, NLL of the teacher's answers;
  task score on --task-limit items of each type).
- Decision rule: the default changes to the arm with the lowest mean KL over seeds only if its largest KL over
  seeds is below the default arm's smallest (its lead exceeds both arms' seed spread); otherwise it stays.
Prints one JSON line (per arm: each seed's scores, the means, the steps' wall-clock for information only).
Usage: python benchmarks/recipe_study.py [--steps 150] [--seeds 2] [--arms default,fkl_t1,a05_t1,a0_t2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import TEACHER, teacher_answers  # noqa: E402

BATCH, MAX_LEN, WARMUP, LR = 4, 256, 10, 3e-4
ARMS = {"default": {"alpha": 0.5, "temperature": 2.0}, "fkl_t1": {"alpha": 0.0, "temperature": 1.0},
        "a05_t1": {"alpha": 0.5, "temperature": 1.0}, "a0_t2": {"alpha": 0.0, "temperature": 2.0}}
MEASURES = ("kl", "top1", "nll")


def main() -> None:
    from kdforge.stages.distill import DistillConfig
    from kdforge.stages.distill import run as run_distill
    from kdforge.stages.eval import EvalConfig
    from kdforge.stages.eval import run as run_eval
    from kdforge.stages.label import LabelConfig
    from kdforge.stages.label import run as run_label
    from kdforge.stages.student import StudentConfig
    from kdforge.stages.student import run as run_student

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--task-limit", type=int, default=10)
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "kdforge" / "bench-qph"))
    args = ap.parse_args()
    arms = args.arms.split(",")
    if set(arms) - set(ARMS) or "default" not in arms:
        raise SystemExit(f"--arms from {sorted(ARMS)}, with default (the decision compares against it)")
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    data = teacher_answers(root, 594, 66, 96)
    student = root / "student-depth20"
    if not (student / "meta.json").is_file():
        run_student(StudentConfig(teacher=TEACHER, out=str(student), method="depth", num_layers=20))
    labels = root / "labels"
    if not (labels / "manifest.json").is_file():
        run_label(LabelConfig(teacher=TEACHER, data=str(data), out=str(labels), top_k=64, max_length=MAX_LEN))

    models, seconds = {"start": str(student)}, {}
    for arm in arms:
        for seed in range(args.seeds):
            name = f"{arm}/seed{seed}"
            out = root / "recipes" / f"{arm}-seed{seed}-{args.steps}"
            t = time.time()
            run_distill(DistillConfig(labels=str(labels), student=str(student), data=str(data), out=str(out),
                                      loss="forward_kl", **ARMS[arm], batch_size=BATCH, max_length=MAX_LEN, lr=LR,
                                      lr_schedule="constant", warmup_steps=WARMUP, max_steps=args.steps,
                                      log_every=10, seed=seed), overwrite=True)
            models[name], seconds[name] = str(out), round(time.time() - t, 1)
    cfg = EvalConfig(teacher=TEACHER, students=list(models.values()), names=list(models), data=str(data),
                     out=str(root / "recipes" / "eval"), stability_prompts=0, speed=False, plots=False,
                     max_length=MAX_LEN, task_limit=args.task_limit)
    run_eval(cfg, overwrite=True)
    report = {m["name"]: m for m in json.loads((root / "recipes" / "eval" / "report.json").read_text())["models"]}
    fmt = lambda m: {k: round(m[k], 4) for k in MEASURES} | {"task": round(m["tasks"]["overall"], 4)}  # noqa: E731
    result: dict = {"steps": args.steps, "seeds": args.seeds, "lr": LR, "batch": BATCH, "start": fmt(report["start"]),
                    "arms": {}}
    for arm in arms:
        runs = [fmt(report[f"{arm}/seed{s}"]) for s in range(args.seeds)]
        result["arms"][arm] = {"recipe": ARMS[arm], "seeds": runs,
                               "mean": {k: round(sum(r[k] for r in runs) / len(runs), 4) for k in (*MEASURES, "task")},
                               "kl_range": [min(r["kl"] for r in runs), max(r["kl"] for r in runs)],
                               "train_s": [seconds[f"{arm}/seed{s}"] for s in range(args.seeds)]}
    best = min(arms, key=lambda a: result["arms"][a]["mean"]["kl"])
    beats = result["arms"][best]["kl_range"][1] < result["arms"]["default"]["kl_range"][0]
    result["best_by_mean_kl"] = best
    result["decision"] = best if best != "default" and beats else "default"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
