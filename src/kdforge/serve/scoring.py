"""Prompt log-probabilities: what the engines compute in one forward pass, and vLLM's shapes for them.

A teacher behind a server is asked for the log-probabilities of *its prompt's own tokens* (vLLM's
``prompt_logprobs: k``, and lm-evaluation-harness's ``echo: true, logprobs: 1`` loglikelihood requests).
An engine answers with one :class:`PromptScores` per prompt, computed from the model's logits at every
prompt position in one forward pass (fp32 ``log_softmax``, as kdforge's own labelling does); this module
turns them into

* vLLM's ``prompt_logprobs``: ``None`` for the first token (nothing predicts it), then per position a dict
  ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` holding the prompt's actual token first and
  then the k likeliest (``rank`` 1..k; the actual token's rank counts the tokens at least as likely,
  itself included, as vLLM counts it);
* the entries the text completions (legacy) ``logprobs`` shape is rendered from (see
  :class:`kdforge.serve.streaming.CompletionLogprobTracker`), with ``None`` for the first prompt token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdforge.serve.detokenize import TokenPieces

# JSON has no -inf: vLLM and OpenAI report -9999.0 for a token the model rules out.
LOGPROB_FLOOR = -9999.0
# Rows of logits (rows x vocabulary, fp32) scored at once: 16M floats (64 MiB) bounds the memory of one
# scoring step whatever the prompt's length (an 8k-token prompt over a 152k vocabulary would be 5 GB whole).
SCORE_CHUNK_ELEMENTS = 1 << 24


class ScoringUnavailable(ValueError):
    """The engine cannot compute prompt log-probabilities (a backend without an all-positions pass)."""


@dataclass
class PromptScores:
    """One prompt of L tokens under the model (every tensor on the CPU).

    Row i (0 <= i < L-1) is prompt position i+1: how likely the model found ``prompt[i+1]`` after
    ``prompt[:i+1]``.
    """

    token_ids: list[int]  # the prompt, (L,)
    token_logprobs: torch.Tensor  # (L-1,) fp32: log p(prompt[i+1] | prompt[:i+1])
    ranks: torch.Tensor  # (L-1,) long: 1 + tokens strictly likelier than prompt[i+1] (ties count: vLLM's >=)
    top_logprobs: torch.Tensor  # (L-1, k) fp32, descending
    top_ids: torch.Tensor  # (L-1, k) long
    next_logits: torch.Tensor  # (V,) fp32 logits after the last prompt token: the first generated token's


def floor(value: float) -> float:
    """A log-probability JSON can carry: NaN (a broken model) and -inf become :data:`LOGPROB_FLOOR`."""
    return max(value, LOGPROB_FLOOR) if value == value else LOGPROB_FLOOR


def score_rows(logits: torch.Tensor, targets: torch.Tensor, top: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, V) logits and the (n,) token that followed each row -> the target's log-probability (n,), its
    rank (n,), and the ``top`` likeliest tokens' log-probabilities (n, k) and ids (n, k); fp32 throughout."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    chosen = logp.gather(1, targets[:, None].to(logp.device))  # (n, 1)
    ranks = (logp >= chosen).sum(dim=1)  # (n,): the token itself counts, so >= 1 (0 only for a NaN row)
    k = min(top, logp.shape[1])
    values, ids = logp.topk(k, dim=-1) if k > 0 else (logp.new_zeros(len(logp), 0),
                                                       torch.zeros(len(logp), 0, dtype=torch.long))
    return chosen[:, 0].cpu(), ranks.cpu(), values.cpu(), ids.cpu()


def scores_from_rows(prompts: list[list[int]], rows: torch.Tensor, top: int, vocab: int,
                     project: Callable[[torch.Tensor], torch.Tensor]) -> list[PromptScores]:
    """Score prompts whose positions' hidden states (or logits) are ``rows``: (sum of L, ...), prompt by
    prompt, every position of each (the last one's row gives :attr:`PromptScores.next_logits`).

    ``project`` maps a slice of rows to (n, ``vocab``) logits (the output projection, or the identity when
    the rows are logits already), :data:`SCORE_CHUNK_ELEMENTS` at a time, so memory stays bounded.
    """
    lengths = [len(p) for p in prompts]
    targets = torch.tensor([t for p in prompts for t in [*p[1:], 0]], dtype=torch.long)  # last: a placeholder
    last = set((torch.tensor(lengths).cumsum(0) - 1).tolist())  # rows after each prompt's final token
    parts: list[tuple[torch.Tensor, ...]] = []
    nexts: list[torch.Tensor] = []
    start, step = 0, max(1, SCORE_CHUNK_ELEMENTS // max(1, vocab))
    while start < len(rows):
        logits = project(rows[start:start + step]).float()  # (n, V)
        parts.append(score_rows(logits, targets[start:start + len(logits)], top))
        # Copied: a view would keep the whole (n, V) chunk alive.
        nexts += [logits[r - start].to("cpu", copy=True) for r in range(start, start + len(logits)) if r in last]
        start += len(logits)
    chosen, ranks, values, ids = (torch.cat([p[i] for p in parts]) for i in range(4))
    out, offset = [], 0
    for prompt, n, nxt in zip(prompts, lengths, nexts):
        keep = slice(offset, offset + n - 1)  # the last row predicts the answer, not a prompt token
        out.append(PromptScores(list(prompt), chosen[keep], ranks[keep], values[keep], ids[keep], nxt))
        offset += n
    return out


# ---- vLLM's and the legacy shapes ------------------------------------------------------------------------
def vllm_prompt_logprobs(scores: PromptScores, top: int, pieces: TokenPieces) -> list[dict | None]:
    """vLLM's ``prompt_logprobs`` of one prompt: None, then per position {token id: {logprob, rank,
    decoded_token}} with the actual token first and the ``top`` likeliest after it (a token in both appears
    once, first)."""
    out: list[dict | None] = [None]
    lps, ranks = scores.token_logprobs.tolist(), scores.ranks.tolist()
    top_lps, top_ids = scores.top_logprobs[:, :top].tolist(), scores.top_ids[:, :top].tolist()
    for i, token in enumerate(scores.token_ids[1:]):
        entry = {str(token): {"logprob": floor(lps[i]), "rank": ranks[i], "decoded_token": pieces(token)[0]}}
        for r, (tid, lp) in enumerate(zip(top_ids[i], top_lps[i]), start=1):
            key = str(tid)
            if key not in entry:
                entry[key] = {"logprob": floor(lp), "rank": r, "decoded_token": pieces(tid)[0]}
        out.append(entry)
    return out


def prompt_entries(scores: PromptScores, top: int, pieces: TokenPieces) -> list[dict]:
    """The prompt's tokens as logprob entries (the engine's generated-token entry shape: token, logprob,
    bytes, id, top_logprobs), the first with ``logprob`` and ``top_logprobs`` None; for ``echo``."""
    def entry(tid: int, lp: float | None) -> dict:
        text, raw = pieces(tid)
        return {"token": text, "logprob": lp, "bytes": raw, "id": tid}

    first = scores.token_ids[0]
    out = [{**entry(first, None), "top_logprobs": None}]
    lps = scores.token_logprobs.tolist()
    top_lps, top_ids = scores.top_logprobs[:, :top].tolist(), scores.top_ids[:, :top].tolist()
    for i, token in enumerate(scores.token_ids[1:]):
        alternatives = [entry(t, floor(v)) for t, v in zip(top_ids[i], top_lps[i])]
        out.append({**entry(token, floor(lps[i])), "top_logprobs": alternatives})
    return out
