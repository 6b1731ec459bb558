"""Student quality per wall-clock minute: kdforge vs TRL's GKDTrainer and SFTTrainer from the same start.

Protocol (fixed before the first run; docs/recipes.md has the runs):
- Start: the 20-layer depth-pruned student with the teacher's whole vocabulary (`kdforge student --method depth
  --num-layers 20`, the demo's student before trimming: TRL's GKDTrainer needs the teacher's vocabulary), built
  here unless --student is given. Data: the teacher-answered conversations of --data (train split); scored on
  its validation split.
- Arms, each in its own fresh process (2 threads, fp32, batch 4, max length 256, peak learning rate --lr for
  all, 10 warm-up steps then constant: one run is read at every budget, so no arm's schedule is sized for one):
    kdforge          kdforge's default recipe from the soft-label cache (alpha 0.5, T 2, forward KL, top-64):
                     the labelling's wall-clock (teacher loading included) is counted in every budget
    kdforge_fkl_t1   the same cache, alpha 0 and T 1 (the best single run before the recipe study)
    kdforge_live     kdforge's default recipe with the live teacher (no cache, nothing labelled first: at budgets
                     near one labelling pass, labelling first leaves little time to train; added before the first
                     full run, after the smoke run showed labelling at ~240 target tok/s)
    trl_gkd          trl.experimental.gkd.GKDTrainer off-policy (lmbda 0) with its other defaults (beta 0.5,
                     temperature 0.9), the live teacher, TRL's chat collator
    trl_sft          trl.SFTTrainer on the teacher's answers (prompt-completion conversations: loss on the answer)
- The clock of a run starts before its models load and stops at the first optimizer step ending past the
  largest budget; the student's weights are saved after the first step past each budget, with the clock paused
  while saving. Python imports are not counted (the same for every arm).
- Scoring: one `kdforge eval` over every snapshot and the starting student: KL(teacher || student) per answer
  token, top-1 agreement, NLL of the teacher's answers, and the bundled task score.
- "trl_minutes_to_<arm>_kl" (each kdforge arm): the wall-clock TRL's GKD run needs to reach that arm's KL at
  --target-budget (10 minutes): interpolated in log-time between its budgets where it gets there, else
  extrapolated from a least-squares fit KL = a + b ln(minutes) over its budgets (said so: "extrapolated": true;
  where the fit crosses before the last budget, which did not get there, the last budget as a lower bound:
  "lower_bound": true; this rule was added after the first full run, whose fit said 19.0 of 20 minutes).
- --short-seeds N: N-1 further seeds of every arm at the shortest budget only (its spread).
Prints one JSON line. Needs `pip install trl==1.16.0` (the `bench` extra).
Usage: python benchmarks/quality_per_hour.py --data demo_out/generate [--budgets 5,10,20]
       [--arms kdforge,kdforge_fkl_t1,kdforge_live,trl_gkd,trl_sft] [--short-seeds 1] [--student DIR] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import TEACHER, teacher_answers  # noqa: E402

BATCH, MAX_LEN, WARMUP = 4, 256, 10
KD_RECIPES = {"kdforge": {"alpha": 0.5, "temperature": 2.0}, "kdforge_fkl_t1": {"alpha": 0.0, "temperature": 1.0},
              "kdforge_live": {"alpha": 0.5, "temperature": 2.0}}
LIVE = {"kdforge_live"}  # the KD arms with the teacher loaded (no cache)
ARMS = (*KD_RECIPES, "trl_gkd", "trl_sft")
MEASURES = ("kl", "top1", "nll")


def name_of(budget: float) -> str:
    return f"{budget:g}min"


# -- workers (each in a fresh process) --------------------------------------------------------------------


def worker_kdforge(arm: str, data: Path, student: Path, labels: Path, out: Path, budgets: list[float],
                   offset_min: float, lr: float, seed: int) -> dict:
    """kdforge distill from the cache (or the live teacher: LIVE); its own clock (from the stage's start) gets
    ``offset_min`` (labelling) less of every budget."""
    from kdforge.stages.distill import DistillConfig
    from kdforge.stages.distill import run as run_distill

    offset_min = 0.0 if arm in LIVE else offset_min
    source = {"teacher": TEACHER} if arm in LIVE else {"labels": str(labels)}
    own = [b - offset_min for b in budgets]
    if own[0] <= 0:
        raise SystemExit(f"labelling took {offset_min:.2f} min: more than the shortest budget")
    m = run_distill(DistillConfig(**source, student=str(student), data=str(data), out=str(out),
                                  loss="forward_kl", **KD_RECIPES[arm], batch_size=BATCH, max_length=MAX_LEN,
                                  lr=lr, lr_schedule="constant", warmup_steps=WARMUP, max_steps=10**7,
                                  max_minutes=own[-1], snapshot_minutes=own[:-1],
                                  log_every=10, seed=seed), overwrite=True)
    snaps = {name_of(b): out / "snapshots" / name_of(o) for b, o in zip(budgets[:-1], own[:-1])}
    steps = {b: json.loads((p / "snapshot.json").read_text())["step"] for b, p in snaps.items()}
    return {"models": {b: str(p) for b, p in snaps.items()} | {name_of(budgets[-1]): str(out)},
            "steps": steps | {name_of(budgets[-1]): m["steps"]}}


def worker_trl(arm: str, data: Path, student: Path, out: Path, budgets: list[float], lr: float, seed: int) -> dict:
    t0 = time.time()
    from datasets import Dataset
    from transformers import TrainerCallback

    from kdforge.data.formats import load_training_data, select_split
    from kdforge.models.loading import load_model
    from kdforge.models.model_card import complete_model_folder

    model, tok = load_model(str(student))
    convs = select_split(load_training_data(data), "train")
    common = dict(output_dir=str(out / "trainer"), per_device_train_batch_size=BATCH, max_steps=10**7,
                  max_length=MAX_LEN, learning_rate=lr, lr_scheduler_type="constant_with_warmup",
                  warmup_steps=WARMUP, logging_steps=10**7, save_strategy="no", report_to=[], use_cpu=True,
                  bf16=False, dataloader_num_workers=0, seed=seed)
    pending, paused, steps = list(budgets), [0.0], {}

    class Budget(TrainerCallback):
        """Save the student after the first step past each budget (clock paused), stop after the last."""

        def on_step_end(self, args, state, control, **kw):
            now = (time.time() - t0 - paused[0]) / 60
            while pending and pending[0] <= now:
                b, start = pending.pop(0), time.time()
                folder = out / name_of(b)
                model.save_pretrained(folder, safe_serialization=True)
                tok.save_pretrained(folder)
                complete_model_folder(folder, tok, model)
                steps[name_of(b)] = state.global_step
                paused[0] += time.time() - start
            if not pending:
                control.should_training_stop = True

    if arm == "trl_gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer
        from trl.experimental.utils import DataCollatorForChatML

        teacher, _ = load_model(TEACHER)
        ds = Dataset.from_list([{"messages": c.messages} for c in convs])
        trainer = GKDTrainer(model=model, teacher_model=teacher, args=GKDConfig(**common, lmbda=0.0),
                             train_dataset=ds, processing_class=tok,
                             data_collator=DataCollatorForChatML(tokenizer=tok, max_length=MAX_LEN),
                             callbacks=[Budget()])
    else:
        from trl import SFTConfig, SFTTrainer

        ds = Dataset.from_list([{"prompt": c.messages[:-1], "completion": c.messages[-1:]} for c in convs])
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=ds, processing_class=tok,
                             callbacks=[Budget()])
    trainer.train()
    return {"models": {name_of(b): str(out / name_of(b)) for b in budgets}, "steps": steps}


def run_worker(arm: str, args: argparse.Namespace, student: Path, labels: Path, label_min: float,
               budgets: list[float], seed: int, root: Path) -> dict:
    out = root / f"qph-{arm}-seed{seed}-{name_of(budgets[-1])}"
    cmd = [sys.executable, __file__, "--worker", arm, "--data", str(args.data), "--student", str(student),
           "--labels", str(labels), "--label-minutes", str(label_min), "--budgets", ",".join(map(str, budgets)),
           "--lr", str(args.lr), "--seed", str(seed), "--out", str(out)]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {arm} seed {seed} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"process_s": round(time.time() - t, 1)}


# -- the comparison ---------------------------------------------------------------------------------------


def minutes_to_reach(curve: dict[float, float], target: float) -> dict:
    """When a KL curve {minutes: kl} first gets to ``target`` (see the protocol)."""
    pts = sorted(curve.items())
    for (t1, k1), (t2, k2) in zip([(None, None)] + pts[:-1], pts):
        if k2 <= target:
            if t1 is None:
                return {"minutes": t2, "extrapolated": False, "note": "at most: reached by its first budget"}
            f = (k1 - target) / (k1 - k2)
            return {"minutes": round(math.exp(math.log(t1) + f * (math.log(t2) - math.log(t1))), 2),
                    "extrapolated": False}
    xs, ys = [math.log(t) for t, _ in pts], [k for _, k in pts]
    if len(pts) < 2:
        return {"minutes": None, "extrapolated": True, "note": "one budget: no trend"}
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    if b >= 0:
        return {"minutes": None, "extrapolated": True, "note": "its KL does not fall with time"}
    a = my - b * mx
    fit = {"a": round(a, 4), "b_per_ln_minute": round(b, 4)}
    # A curve flattening faster than the log-fit can put the fitted crossing before its own last budget, which
    # it did not reach: the answer is then "more than the last budget" (a lower bound), never the fit.
    minutes = math.exp((target - a) / b)
    if minutes <= pts[-1][0]:
        return {"minutes": pts[-1][0], "extrapolated": True, "lower_bound": True, "fit": fit,
                "note": f"not reached by its last budget; the log-fit's {minutes:.1f} min is below that"}
    return {"minutes": round(minutes, 1), "extrapolated": True, "fit": fit}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="a generate folder with teacher answers (default: generated here)")
    ap.add_argument("--student", help="the starting student (default: 20 layers by block influence, built here)")
    ap.add_argument("--budgets", default="5,10,20", help="minutes, comma-separated")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--short-seeds", type=int, default=1, help="seeds at the shortest budget (the others: seed 0)")
    ap.add_argument("--target-budget", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--task-limit", type=int, help="task items of each type (default: the whole bundled set)")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "kdforge" / "bench-qph"))
    # a worker's own flags
    for flag in ("--worker", "--labels", "--out"):
        ap.add_argument(flag)
    ap.add_argument("--label-minutes", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.worker:
        import torch

        torch.manual_seed(args.seed)
        if args.worker in KD_RECIPES:
            r = worker_kdforge(args.worker, Path(args.data), Path(args.student), Path(args.labels), Path(args.out),
                               budgets, args.label_minutes, args.lr, args.seed)
        else:
            r = worker_trl(args.worker, Path(args.data), Path(args.student), Path(args.out), budgets, args.lr,
                           args.seed)
        print(json.dumps(r))
        return

    from kdforge.stages.eval import EvalConfig
    from kdforge.stages.eval import run as run_eval
    from kdforge.stages.label import LabelConfig
    from kdforge.stages.label import run as run_label
    from kdforge.stages.student import StudentConfig
    from kdforge.stages.student import run as run_student

    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown or budgets != sorted(set(budgets)) or args.target_budget not in budgets:
        raise SystemExit(f"--arms from {ARMS} (got {sorted(unknown)}); --budgets increasing and containing "
                         f"--target-budget {args.target_budget:g}")
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    args.data = Path(args.data) if args.data else teacher_answers(root, 594, 66, 96)
    student = Path(args.student) if args.student else root / "student-depth20"
    if not args.student and not (student / "meta.json").is_file():
        run_student(StudentConfig(teacher=TEACHER, out=str(student), method="depth", num_layers=20))
    labels, label_min = root / "labels", 0.0
    if any(a in KD_RECIPES and a not in LIVE for a in arms):
        t = time.time()  # the labelling as a user runs it: one stage, teacher loading included
        run_label(LabelConfig(teacher=TEACHER, data=str(args.data), out=str(labels), top_k=64, max_length=MAX_LEN),
                  overwrite=True)
        label_min = (time.time() - t) / 60

    runs: dict[str, dict[int, dict]] = {a: {} for a in arms}
    for arm in arms:
        runs[arm][0] = run_worker(arm, args, student, labels, label_min, budgets, 0, root)
        for seed in range(1, args.short_seeds):
            runs[arm][seed] = run_worker(arm, args, student, labels, label_min, budgets[:1], seed, root)
    models = {"start": str(student)}
    for arm, by_seed in runs.items():
        for seed, r in by_seed.items():
            models |= {f"{arm}@{b}/seed{seed}": path for b, path in r["models"].items()}
    cfg = EvalConfig(teacher=TEACHER, students=list(models.values()), names=list(models), data=str(args.data),
                     out=str(root / "eval"), stability_prompts=0, speed=False, plots=False, max_length=MAX_LEN,
                     task_limit=args.task_limit)
    run_eval(cfg, overwrite=True)
    report = {m["name"]: m for m in json.loads((root / "eval" / "report.json").read_text())["models"]}
    fmt = lambda m: {k: round(m[k], 4) for k in MEASURES} | {"task": round(m["tasks"]["overall"], 4)}  # noqa: E731
    curves = {arm: {name_of(b): fmt(report[f"{arm}@{name_of(b)}/seed0"]) for b in budgets} for arm in arms}
    for arm in arms:
        for b in budgets:
            curves[arm][name_of(b)]["steps"] = runs[arm][0]["steps"][name_of(b)]
    short = {arm: [fmt(report[f"{arm}@{name_of(budgets[0])}/seed{s}"]) for s in sorted(runs[arm])] for arm in arms}
    spread = {arm: {k: [min(r[k] for r in rs), max(r[k] for r in rs)] for k in (*MEASURES, "task")}
              for arm, rs in short.items()}
    result = {"budgets_min": budgets, "label_minutes": round(label_min, 2), "curves": curves,
              "start": fmt(report["start"]), "teacher_task": round(report["teacher"]["tasks"]["overall"], 4),
              "shortest_budget_seeds": short, "shortest_budget_spread": spread, "lr": args.lr, "batch": BATCH,
              "max_length": MAX_LEN, "student": str(student), "data": str(args.data),
              "process_s": {arm: runs[arm][0]["process_s"] for arm in arms}}
    if "trl_gkd" in arms:  # every kdforge arm against TRL's GKD ("kdforge": the default recipe, the headline)
        trl = curves["trl_gkd"]
        for arm in (a for a in arms if a in KD_RECIPES):
            kd = curves[arm]
            target = kd[name_of(args.target_budget)]["kl"]
            reach = minutes_to_reach({b: trl[name_of(b)]["kl"] for b in budgets}, target)
            result[f"{arm}_lower_kl_than_trl_gkd"] = {b: kd[b]["kl"] < trl[b]["kl"] for b in kd}
            result[f"trl_minutes_to_{arm}_kl"] = reach | {
                f"{arm}_minutes": args.target_budget, f"{arm}_kl": target,
                "ratio": round(reach["minutes"] / args.target_budget, 2) if reach["minutes"] else None}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
