"""Quality and speed measures, computed the same way for every model."""

from __future__ import annotations

import time

import torch


@torch.inference_mode()
def decode_speed(model, tokenizer, prompt_ids: list[int], new_tokens: int, repeats: int = 2,
                 batch: int = 1) -> dict[str, float]:
    """Greedy decoding of ``batch`` copies of one prompt (identical rows: no padding): time to first
    token (prefill + one step) and decode tokens/s after it, batch × (n − 1) / (t(n) − t(1)), each
    the best of ``repeats``."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids] * batch, device=device)  # (B, T)
    attn = torch.ones_like(ids)
    kw = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}

    def timed(n: int) -> float:
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t

    timed(4)  # warm-up: first-call allocations and kernel selection
    ttft = min(timed(1) for _ in range(repeats))
    full = min(timed(new_tokens) for _ in range(repeats))
    return {"ttft_s": ttft, "decode_tokens_per_s": batch * (new_tokens - 1) / max(full - ttft, 1e-9),
            "threads": torch.get_num_threads()}
