"""Two small, unrelated tokenizers trained in the test run (no hub, no files): a byte-level BPE like
SmolLM2's/Qwen2's and a SentencePiece-style BPE with byte fallback like Gemma's, each with its own chat
template and end-of-turn token, so cross-tokenizer code meets the real kinds of mismatch."""

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "def add(a, b):\n    return a + b\n",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "2 + 2 = 4, 12 * 3 = 36, and 100 / 4 = 25.",
    "中文的分词和英文不一样。北京是中国的首都。",
    "Knowledge distillation trains a small student to imitate a large teacher.",
    "Hello! How can I help you today? I'm happy to explain.",
    "Water boils at 100 degrees Celsius at sea level.",
] * 4

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_LIKE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
              "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def byte_level_bpe(vocab_size: int = 400, corpus: list[str] = CORPUS) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE with ChatML specials (ids 0-2), like SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=CHATML)


def sentencepiece_bpe(vocab_size: int = 300, corpus: list[str] = CORPUS) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (▁ for spaces, <0xAB> byte fallback, no dummy prefix) with Gemma-like turns."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    # Byte-fallback pieces are ordinary vocabulary (ids after the specials), not added tokens.
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in trained if p not in specials]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, byte_fallback=True,
                               unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>", chat_template=GEMMA_LIKE)
    hf.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return hf
