"""A full-vocabulary student and a trimmed one on the same footing: KL(teacher || model) at T=1 over the trimmed
student's kept ids (docs/recipes.md, section 1).

A trimmed student cannot write a dropped id, so `kdforge eval` scores its KL over the kept ids (the teacher's
distribution renormalised over them). This script scores a full-vocabulary student the same way, on the
validation split of --data (answers cut at --max-length tokens, as eval): both sides cut to --trimmed's kept
ids, once on the full student's own tokens and once on the trimmed tokenizer's (mapped to the teacher's ids:
the positions the trimmed student is scored on), besides the ordinary full-vocabulary KL; and the trimmed
student on its own tokens. Every row also gives top-1 agreement and the teacher's mean probability on the
dropped ids (what a kept-ids KL does not see). No timing. Prints one JSON line {row: {kl, top1, tokens,
teacher_dropped_mass}, "protocol": {...}}.
Usage: python benchmarks/kept_ids_kl.py --full DISTILLED_FOLDER --trimmed TRIMMED_FOLDER --data GENERATE_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import TEACHER  # noqa: E402

from kdforge.data.batching import collate  # noqa: E402
from kdforge.data.chat import IGNORE_INDEX, encode_conversation  # noqa: E402
from kdforge.data.formats import load_training_data, select_split  # noqa: E402
from kdforge.distill.losses import divergence  # noqa: E402
from kdforge.models.forward import target_logits  # noqa: E402
from kdforge.models.loading import load_model  # noqa: E402
from kdforge.models.vocab_trim import read_vocab_map  # noqa: E402

# row name -> (which model, which tokenizer encodes the text, measured over the kept ids)
ROWS = {"trimmed_on_trimmed_tokens": ("trimmed", "trimmed", True),
        "full_on_trimmed_tokens_kept_ids": ("full", "trimmed", True),
        "full_on_own_tokens_kept_ids": ("full", "full", True),
        "full_on_own_tokens_full_vocabulary": ("full", "full", False)}


@torch.no_grad()
def score(teacher, model, tok, kept: torch.Tensor, convs: list, text_is_trimmed: bool, model_is_trimmed: bool,
          cut: bool, max_length: int, batch: int = 8) -> dict:
    encs = [encode_conversation(tok, c.messages, max_length) for c in convs]
    sums = {"kl": 0.0, "top1": 0.0, "dropped": 0.0}
    n = 0
    v_t = teacher.config.vocab_size
    for i in range(0, len(encs), batch):
        b = collate(encs[i:i + batch], tok.pad_token_id)
        ids, labels = b["input_ids"], b["labels"]  # (B, T) in tok's ids
        if text_is_trimmed:  # the teacher (and a full student) read the trimmed tokens under teacher ids
            ids = kept[ids]
            labels = torch.where(labels == IGNORE_INDEX, labels, kept[labels.clamp(min=0)])
        t_logits, _ = target_logits(teacher, ids, b["attention_mask"], labels, v_t)  # (N, V)
        if model_is_trimmed:
            m_logits, _ = target_logits(model, b["input_ids"], b["attention_mask"], b["labels"], len(kept))  # (N, K)
        else:
            m_logits, _ = target_logits(model, ids, b["attention_mask"], labels, v_t)  # (N, V)
            if cut:
                m_logits = m_logits[:, kept]  # (N, K): log-softmax over them renormalises
        if cut:
            lp = torch.log_softmax(t_logits.float(), dim=-1)
            sums["dropped"] += float(-torch.expm1(torch.logsumexp(lp[:, kept], dim=-1)).sum())
            t_logits = t_logits[:, kept]
        sums["kl"] += float(divergence(m_logits, t_logits, "forward_kl", chunk_size=1024).sum())
        sums["top1"] += float((m_logits.argmax(-1) == t_logits.argmax(-1)).sum())
        n += m_logits.shape[0]
    return {"kl": round(sums["kl"] / n, 4), "top1": round(sums["top1"] / n, 4), "tokens": n,
            "teacher_dropped_mass": round(sums["dropped"] / n, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", required=True, help="a student with the teacher's whole vocabulary")
    ap.add_argument("--trimmed", required=True, help="a student trimmed from the teacher's vocabulary")
    ap.add_argument("--data", required=True, help="teacher answers with a validation split (a generate folder)")
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    teacher, _ = load_model(TEACHER, device="cpu", dtype="float32")
    models = {"full": load_model(args.full, device="cpu", dtype="float32"),
              "trimmed": load_model(args.trimmed, device="cpu", dtype="float32")}
    kept = read_vocab_map(args.trimmed)
    if kept is None:
        raise SystemExit(f"{args.trimmed} has no vocabulary map: not a trimmed student")
    kept = torch.tensor(kept)
    convs = [c for c in select_split(load_training_data(args.data), "validation") if c.has_answer]
    out: dict = {}
    for name, (which, text, cut) in ROWS.items():
        model, _ = models[which]
        tok = models[text][1]
        out[name] = score(teacher, model, tok, kept, convs, text == "trimmed", which == "trimmed", cut,
                          args.max_length)
        print(f"[kept_ids_kl] {name}: {out[name]}", file=sys.stderr, flush=True)
    out["protocol"] = {"teacher": TEACHER, "full": args.full, "trimmed": args.trimmed, "kept_ids": len(kept),
                       "data": args.data, "validation_conversations": len(convs), "max_length": args.max_length,
                       "kl": "forward KL(teacher || model) at T=1 per answer token; kept-ids rows: both sides' "
                             "logits cut to the kept ids (log-softmax renormalises)"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
