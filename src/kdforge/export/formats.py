"""The output formats kdforge writes, as plain names (no torch import: configs validate against them)."""

from __future__ import annotations

# The quantisation types the `gguf` package can *write* (it can read many more). K-quants and
# i-quants need llama.cpp's `llama-quantize`.
QUANT_NAMES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")

# `kdforge quantize --method`: torchao (CPU and CUDA) and bitsandbytes (CUDA only).
TORCHAO_METHODS = ("int8", "int8-dynamic", "int4", "int8-int4")
BNB_METHODS = ("nf4", "bnb-int8")
METHODS = TORCHAO_METHODS + BNB_METHODS
