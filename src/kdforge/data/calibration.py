"""Calibration text: what the student stage measures importance on and the export calibrates rounding on."""

from __future__ import annotations

from kdforge.config import ConfigError
from kdforge.data.chat import encode_conversation, encode_prompt
from kdforge.data.formats import load_training_data, select_split
from kdforge.data.prompts import BUNDLED, load_prompt_set


def calibration_batches(tok, spec: str, samples: int, max_length: int) -> list:
    """Evenly spread conversations of the train split, as (1, T) id tensors (answers included if present)."""
    import torch

    convs = select_split(load_prompt_set(BUNDLED) if spec == BUNDLED else load_training_data(spec), "train")
    if not convs:
        raise ConfigError(f"calibration data {spec} has no train records")
    step = max(1, len(convs) // samples)
    out = []
    for c in convs[::step][:samples]:
        ids = (encode_conversation(tok, c.messages, max_length).input_ids if c.has_answer
               else encode_prompt(tok, c.prompt_messages)[:max_length])
        out.append(torch.tensor([ids]))
    return out
