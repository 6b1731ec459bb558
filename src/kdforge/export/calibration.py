"""Calibration text and input statistics for the export's calibrated rounding (`kdforge.export.gptq`).

The text is either the model's own greedy answers to the bundled prompt set's *training* split
(``auto``: the same kind of text the round-trip check measures, on prompts it never uses) or the
conversations of a `kdforge generate` folder / JSONL file (its training split, spread evenly, as
`kdforge student` picks its calibration data). Every token of a
conversation is an input to every Linear, so all of them count, prompt and answer alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kdforge.data.chat import EncodedConversation
from kdforge.errors import UserError


def calibration_ids(model, tokenizer, spec: str, samples: int, max_length: int = 512) -> list[list[int]]:
    """Token ids of ``samples`` calibration conversations from ``spec`` ('auto', a generate folder or a JSONL
    file; files are read as `kdforge student` reads its calibration data)."""
    if spec == "auto":
        from kdforge.export.roundtrip import answer_data

        return [e.input_ids for e in answer_data(model, tokenizer, n=samples, new_tokens=64, split="train")]
    from kdforge.data.calibration import calibration_batches

    if not Path(spec).exists():
        raise UserError(f"calibration data {spec} does not exist; pass a `kdforge generate` output folder, a "
                        "JSONL file of conversations, 'auto' (the model's answers to the bundled prompts) or 'none'")
    return [ids[0].tolist() for ids in calibration_batches(tokenizer, spec, samples, max_length)]


def _batches(data: list[list[int]], pad_id: int, batch_size: int = 8):
    from kdforge.data.batching import collate

    data = sorted(data, key=len)  # similar lengths together: little padding
    for i in range(0, len(data), batch_size):
        # Right padding (collate), masked out of the statistics: real tokens keep their positions.
        b = collate([EncodedConversation(ids, ids) for ids in data[i:i + batch_size]], pad_id)
        yield b["input_ids"], b["attention_mask"]


def calibrated_names(model, quants: Sequence[str], keep_f16: Sequence[str] = (),
                     allow_fallback: bool = False, pure: bool = False) -> list[str]:
    """State-dict names of the tensors that files of types ``quants`` write as Q8_0/Q4_0 (calibration targets).
    Tensors trained on that type's grid (quantisation-aware distillation) are written as they are: none of
    them needs calibrating."""
    from kdforge.export.gguf_writer import plan_tensors
    from kdforge.export.gptq import CALIBRATED_TYPES

    record = getattr(model.config, "kdforge_quant_aware", None)
    record = record if isinstance(record, dict) else {}

    def on_trained_grid(quant: str) -> set[str]:  # the tensors a file of this type writes as they are
        return set(record.get("tensors", [])) if record.get("grid") == quant else set()

    return sorted({t.hf_name for q in quants if q in CALIBRATED_TYPES
                   for t in plan_tensors(model, q, keep_f16, allow_fallback, pure)
                   if t.qtype_name in CALIBRATED_TYPES and t.hf_name not in on_trained_grid(q)})


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
    data = calibration_ids(model, tokenizer, spec, samples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    modules = list(dict.fromkeys(readers.values()))
    hessians = collect_hessians(model, _batches(data, pad), modules)
    info = {"source": spec, "conversations": len(data), "tokens": sum(map(len, data))}
    return {t: hessians[m] for t, m in readers.items() if m in hessians}, info
