"""Agreement between a teacher and other models on teacher-answer tokens.

One computation for `eval` (the report, per prompt category), the export round trip and the
benchmarks, so all of them measure the same thing the same way: NLL of the teacher's answer tokens,
forward KL(teacher ‖ model) at T=1, top-1 agreement. Per category also the teacher's mean entropy:
where the teacher is nearly certain its soft labels carry little more than the hard answer, so a
low-entropy category teaches a student little beyond plain fine-tuning.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdforge.data.batching import collate
from kdforge.data.chat import EncodedConversation
from kdforge.distill.losses import divergence, hard_ce
from kdforge.models.forward import target_positions
from kdforge.runtime import as_runtime

METRICS = ("nll", "kl", "top1")


@torch.inference_mode()
def agreement_by_category(teacher, models: list, data: list[EncodedConversation], categories: list[str],
                          pad_id: int, vocab: int, batch_size: int = 8) -> dict[str, Any]:
    """Per model: overall and per-category means per answer token; per category: conversations,
    answer tokens and the teacher's mean entropy (nats).

    ``teacher`` and ``models``: runtimes (`kdforge.runtime.CausalLM`, any backend) or loaded
    transformers modules; an entry that is the teacher itself reuses the teacher's logits.
    Returns ``{"models": [{"nll", "kl", "top1", "tokens", "by_category": {cat: {...}}}],
    "categories": {cat: {"conversations", "tokens", "teacher_entropy"}}}``.
    """
    names = sorted(set(categories))
    cat_ids = torch.tensor([names.index(c) for c in categories])  # (E,) category of each conversation
    n_cat = len(names)
    t_rt = as_runtime(teacher)
    runtimes = [t_rt if m is teacher else as_runtime(m) for m in models]
    sums = [{k: torch.zeros(n_cat, dtype=torch.float64) for k in METRICS} for _ in models]
    tokens = torch.zeros(n_cat, dtype=torch.float64)
    entropy = torch.zeros(n_cat, dtype=torch.float64)
    for i in range(0, len(data), batch_size):
        b = collate(data[i:i + batch_size], pad_id)  # (B, T) each, on CPU: every runtime moves them itself
        t_logits = t_rt.target_logits(b["input_ids"], b["attention_mask"], b["labels"], vocab)  # (N, V)
        mask = target_positions(b["labels"])  # (B, T-1)
        targets = b["labels"][:, 1:][mask].to(t_logits.device)  # (N,)
        # Boolean-mask indexing is row-major, so the n-th target row belongs to the n-th True of
        # the (B, T-1) mask: its row index is the conversation within the batch.
        row_conv = mask.nonzero()[:, 0] + i  # (N,)
        row_cat = cat_ids[row_conv]  # (N,)
        tokens.index_add_(0, row_cat, torch.ones(len(row_cat), dtype=torch.float64))
        t_logp = F.log_softmax(t_logits.float(), dim=-1)  # (N, V)
        ent = -(t_logp.exp() * t_logp).sum(-1)  # (N,)
        entropy.index_add_(0, row_cat, ent.double().cpu())
        t_top = t_logits.argmax(-1)  # (N,)
        for s, m in zip(sums, runtimes):
            logits = t_logits if m is t_rt else m.target_logits(b["input_ids"], b["attention_mask"], b["labels"],
                                                                vocab).to(t_logits.device)
            per_row = {"nll": hard_ce(logits, targets),
                       "kl": divergence(logits, t_logits, "forward_kl", chunk_size=1024),
                       "top1": (logits.argmax(-1) == t_top).float()}  # each (N,)
            for k in METRICS:
                s[k].index_add_(0, row_cat, per_row[k].double().cpu())
    total = float(tokens.sum())
    convs = torch.bincount(cat_ids, minlength=n_cat)
    out_models = []
    for s in sums:
        row: dict[str, Any] = {k: float(s[k].sum()) / max(total, 1) for k in METRICS}
        row["tokens"] = int(total)
        row["by_category"] = {c: {k: float(s[k][j]) / max(float(tokens[j]), 1) for k in METRICS}
                              for j, c in enumerate(names)}
        out_models.append(row)
    cats = {c: {"conversations": int(convs[j]), "tokens": int(tokens[j]),
                "teacher_entropy": float(entropy[j]) / max(float(tokens[j]), 1)} for j, c in enumerate(names)}
    return {"models": out_models, "categories": cats}


def agreement(teacher, models: list, data: list[EncodedConversation], pad_id: int, vocab: int,
              batch_size: int = 8) -> list[dict[str, float]]:
    """Per model, over the answer tokens of ``data``: mean NLL of the answer tokens, mean
    KL(teacher ‖ model) per token at T=1, top-1 agreement with the teacher's argmax, and ``tokens``.

    The teacher's logits are computed once per batch and shared by every model.
    """
    res = agreement_by_category(teacher, models, data, ["all"] * len(data), pad_id, vocab, batch_size)
    return [{k: m[k] for k in (*METRICS, "tokens")} for m in res["models"]]
