"""Distillation training throughput and memory: kdforge (online and from the cache) vs TRL's GKDTrainer.

All three train the 8-layer student (cut from the embedded teacher) on the same teacher-answered
conversations, one pass over exactly the same examples: batch 4, max length 256, forward KL at T=1
(TRL: lmbda=0, beta=0, temperature=1; kdforge: alpha=0, loss=forward_kl, temperature=1), fp32, AdamW.
  kdforge   online teacher (the teacher runs every step, like TRL)
  cached    kdforge distill --labels: top-64 soft labels labelled beforehand; the teacher is never loaded
  trl       trl.experimental.gkd.GKDTrainer
Each runs in its own fresh process, so its peak resident memory (ru_maxrss) is its own. Throughput is
target (assistant) tokens per second of optimizer-step time over all steps; every run sees the same
examples, so the targets are the same (reported). matmul_share: kdforge's achieved FLOP/s (useful
linear-layer FLOPs: teacher forward + student forward/backward over real tokens, vocabulary projections
at target positions) over the best fp32 matmul rate measured in the same run.
Prints one JSON line. Needs `pip install trl==1.16.0` (the `bench` extra).
Usage: python benchmarks/train_throughput.py [--steps 16] [--data GENERATE_DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import TEACHER, bench_setup, matmul_flops_per_s  # noqa: E402

from kdforge.data.chat import encode_conversation  # noqa: E402
from kdforge.data.formats import load_training_data, select_split  # noqa: E402
from kdforge.models.loading import load_model, load_tokenizer  # noqa: E402
from kdforge.stages.distill import DistillConfig  # noqa: E402
from kdforge.stages.distill import run as run_distill  # noqa: E402
from kdforge.stages.label import LabelConfig  # noqa: E402
from kdforge.stages.label import run as run_label  # noqa: E402

BATCH, MAX_LEN = 4, 256


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def linear_params(model) -> int:
    """Parameters of the decoder's linear layers (what every token passes through)."""
    return sum(p.numel() for n, p in model.get_decoder().named_parameters() if n.endswith("proj.weight"))


def worker_kdforge(data: Path, student: Path, steps: int, labels: Path | None) -> dict:
    out = Path(tempfile.mkdtemp()) / "run"
    # From the cache the teacher is not loaded (and setting both is refused): labels xor teacher.
    run_distill(DistillConfig(teacher=None if labels else TEACHER, student=str(student), data=str(data),
                              out=str(out), alpha=0.0, loss="forward_kl", temperature=1.0, batch_size=BATCH,
                              max_length=MAX_LEN, max_steps=steps, log_every=1, lr=1e-4, warmup_steps=0,
                              eval_every=None, labels=str(labels) if labels else None))
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return {"targets": sum(r["target_tokens"] for r in rows), "seconds": sum(r["seconds"] for r in rows)}


def worker_trl(data: Path, student: Path, steps: int) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    teacher, tok = load_model(TEACHER)
    model, _ = load_model(str(student))
    convs = load_training_data(data)
    ds = Dataset.from_list([{"messages": c.messages} for c in convs])
    base = DataCollatorForChatML(tokenizer=tok, max_length=MAX_LEN)
    counts: list[int] = []

    def collate(examples):
        batch = base(examples)
        # TRL's labels also cover the newline after <|im_end|> (kdforge stops at <|im_end|>): count ours.
        counts.append(sum(encode_conversation(tok, e["messages"], MAX_LEN).num_targets for e in examples))
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
    assert len(times) == len(counts) == steps, (len(times), len(counts))
    return {"targets": sum(counts), "seconds": sum(times)}


def run_worker(name: str, data: Path, student: Path, steps: int, labels: Path | None) -> dict:
    """Run one trainer in a fresh interpreter; returns its figures (last stdout line is JSON)."""
    cmd = [sys.executable, __file__, "--worker", name, "--data", str(data), "--student", str(student),
           "--steps", str(steps)] + (["--labels", str(labels)] if labels else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def subset(data: Path, n: int, root: Path) -> Path:
    """The first n training conversations as a JSONL file: every trainer makes one pass over exactly these."""
    convs = select_split(load_training_data(data), "train")[:n]
    if len(convs) < n:
        raise SystemExit(f"{data} has {len(convs)} training conversations; need {n}")
    path = root / f"throughput-{n}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps({"id": c.id, "messages": c.messages, "split": "train"}, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    if "--worker" in sys.argv:
        ap = argparse.ArgumentParser()
        for flag in ("--worker", "--data", "--student", "--labels"):
            ap.add_argument(flag)
        ap.add_argument("--steps", type=int)
        a = ap.parse_args()
        torch.manual_seed(0)
        if a.worker == "trl":
            r = worker_trl(Path(a.data), Path(a.student), a.steps)
        else:
            r = worker_kdforge(Path(a.data), Path(a.student), a.steps, Path(a.labels) if a.labels else None)
        print(json.dumps(r | {"peak_rss_mb": round(peak_rss_mb(), 1)}))
        return

    args, root, data, student = bench_setup(16, train=None, val=8)
    sub = subset(data, args.steps * BATCH, root)
    labels = root / f"throughput-labels-{args.steps * BATCH}"
    run_label(LabelConfig(teacher=TEACHER, data=str(sub), out=str(labels), top_k=64, max_length=MAX_LEN),
              overwrite=True)
    matmul = matmul_flops_per_s()
    res = {name: run_worker(name, sub, student, args.steps, labels if name == "cached" else None)
           for name in ("kdforge", "cached", "trl")}

    # Useful FLOPs per target token of the online run (linear layers only; attention scores are a few %).
    teacher, _ = load_model(TEACHER)
    stu, _ = load_model(str(student))
    tok = load_tokenizer(TEACHER)
    enc = [encode_conversation(tok, c.messages, MAX_LEN) for c in load_training_data(sub)]
    tokens_per_target = sum(len(e.input_ids) for e in enc) / max(1, sum(e.num_targets for e in enc))
    hv = teacher.config.hidden_size * len(tok)
    per_target = (2 * tokens_per_target * linear_params(teacher) + 2 * hv
                  + 3 * (2 * tokens_per_target * linear_params(stu) + 2 * hv))
    tps = {k: v["targets"] / v["seconds"] for k, v in res.items()}
    print(json.dumps({
        "kdforge_tokens_per_s": round(tps["kdforge"], 1), "trl_tokens_per_s": round(tps["trl"], 1),
        "ratio": round(tps["kdforge"] / tps["trl"], 2), "matmul_share": round(tps["kdforge"] * per_target / matmul, 3),
        "cached_tokens_per_s": round(tps["cached"], 1), "cached_ratio": round(tps["cached"] / tps["trl"], 2),
        "cached_peak_rss_mb": res["cached"]["peak_rss_mb"], "trl_peak_rss_mb": res["trl"]["peak_rss_mb"],
        "kdforge_peak_rss_mb": res["kdforge"]["peak_rss_mb"],
        "kdforge_achieved_gflops": round(tps["kdforge"] * per_target / 1e9, 1), "matmul_gflops": round(matmul / 1e9, 1),
        "steps": args.steps, "batch": BATCH, "max_length": MAX_LEN, "threads": torch.get_num_threads(),
        "targets": {k: v["targets"] for k, v in res.items()},
    }))


if __name__ == "__main__":
    main()
