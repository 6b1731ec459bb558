"""Agreement between a teacher and other models on teacher-answer tokens.

Shared by `distill` (validation during training) and `eval` (the report), so both measure the
same thing the same way.
"""

from __future__ import annotations

import torch

from kdforge.data.batching import collate
from kdforge.data.chat import EncodedConversation
from kdforge.distill.losses import divergence, hard_ce
from kdforge.models.forward import DEFAULT_PACK_LENGTH, target_logits


@torch.inference_mode()
def agreement(teacher, models: list, data: list[EncodedConversation], pad_id: int, vocab: int,
              batch_size: int = 8) -> list[dict[str, float]]:
    """Per model, over the answer tokens of ``data``: mean NLL of the answer tokens, mean
    KL(teacher ‖ model) per token at T=1, and top-1 agreement with the teacher's argmax.

    The teacher's logits are computed once per batch and shared by every model.
    """
    sums = [{"nll": 0.0, "kl": 0.0, "top1": 0.0} for _ in models]
    n_total = 0
    device = next(teacher.parameters()).device
    for i in range(0, len(data), batch_size):
        b = {k: v.to(device) for k, v in collate(data[i:i + batch_size], pad_id).items()}
        t_logits, targets = target_logits(teacher, b["input_ids"], b["attention_mask"], b["labels"], vocab,
                                           DEFAULT_PACK_LENGTH)  # (N, V)
        t_top = t_logits.argmax(-1)
        n_total += targets.numel()
        for s, m in zip(sums, models):
            logits = t_logits if m is teacher else target_logits(
                m, b["input_ids"], b["attention_mask"], b["labels"], vocab, DEFAULT_PACK_LENGTH)[0]
            s["nll"] += float(hard_ce(logits, targets).sum())
            s["kl"] += float(divergence(logits, t_logits, "forward_kl", chunk_size=1024).sum())
            s["top1"] += float((logits.argmax(-1) == t_top).sum())
    return [{k: v / max(n_total, 1) for k, v in s.items()} | {"tokens": n_total} for s in sums]
