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
student distilled from the soft-label cache: --also cached=demo_out/distill); they must share the
teacher's tokenizer.
Usage: python benchmarks/kd_vs_sft.py [--steps 120] [--seeds 3] [--data GENERATE_DIR] [--also NAME=STUDENT ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import TEACHER, bench_setup  # noqa: E402

from kdforge.data.batching import shared_vocab_size  # noqa: E402
from kdforge.data.chat import encode_conversation  # noqa: E402
from kdforge.data.formats import load_training_data, select_split  # noqa: E402
from kdforge.models.loading import load_model  # noqa: E402
from kdforge.scoring import agreement  # noqa: E402
from kdforge.stages.distill import DistillConfig  # noqa: E402
from kdforge.stages.distill import run as run_distill  # noqa: E402

RECIPES = (("sft", 1.0), ("kd", 0.5))  # alpha: 1 is plain CE on the answers; 0.5 is the default recipe
MEASURES = ("kl", "top1", "nll")


def main() -> None:
    def flags(ap):
        ap.add_argument("--also", action="append", default=[], metavar="NAME=STUDENT")
        ap.add_argument("--seeds", type=int, default=3, help="training runs per recipe (data orders)")

    args, root, data, student = bench_setup(120, train=240, val=48, max_new_tokens=96, extra_args=flags)
    also = dict(a.split("=", 1) for a in args.also)
    teacher, tok = load_model(TEACHER)
    val = [encode_conversation(tok, c.messages, 256) for c in select_split(load_training_data(data), "validation")]
    val = [e for e in val if e.num_targets > 0]
    fmt = lambda r: {k: round(r[k], 4) for k in MEASURES}  # noqa: E731
    per_seed, tokens, val_tokens = [], set(), 0
    for seed in range(args.seeds):
        runs = {}
        for name, alpha in RECIPES:
            out = root / f"kd_vs_sft-{name}-seed{seed}"
            m = run_distill(DistillConfig(teacher=TEACHER, student=str(student), data=str(data), out=str(out),
                                          alpha=alpha, temperature=2.0, loss="forward_kl", max_steps=args.steps,
                                          batch_size=4, lr=3e-4, seed=seed), overwrite=True)
            runs[name] = out
            tokens.add(m["target_tokens_this_run"])
        students = [load_model(str(runs[n]))[0] for n, _ in RECIPES]
        scores = agreement(teacher, students, val, tok.pad_token_id, shared_vocab_size(tok, teacher, *students))
        val_tokens = scores[0]["tokens"]
        per_seed.append({"seed": seed} | {n: fmt(r) for (n, _), r in zip(RECIPES, scores)})
    assert len(tokens) == 1, f"every run must see the same number of target tokens, got {sorted(tokens)}"
    mean = {n: {k: round(sum(r[n][k] for r in per_seed) / len(per_seed), 4) for k in MEASURES} for n, _ in RECIPES}
    # Lower KL and NLL are better; higher top-1 agreement is.
    better = {"kl": lambda a, b: a < b, "top1": lambda a, b: a > b, "nll": lambda a, b: a < b}
    wins = {k: f"{sum(better[k](r['kd'][k], r['sft'][k]) for r in per_seed)}/{len(per_seed)}" for k in MEASURES}
    extra = {}
    if also:
        others = [load_model(p)[0] for p in also.values()]
        scores = agreement(teacher, others, val, tok.pad_token_id, shared_vocab_size(tok, teacher, *others))
        extra = {name: fmt(r) for name, r in zip(also, scores)}
    print(json.dumps({"kd": mean["kd"], "sft": mean["sft"], "steps": args.steps, "tokens": tokens.pop(),
                      "val_tokens": val_tokens, "student_layers": 8, "seeds": args.seeds, "per_seed": per_seed,
                      "kd_wins": wins} | extra))


if __name__ == "__main__":
    main()
