"""Calibration text and input statistics for the export's calibrated rounding (`kdforge.export.gptq`).

The text is either the model's own greedy answers to the bundled prompt set's *training* split
(``auto``: the same kind of text the round-trip check measures, on prompts it never uses) or the
conversations of a `kdforge generate` folder / JSONL file (its training split). Every token of a
conversation is an input to every Linear, so all of them count, prompt and answer alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kdforge.data.chat import EncodedConversation
from kdforge.errors import UserError


def calibration_text(model, tokenizer, spec: str, samples: int, max_length: int = 512) -> list[EncodedConversation]:
    """``samples`` calibration conversations from ``spec`` ('auto', a generate folder or a JSONL file)."""
    if spec == "auto":
        from kdforge.export.roundtrip import answer_data

        return answer_data(model, tokenizer, n=samples, new_tokens=64, split="train")
    from kdforge.data.chat import encode_conversation
    from kdforge.data.formats import load_training_data, select_split

    if not Path(spec).exists():
        raise UserError(f"calibration data {spec} does not exist; pass a `kdforge generate` output folder, a "
                        "JSONL file of conversations, 'auto' (the model's answers to the bundled prompts) or 'none'")
    convs = load_training_data(spec)
    chosen = select_split(convs, "train") or convs  # a file without splits is all training data
    if not chosen:
        raise UserError(f"calibration data {spec} holds no conversations")
    return [encode_conversation(tokenizer, c.messages, max_length) for c in chosen[:samples]]


def _batches(data: list[EncodedConversation], pad_id: int, batch_size: int = 8):
    from kdforge.data.batching import collate

    data = sorted(data, key=lambda e: len(e.input_ids))  # similar lengths together: little padding
    for i in range(0, len(data), batch_size):
        b = collate(data[i:i + batch_size], pad_id)
        yield b["input_ids"], b["attention_mask"]


def linear_for(model, hf_name: str) -> str | None:
    """The Linear module whose *input* statistics calibrate state-dict tensor ``hf_name``.

    A Linear's own weight is calibrated by its own input; a tied embedding, which llama.cpp also uses
    as the output projection, by the output projection's input (as an embedding lookup it is far less
    sensitive: one row per token, no accumulation over a dot product).
    """
    modules = dict(model.named_modules())
    module = hf_name.rsplit(".", 1)[0]
    if isinstance(modules.get(module), torch.nn.Linear):
        return module
    out = model.get_output_embeddings()
    if out is not None and hf_name.endswith("embed_tokens.weight") and \
            out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        return next(n for n, m in modules.items() if m is out)
    return None


def export_hessians(model, tokenizer, spec: str, samples: int, tensors: Sequence[str]) -> tuple[dict[str, torch.Tensor],
                                                                                                   dict[str, Any]]:
    """Input second moments for the state-dict tensors ``tensors``, keyed by those names, and a summary."""
    from kdforge.export.gptq import collect_hessians

    readers = {t: linear_for(model, t) for t in tensors}
    readers = {t: m for t, m in readers.items() if m is not None}
    data = calibration_text(model, tokenizer, spec, samples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    modules = list(dict.fromkeys(readers.values()))
    hessians = collect_hessians(model, _batches(data, pad), modules)
    info = {"source": spec, "conversations": len(data), "tokens": sum(len(e.input_ids) for e in data)}
    return {t: hessians[m] for t, m in readers.items() if m in hessians}, info
