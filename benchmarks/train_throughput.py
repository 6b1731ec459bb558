"""Distillation training throughput: kdforge vs TRL's GKDTrainer, same models, data and objective.

Both train the 8-layer student (cut from the embedded teacher) with the live teacher on
teacher-answered conversations: batch 4, max length 256, forward KL at T=1 (TRL: lmbda=0, beta=0,
temperature=1; kdforge: alpha=0, loss=forward_kl, temperature=1), fp32, AdamW. Throughput is target
(assistant) tokens per second of optimizer-step time, the first step excluded as warm-up.
matmul_share: kdforge's achieved FLOP/s (useful linear-layer FLOPs: teacher forward + student
forward/backward over real tokens, vocabulary projections at target positions) over the best fp32
matmul rate measured in the same run.
Prints one JSON line. Needs `pip install trl==1.16.0` (the `bench` extra).
Usage: python benchmarks/train_throughput.py [--steps 13] [--data GENERATE_DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import TEACHER, bench_setup, matmul_flops_per_s  # noqa: E402

from kdforge.config import DistillConfig  # noqa: E402
from kdforge.data.formats import load_training_data, select_split  # noqa: E402
from kdforge.distill.trainer import run_distill  # noqa: E402
from kdforge.models.loading import load_model  # noqa: E402

BATCH, MAX_LEN = 4, 256


def linear_params(model) -> int:
    """Parameters of the decoder's linear layers (what every token passes through)."""
    return sum(p.numel() for n, p in model.get_decoder().named_parameters() if n.endswith("proj.weight"))


def run_kdforge(root: Path, student: Path, data: Path, steps: int) -> dict:
    out = root / "kdforge-run"
    run_distill(DistillConfig(teacher=TEACHER, student=str(student), data=str(data), out=str(out), alpha=0.0,
                              loss="forward_kl", temperature=1.0, batch_size=BATCH, max_length=MAX_LEN,
                              max_steps=steps, log_every=1, lr=1e-4, warmup_steps=0), overwrite=True)
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()][1:]
    return {"targets": sum(r["target_tokens"] for r in rows), "seconds": sum(r["seconds"] for r in rows)}


def run_trl(student: Path, data: Path, steps: int) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    teacher, tok = load_model(TEACHER)
    model, _ = load_model(str(student))
    convs = select_split(load_training_data(data), "train")[: steps * BATCH]
    ds = Dataset.from_list([{"messages": c.messages} for c in convs])
    base = DataCollatorForChatML(tokenizer=tok, max_length=MAX_LEN)
    counts: list[int] = []

    def collate(examples):
        batch = base(examples)
        counts.append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    args = GKDConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_steps=steps,
                     max_length=MAX_LEN, lmbda=0.0, beta=0.0, temperature=1.0, learning_rate=1e-4,
                     logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     dataloader_num_workers=0, seed=0)
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok,
                         data_collator=collate, callbacks=[StepTimer()])
    trainer.train()
    # The collator runs one batch ahead of the step timer; pair each step with its own batch.
    n = min(len(times), len(counts))
    return {"targets": sum(counts[1:n]), "seconds": sum(times[1:n])}


def main() -> None:
    args, root, data, student = bench_setup(13, train=None, val=8)
    matmul = matmul_flops_per_s()
    kd = run_kdforge(root, student, data, args.steps)
    trl = run_trl(student, data, args.steps)

    # Useful FLOPs of kdforge's measured steps (linear layers only; attention scores are a few %).
    teacher, tok = load_model(TEACHER)
    stu, _ = load_model(str(student))
    from kdforge.data.chat import encode_conversation

    convs = select_split(load_training_data(data), "train")
    enc = [encode_conversation(tok, c.messages, MAX_LEN) for c in convs]
    tokens_per_target = sum(len(e.input_ids) for e in enc) / max(1, sum(e.num_targets for e in enc))
    hv = teacher.config.hidden_size * len(tok)
    per_target = (2 * tokens_per_target * linear_params(teacher) + 2 * hv
                  + 3 * (2 * tokens_per_target * linear_params(stu) + 2 * hv))
    kd_tps = kd["targets"] / kd["seconds"]
    trl_tps = trl["targets"] / trl["seconds"]
    print(json.dumps({
        "kdforge_tokens_per_s": round(kd_tps, 1), "trl_tokens_per_s": round(trl_tps, 1),
        "ratio": round(kd_tps / trl_tps, 2), "matmul_share": round(kd_tps * per_target / matmul, 3),
        "kdforge_achieved_gflops": round(kd_tps * per_target / 1e9, 1), "matmul_gflops": round(matmul / 1e9, 1),
        "steps_measured": args.steps - 1, "batch": BATCH, "max_length": MAX_LEN, "threads": torch.get_num_threads(),
        "targets_measured": {"kdforge": kd["targets"], "trl": trl["targets"]},
    }))


if __name__ == "__main__":
    main()
