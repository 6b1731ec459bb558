"""Stability: how much a model's sampled answers to the same prompt differ.

For each of a fixed set of prompts, every model samples ``k`` answers (temperature and top-p as
configured, the same seeds for every model). Two measures, both 0 when all answers are identical:

- **answer divergence**: the mean, over prompts and over all pairs of answers to one prompt, of
  the token-level edit distance (Levenshtein: insertions, deletions, substitutions of tokens)
  divided by the longer answer's length. 0: identical answers; 1: no token in place in common.
- **distinct share**: (number of distinct answers after normalisation − 1) / (k − 1), averaged over
  prompts. 0: one answer repeated; 1: every sample different.

Both measure the sampling distribution's spread, not quality: a model that always says the same
wrong thing is perfectly stable.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two token sequences (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def normalized_edit_distance(a: list[int], b: list[int]) -> float:
    """Edit distance / the longer length, in [0, 1]; two empty answers are identical (0)."""
    longest = max(len(a), len(b))
    return edit_distance(a, b) / longest if longest else 0.0


def divergence(samples: list[list[int]]) -> float:
    """Mean normalised edit distance over all pairs of one prompt's samples."""
    pairs = list(combinations(samples, 2))
    return sum(normalized_edit_distance(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0


def distinct_share(answers: list[str]) -> float:
    """(distinct normalised answers − 1) / (k − 1): 0 when all agree, 1 when all differ."""
    if len(answers) < 2:
        return 0.0
    return (len({" ".join(a.lower().split()) for a in answers}) - 1) / (len(answers) - 1)


def stability(answers: list[list[str]], tokenizer) -> dict[str, Any]:
    """``answers[p]``: the k sampled answers to prompt p -> the two measures averaged over prompts.

    Answers are re-tokenised with one tokenizer, so models with the same vocabulary are compared
    on the same token units.
    """
    div, dist = [], []
    for group in answers:
        ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in group]
        div.append(divergence(ids))
        dist.append(distinct_share(group))
    n = max(len(answers), 1)
    return {"divergence": sum(div) / n, "distinct": sum(dist) / n, "per_prompt_divergence": div,
            "prompts": len(answers), "samples": len(answers[0]) if answers else 0}


def pick_prompts(conversations: list, n: int) -> list[dict[str, str]]:
    """``n`` prompts spread over categories: round-robin over categories, each in file order."""
    by_cat: dict[str, list] = {}
    for c in conversations:
        by_cat.setdefault(c.category, []).append(c)
    chosen: list = []
    queues = [list(v) for _, v in sorted(by_cat.items())]
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    out = []
    for c in chosen:
        user = [m["content"] for m in c.prompt_messages if m["role"] == "user"]
        out.append({"id": c.id, "category": c.category, "prompt": user[-1]})
    return out
