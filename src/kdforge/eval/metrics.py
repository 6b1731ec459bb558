"""Quality and speed measures, computed the same way for every model."""

from __future__ import annotations

import time

import torch

from kdforge.data.batching import collate
from kdforge.data.chat import EncodedConversation
from kdforge.distill.losses import forward_kl, hard_ce
from kdforge.models.forward import target_logits


@torch.inference_mode()
def agreement(teacher, models: list, data: list[EncodedConversation], pad_id: int, vocab: int,
              batch_size: int = 8) -> list[dict[str, float]]:
    """Per model, over the teacher-answer tokens of ``data``: mean NLL of the answer tokens,
    mean KL(teacher || model) per token (T=1), and top-1 agreement with the teacher's argmax.

    The teacher's logits are computed once per batch and shared by every model.
    """
    sums = [{"nll": 0.0, "kl": 0.0, "top1": 0.0} for _ in models]
    n_total = 0
    device = next(teacher.parameters()).device
    for i in range(0, len(data), batch_size):
        b = {k: v.to(device) for k, v in collate(data[i:i + batch_size], pad_id).items()}
        t_logits, targets = target_logits(teacher, b["input_ids"], b["attention_mask"], b["labels"], vocab)  # (N, V)
        t_top = t_logits.argmax(-1)
        n_total += targets.numel()
        for s, m in zip(sums, models):
            logits = t_logits if m is teacher else target_logits(
                m, b["input_ids"], b["attention_mask"], b["labels"], vocab)[0]
            s["nll"] += float(hard_ce(logits, targets).sum())
            s["kl"] += float(forward_kl(logits, t_logits).sum())
            s["top1"] += float((logits.argmax(-1) == t_top).sum())
    return [{k: v / max(n_total, 1) for k, v in s.items()} | {"tokens": n_total} for s in sums]


@torch.inference_mode()
def decode_speed(model, tokenizer, prompt_ids: list[int], new_tokens: int, repeats: int = 2) -> dict[str, float]:
    """Greedy batch-1 decoding: time to first token and decode tokens/s after it (best of ``repeats``)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    attn = torch.ones_like(ids)
    kw = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}

    def timed(n: int) -> float:
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t

    timed(4)  # warm-up: first-call allocations and kernel selection
    ttft = min(timed(1) for _ in range(repeats))
    full = min(timed(new_tokens) for _ in range(repeats))
    return {"ttft_s": ttft, "decode_tokens_per_s": (new_tokens - 1) / max(full - ttft, 1e-9),
            "threads": torch.get_num_threads()}
