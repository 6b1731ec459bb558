"""Typed configs of `kdforge export` and `kdforge quantize` (same conventions as kdforge.config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from kdforge.config import StageConfig
from kdforge.export.gguf_writer import QUANT_NAMES
from kdforge.export.torch_quant import METHODS


class ExportConfig(StageConfig):
    """`kdforge export`: write a model as GGUF (llama.cpp / Ollama) and check the file round-trips."""

    model: str = Field(description="HF folder, .gguf file, or embedded:smollm2-135m-instruct")
    out: str = "artifacts/export"
    to: Literal["gguf"] = "gguf"
    quant: list[str] = Field(default_factory=lambda: ["f16"],
                             description=f"one or more of {', '.join(QUANT_NAMES)}; one file each")
    keep_f16: list[str] = Field(default_factory=list,
                                description="GGUF tensor names or globs kept at f16, e.g. token_embd output")
    allow_fallback: bool = Field(False, description="write tensors whose rows do not divide into blocks as f16 "
                                 "instead of failing")
    pre: str | None = Field(None, description="llama.cpp pre-tokenizer name (default: detected)")
    calibration: str = Field("auto", description="text for calibrated (GPTQ) rounding of q8_0/q4_0 tensors: "
                             "'auto' (the model's own answers to the bundled prompts' training split), a "
                             "`kdforge generate` folder or conversations JSONL, or 'none' (round to nearest)")
    calibration_samples: int = Field(128, gt=0, description="calibration conversations")
    check: bool = Field(True, description="read the file back and compare logits and token ids")
    check_prompts: int = Field(16, gt=0, description="validation prompts in the round-trip check")
    trust_remote_code: bool = False

    @field_validator("quant", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            v = [x for x in v.replace(",", " ").split() if x]
        return v

    @field_validator("quant")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        v = [x.lower() for x in v]
        bad = [x for x in v if x not in QUANT_NAMES]
        if bad or not v:
            raise ValueError(f"unknown GGUF type(s) {bad}; the gguf package writes: {', '.join(QUANT_NAMES)}")
        return list(dict.fromkeys(v))


class QuantizeConfig(StageConfig):
    """`kdforge quantize`: weight quantisation in PyTorch (torchao; bitsandbytes on CUDA), saved to reload."""

    model: str
    out: str = "artifacts/quantize"
    method: Literal[METHODS] = Field("int8", description="int8, int8-dynamic, int4, int8-int4 (torchao); "  # type: ignore[valid-type]
                                     "nf4, bnb-int8 (bitsandbytes, CUDA only)")
    group_size: int = Field(32, gt=0, description="int4 methods: weights per scale")
    check: bool = Field(True, description="measure agreement with the source model and decode speed")
    check_prompts: int = Field(16, gt=0)
    decode_tokens: int = Field(32, gt=1)
    device: str = "auto"
    trust_remote_code: bool = False
