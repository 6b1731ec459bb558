"""Batched answers from any runtime for the task set and the stability probe.

Prompts are rendered with the tokenizer's chat template (as `generate` does), left-padded, and
batched in the order lm-evaluation-harness uses (longest first, ties by the rendered text), so the
same batch composition, and hence the same greedy answers, come out of both paths.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdforge.data.chat import render
from kdforge.runtime import as_runtime
from kdforge.runtime.sampling import SamplingParams, make_generator


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is None; else temperature + top-p sampling seeded by ``seed``."""

    temperature: float | None = None
    top_p: float = 1.0
    seed: int = 0


def render_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """One user turn each, followed by the assistant generation prompt."""
    return [render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]


def batch_order(tokenizer, texts: list[str]) -> list[int]:
    """Indices longest-first, ties broken by text: lm-eval's HFLM sorts generate requests this way."""
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return sorted(range(len(texts)), key=lambda i: (-lengths[i], texts[i]))


def sequence_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of answer ``sample`` to prompt number ``prompt`` (in the caller's order): every sampled
    sequence has its own generator, so its tokens depend on neither the batch it ran in nor the backend."""
    return (seed * 1_000_003 + prompt) * 10_007 + sample


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                   sampling: Sampling | None = None, num_samples: int = 1) -> list[list[str]]:
    """Answers per prompt: ``num_samples`` decoded strings each (cut at the end-of-turn token).

    ``model``: a runtime (`kdforge.runtime.CausalLM`) or a loaded transformers module. Greedy, or
    sampled by the one sampler of every backend (`kdforge.runtime.sampling.sample_token`) with one
    generator per (prompt, sample) seeded by `sequence_seed`.
    """
    lm = as_runtime(model, tokenizer)
    sampling = sampling or Sampling()
    params = SamplingParams(max_tokens=max_new_tokens, temperature=sampling.temperature or 0.0, top_p=sampling.top_p)
    texts = render_prompts(tokenizer, prompts)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    # Each prompt's samples side by side (as num_return_sequences would lay them out); with several
    # samples keep the number of rows per forward pass near batch_size.
    rows = [(i, j) for i in batch_order(tokenizer, texts) for j in range(num_samples)]
    generators = None if params.greedy else [make_generator(sequence_seed(sampling.seed, i, j)) for i, j in rows]
    answers = lm.generate([ids[i] for i, _ in rows], params, lm.stop_ids(tokenizer), generators,
                          batch_size=max(1, batch_size // num_samples) * num_samples, vocab=len(tokenizer))
    out: list[list[str]] = [[] for _ in prompts]
    for (i, _), answer in zip(rows, answers):
        out[i].append(tokenizer.decode(answer, skip_special_tokens=True).strip())
    return out
