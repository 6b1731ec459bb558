"""Quantize and export: GGUF files for llama.cpp/Ollama (gguf_writer, gguf_tokenizer), round-trip checks
(roundtrip), PyTorch weight quantisation (torch_quant) and a llama.cpp runtime wrapper (llamacpp).

The stage runners (`kdforge export`, `kdforge quantize`) live in `kdforge.export.stage`.
"""
