"""Distillation vs plain fine-tuning on the teacher's answers, everything else equal.

The same student (8 of the embedded teacher's 30 layers), the same teacher-answered data, the same
optimizer steps, batches and tokens, trained (a) by CE on the teacher's answers (sft: alpha=1) and
(b) by kdforge's default recipe (alpha=0.5, T=2, forward KL). Both are scored on the validation
split: KL(teacher ‖ student) per answer token, top-1 agreement with the teacher, NLL of the teacher's
answers. Prints one JSON line: {"kd": {...}, "sft": {...}, "steps": .., "tokens": ..}.
`--also NAME=STUDENT` scores further students on the same validation conversations (e.g. the demo's
student distilled from the soft-label cache: --also cached=demo_out/distill); they must share the
teacher's tokenizer.
Usage: python benchmarks/kd_vs_sft.py [--steps 120] [--data GENERATE_DIR] [--also NAME=STUDENT ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import TEACHER, bench_setup  # noqa: E402

from kdforge.config import DistillConfig  # noqa: E402
from kdforge.data.batching import shared_vocab_size  # noqa: E402
from kdforge.data.chat import encode_conversation  # noqa: E402
from kdforge.data.formats import load_training_data, select_split  # noqa: E402
from kdforge.distill.trainer import run_distill  # noqa: E402
from kdforge.models.loading import load_model  # noqa: E402
from kdforge.scoring import agreement  # noqa: E402


def main() -> None:
    args, root, data, student = bench_setup(
        120, train=240, val=48, max_new_tokens=96,
        extra_args=lambda ap: ap.add_argument("--also", action="append", default=[], metavar="NAME=STUDENT"))
    also = dict(a.split("=", 1) for a in args.also)
    runs = {}
    for name, alpha in (("sft", 1.0), ("kd", 0.5)):
        out = root / f"kd_vs_sft-{name}"
        m = run_distill(DistillConfig(teacher=TEACHER, student=str(student), data=str(data), out=str(out),
                                      alpha=alpha, temperature=2.0, loss="forward_kl", max_steps=args.steps,
                                      batch_size=4, lr=3e-4), overwrite=True)
        runs[name] = (out, m["target_tokens_this_run"])
    assert runs["sft"][1] == runs["kd"][1], "both runs must see the same tokens"
    teacher, tok = load_model(TEACHER)
    students = [load_model(str(runs[n][0]))[0] for n in ("kd", "sft")] + [load_model(p)[0] for p in also.values()]
    val = [encode_conversation(tok, c.messages, 256) for c in select_split(load_training_data(data), "validation")]
    val = [e for e in val if e.num_targets > 0]
    kd, sft, *others = agreement(teacher, students, val, tok.pad_token_id, shared_vocab_size(tok, teacher, *students))
    fmt = lambda r: {"kl": round(r["kl"], 4), "top1": round(r["top1"], 4), "nll": round(r["nll"], 4)}  # noqa: E731
    print(json.dumps({"kd": fmt(kd), "sft": fmt(sft), "steps": args.steps, "tokens": runs["kd"][1],
                      "val_tokens": kd["tokens"], "student_layers": 8}
                     | {name: fmt(r) for name, r in zip(also, others)}))


if __name__ == "__main__":
    main()
