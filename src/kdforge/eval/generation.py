"""Batched answers from any model for the task set and the stability probe.

Prompts are rendered with the tokenizer's chat template (as `generate` does), left-padded, and
batched in the order lm-evaluation-harness uses (longest first, ties by the rendered text), so the
same batch composition, and hence the same greedy answers, come out of both paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdforge.data.batching import left_pad
from kdforge.data.chat import render
from kdforge.models.loading import end_of_turn_ids


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


@torch.inference_mode()
def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                   sampling: Sampling | None = None, num_samples: int = 1) -> list[list[str]]:
    """Answers per prompt: ``num_samples`` decoded strings each (cut at the end-of-turn token)."""
    from transformers import GenerationConfig

    sampling = sampling or Sampling()
    if getattr(model, "backend", None) == "llama.cpp":
        return _generate_llama_cpp(model, tokenizer, prompts, max_new_tokens, sampling, num_samples)
    device = next(model.parameters()).device
    stop_ids = end_of_turn_ids(tokenizer, model)
    texts = render_prompts(tokenizer, prompts)
    order = batch_order(tokenizer, texts)
    do_sample = sampling.temperature is not None
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=sampling.temperature if do_sample else None,
        top_p=sampling.top_p if do_sample else None, top_k=0 if do_sample else None,
        num_return_sequences=num_samples, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
    )
    out: list[list[str]] = [[] for _ in prompts]
    # With several samples a prompt is repeated num_samples times inside generate: keep the
    # number of rows per forward pass near batch_size.
    step = max(1, batch_size // num_samples)
    for b, start in enumerate(range(0, len(order), step)):
        idx = order[start:start + step]
        ids = [tokenizer(texts[i], add_special_tokens=False)["input_ids"] for i in idx]
        input_ids, attn = left_pad(ids, tokenizer.pad_token_id)  # (B, T)
        width = input_ids.shape[1]
        if do_sample:
            # One seed per batch: the answers do not depend on what ran before (other models, tasks).
            torch.manual_seed(sampling.seed * 1_000_003 + b)
        gen = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device),
                             generation_config=gen_cfg)  # (B * num_samples, T + new)
        for r, row in enumerate(gen[:, width:].tolist()):
            cut = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
            out[idx[r // num_samples]].append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return out


def _generate_llama_cpp(model, tokenizer, prompts: list[str], max_new_tokens: int, sampling: Sampling,
                        num_samples: int) -> list[list[str]]:
    """`generate_texts` for a `kdforge.eval.llamacpp_model.LlamaCppLM`: one prompt at a time, the same
    rendering, stop tokens and decoding; samples drawn from one seeded generator per prompt."""
    from kdforge.serve.sampling import make_generator

    stop_ids = end_of_turn_ids(tokenizer)
    out: list[list[str]] = []
    for i, text in enumerate(render_prompts(tokenizer, prompts)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        generator = make_generator(sampling.seed * 1_000_003 + i)
        answers = []
        for _ in range(num_samples):
            row = model.generate_ids(ids, max_new_tokens, stop_ids, len(tokenizer), sampling.temperature,
                                     sampling.top_p, generator)
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        out.append(answers)
    return out
