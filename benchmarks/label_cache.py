"""The soft-label cache on the embedded teacher's demo data: size, speed, and loss fidelity.

Labels teacher-answered conversations at k=64 and prints one JSON line:
  bytes_per_token      cache bytes on disk (shards, hidden states off) per target token
  label_tokens_per_s   target tokens labelled per second (teacher forward + top-k + writing)
  loss_abs_diff        mean |forward KL from the cache − forward KL from the live teacher| over the
                       same batches (T=1), with loss_rel_diff relative to it and loss_abs_diff_t2 at T=2,
                       for the undistilled 8-layer student or --student
Usage: python benchmarks/label_cache.py [--data GENERATE_DIR] [--train 96]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import TEACHER, layer_student, teacher_answers  # noqa: E402

from kdforge.data.batching import shared_vocab_size  # noqa: E402
from kdforge.data.formats import load_training_data, select_split  # noqa: E402
from kdforge.distill.losses import divergence, soft_divergence  # noqa: E402
from kdforge.distill.teacher_source import CachedTeacher, LiveTeacher, TeacherRequest  # noqa: E402
from kdforge.distill.trainer import encode_dataset, make_batch  # noqa: E402
from kdforge.models.forward import target_logits  # noqa: E402
from kdforge.models.loading import load_model  # noqa: E402
from kdforge.softlabels.reader import SoftLabelCache  # noqa: E402
from kdforge.stages.label import LabelConfig  # noqa: E402
from kdforge.stages.label import run as run_label  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--train", type=int, default=96)
    ap.add_argument("--student", help="student to score (default: the undistilled 8-layer cut)")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "kdforge" / "bench"))
    args = ap.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else teacher_answers(root, args.train, 16, max_new_tokens=96)
    cache_dir = root / "labels-k64"
    m = run_label(LabelConfig(teacher=TEACHER, data=str(data), out=str(cache_dir), top_k=64, split="train"),
                  overwrite=True)
    cache = SoftLabelCache(cache_dir)
    teacher, tok = load_model(TEACHER)
    student, _ = load_model(args.student or str(layer_student(root)))
    vocab = shared_vocab_size(tok, teacher, student)
    live, cached = LiveTeacher(teacher, vocab), CachedTeacher(cache)
    examples, convs = encode_dataset(tok, select_split(load_training_data(data), "train"), 256)
    row_of = cache.rows()
    logits_only = TeacherRequest()  # the signal at the target positions, no hidden states or attention
    diffs, dense_total, diffs_t2 = [], [], []
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            b = make_batch(examples[i:i + 8], [row_of[c.id] for c in convs[i:i + 8]], tok.pad_token_id)
            s_logits, _ = target_logits(student, b["input_ids"], b["attention_mask"], b["labels"], vocab)
            dense = divergence(s_logits, live(b, logits_only).signal, "forward_kl").mean()
            sparse = soft_divergence(s_logits, cached(b, logits_only).signal, "forward_kl", 1.0).mean()
            diffs.append(float((dense - sparse).abs()))
            # At T=2 (the default training temperature) the cache's top-k are re-tempered, the tail estimated.
            d2 = divergence(s_logits, live(b, logits_only).signal, "forward_kl", 2.0).mean()
            s2 = soft_divergence(s_logits, cached(b, logits_only).signal, "forward_kl", 2.0).mean()
            diffs_t2.append(float((d2 - s2).abs()))
            dense_total.append(float(dense))
    loss_abs_diff = sum(diffs) / len(diffs)
    print(json.dumps({
        "bytes_per_token": m["bytes_per_target_token"], "label_tokens_per_s": m["label_tokens_per_s"],
        "loss_abs_diff": round(loss_abs_diff, 5),
        "loss_rel_diff": round(loss_abs_diff / (sum(dense_total) / len(dense_total)), 5),
        "mean_forward_kl_live": round(sum(dense_total) / len(dense_total), 4),
        "loss_abs_diff_t2": round(sum(diffs_t2) / len(diffs_t2), 5), "student": args.student or "8-layer cut", "k": 64,
        "targets": m["targets"], "batches": len(diffs), "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
