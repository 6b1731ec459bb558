"""Export and quantize: GGUF files for llama.cpp/Ollama (gguf_writer, gguf_tokenizer, gptq, calibration),
round-trip checks (roundtrip), PyTorch weight quantisation (torch_quant), format names (formats).

The stages (`kdforge export`, `kdforge quantize`) are `kdforge.stages.export`; GGUF files run through
`kdforge.runtime` (llama.cpp or transformers' GGUF loader).
"""
