"""On-disk format of the soft-label cache (see docs/soft-label-cache.md).

Per target token (a position whose next token is an assistant token), at capture temperature T_c:
    top1_logprob  float16            log p of the most likely token
    topk_ids      uint16 | int32     the k most likely token ids, most likely first
    topk_codes    uint8 (k-1)        ranks 1..k-1: code = round(255 * sqrt(Δ / DELTA_MAX)),
                                     Δ = top1_logprob − logprob ≥ 0 (clipped at DELTA_MAX)
    tail_logmass  float16            log(1 − Σ top-k p): the probability outside the top-k
The square-root code spends its resolution where probability is: near the top-1 the step is a few
thousandths of a nat, 4 nats below it ~0.09. At k=64 with a vocabulary under 65,536 tokens that is
2 + 128 + 63 + 2 = 195 bytes per target token.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

FORMAT_VERSION = 1
DELTA_MAX = 32.0
LOG_TAIL_FLOOR = -30.0  # log of a tail mass of ~1e-13: below that it is zero for every purpose


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def encode_topk(logprobs: torch.Tensor, k: int, vocab_size: int) -> dict[str, np.ndarray]:
    """(N, V) log-probabilities -> the compact per-token arrays of the format."""
    top_lp, top_ids = logprobs.float().topk(k, dim=-1)  # (N, k), sorted descending
    return encode_topk_values(top_lp, top_ids, vocab_size)


def encode_topk_values(top_lp: torch.Tensor, top_ids: torch.Tensor, vocab_size: int) -> dict[str, np.ndarray]:
    """The k likeliest tokens' (N, k) fp32 log-probabilities (descending) and ids -> the format's arrays, as
    :func:`encode_topk` makes them: the tail is log(1 - their mass), so top-k values from elsewhere (a
    served teacher's prompt_logprobs) give the same bytes as the whole distribution would."""
    top_lp = top_lp.float()
    delta = (top_lp[:, :1] - top_lp[:, 1:]).clamp(0, DELTA_MAX)  # (N, k-1)
    codes = torch.round(255 * torch.sqrt(delta / DELTA_MAX)).to(torch.uint8)
    mass = top_lp.double().exp().sum(-1)
    tail = torch.log1p(-mass.clamp(max=1 - 1e-13)).clamp(min=LOG_TAIL_FLOOR)
    return {"top1_logprob": top_lp[:, 0].numpy().astype(np.float16),
            "topk_ids": top_ids.numpy().astype(id_dtype(vocab_size)),
            "topk_codes": codes.numpy(),
            "tail_logmass": tail.float().numpy().astype(np.float16)}


def decode_topk(top1: np.ndarray, codes: np.ndarray) -> torch.Tensor:
    """Per-token arrays -> (N, k) log-probabilities of the top-k tokens (float32)."""
    t1 = torch.from_numpy(np.asarray(top1, dtype=np.float32))[:, None]  # (N, 1)
    c = torch.from_numpy(np.asarray(codes, dtype=np.float32)) / 255  # (N, k-1)
    return torch.cat([t1, t1 - DELTA_MAX * c * c], dim=-1)


def bytes_per_target(k: int, vocab_size: int) -> int:
    return 2 + k * id_dtype(vocab_size).itemsize + (k - 1) + 2


def tokenizer_fingerprint(tok) -> dict[str, str]:
    """Hashes that change whenever the tokenisation or the chat formatting of the data would."""
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode()
    template = (tok.chat_template or "").encode() if isinstance(tok.chat_template, str | None) else \
        json.dumps(tok.chat_template, sort_keys=True).encode()
    specials = json.dumps({"bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token}).encode()
    return {"vocab_sha256": hashlib.sha256(vocab).hexdigest(),
            "chat_template_sha256": hashlib.sha256(template).hexdigest(),
            "special_tokens_sha256": hashlib.sha256(specials).hexdigest(),
            "vocab_size": str(len(tok))}
