"""Distillation vs plain fine-tuning on the teacher's answers, everything else equal.

The same student (8 of the embedded teacher's 30 layers), the same teacher-answered data, the same
optimizer steps, batches and tokens, trained (a) by CE on the teacher's answers (sft: alpha=1) and
(b) by kdforge's default recipe (alpha=0.5, T=2, forward KL). Both are scored on the validation
split: KL(teacher ‖ student) per answer token, top-1 agreement with the teacher, NLL of the teacher's
answers. With --seeds N (default 3) each recipe is trained N times, seed i giving both recipes the
same data order; the top-level "kd"/"sft" figures are means over seeds, "per_seed" lists each pair and
"kd_wins" counts the seeds where distillation did better on each measure. Prints one JSON line:
{"kd": {...}, "sft": {...}, "steps": .., "tokens": .., "seeds": .., "per_seed": [...], "kd_wins": {...}}.
`--also NAME=STUDENT` scores further students on the same validation conversations (e.g. the demo's
student distilled from the soft-label cache: --also cached=demo_out/distill).
`--student DIR` starts both recipes from that student instead (e.g. the demo's: demo_out/student, 27 layers with a
trimmed vocabulary) and `--labels DIR` trains both from that soft-label cache (the demo's way; sft, alpha 1,
reads only the CE) instead of the live teacher; `--lr` (3e-4) and `--batch-size` (4) as the demo. Scoring is
`kdforge eval`'s agreement (tasks, stability and speed off): KL and top-1 over the whole vocabulary for a student
with the teacher's, over its kept ids for a trimmed one (docs/evaluation.md); "kd_minus_sft" gives the per-seed
differences and "spread" the min and max over seeds.
Usage: python benchmarks/kd_vs_sft.py [--steps 120] [--seeds 3] [--data GENERATE_DIR] [--student DIR]
       [--labels DIR] [--also NAME=STUDENT ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import TEACHER, bench_setup  # noqa: E402

from kdforge.stages.distill import DistillConfig  # noqa: E402
from kdforge.stages.distill import run as run_distill  # noqa: E402
from kdforge.stages.eval import EvalConfig  # noqa: E402
from kdforge.stages.eval import run as run_eval  # noqa: E402

RECIPES = (("sft", 1.0), ("kd", 0.5))  # alpha: 1 is plain CE on the answers; 0.5 is the default recipe
MEASURES = ("kl", "top1", "nll")


def scores(data: Path, out: Path, students: dict[str, str]) -> dict[str, dict]:
    """`kdforge eval`'s agreement of each student with the teacher on the validation split, {name: measures}."""
    cfg = EvalConfig(teacher=TEACHER, students=list(students.values()), names=list(students), data=str(data),
                     out=str(out), tasks=False, stability_prompts=0, speed=False, plots=False)
    run_eval(cfg, overwrite=True)
    report = json.loads((out / "report.json").read_text())
    return {m["name"]: m for m in report["models"] if m["name"] in students}


def main() -> None:
    def flags(ap):
        ap.add_argument("--also", action="append", default=[], metavar="NAME=STUDENT")
        ap.add_argument("--seeds", type=int, default=3, help="training runs per recipe (data orders)")
        ap.add_argument("--student", help="start from this student folder (default: 8 evenly spaced layers)")
        ap.add_argument("--labels", help="train both recipes from this soft-label cache instead of the live teacher")
        ap.add_argument("--lr", type=float, default=3e-4)
        ap.add_argument("--batch-size", type=int, default=4)

    args, root, data, student = bench_setup(120, train=240, val=48, max_new_tokens=96, extra_args=flags)
    student = Path(args.student) if args.student else student
    also = dict(a.split("=", 1) for a in args.also)
    fmt = lambda r: {k: round(r[k], 4) for k in MEASURES}  # noqa: E731
    source = {"labels": args.labels} if args.labels else {"teacher": TEACHER}
    per_seed, tokens, kinds = [], set(), {}
    for seed in range(args.seeds):
        runs, seed_tokens = {}, set()
        for name, alpha in RECIPES:
            out = root / f"kd_vs_sft-{name}-seed{seed}"
            m = run_distill(DistillConfig(**source, student=str(student), data=str(data), out=str(out),
                                          alpha=alpha, temperature=2.0, loss="forward_kl", max_steps=args.steps,
                                          batch_size=args.batch_size, lr=args.lr, seed=seed), overwrite=True)
            runs[name] = str(out)
            seed_tokens.add(m["target_tokens_this_run"])
        # A seed gives both recipes the same data order, hence the same target tokens (seeds differ where the
        # steps do not cover the data a whole number of times).
        assert len(seed_tokens) == 1, f"seed {seed}: the recipes saw different target tokens {sorted(seed_tokens)}"
        tokens.add(seed_tokens.pop())
        got = scores(data, root / f"kd_vs_sft-eval-seed{seed}", runs)
        kinds = {n: got[n]["measured_on"] for n in runs}
        per_seed.append({"seed": seed} | {n: fmt(got[n]) for n, _ in RECIPES})
    mean = {n: {k: round(sum(r[n][k] for r in per_seed) / len(per_seed), 4) for k in MEASURES} for n, _ in RECIPES}
    # Lower KL and NLL are better; higher top-1 agreement is.
    better = {"kl": lambda a, b: a < b, "top1": lambda a, b: a > b, "nll": lambda a, b: a < b}
    wins = {k: f"{sum(better[k](r['kd'][k], r['sft'][k]) for r in per_seed)}/{len(per_seed)}" for k in MEASURES}
    diff = {k: [round(r["kd"][k] - r["sft"][k], 4) for r in per_seed] for k in MEASURES}
    spread = {n: {k: [min(r[n][k] for r in per_seed), max(r[n][k] for r in per_seed)] for k in MEASURES}
              for n, _ in RECIPES}
    extra = {}
    if also:
        extra = {name: fmt(r) for name, r in scores(data, root / "kd_vs_sft-eval-also", also).items()}
    layers = json.loads((student / "config.json").read_text())["num_hidden_layers"]
    print(json.dumps({"kd": mean["kd"], "sft": mean["sft"], "kd_minus_sft": diff, "spread": spread,
                      "steps": args.steps, "tokens": sorted(tokens), "student": str(student),
                      "student_layers": layers, "measured_on": kinds, "signal": "cache" if args.labels else "live",
                      "lr": args.lr, "batch_size": args.batch_size, "seeds": args.seeds, "per_seed": per_seed,
                      "kd_wins": wins} | extra))


if __name__ == "__main__":
    main()
