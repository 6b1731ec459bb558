"""Model loading (HF folder, GGUF file, the embedded teacher) and student building."""
