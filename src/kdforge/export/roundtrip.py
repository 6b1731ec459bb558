"""Round-trip checks for an exported or quantised model: does it still compute what the source did?

- Logits: the file is read back (GGUF through transformers' own GGUF loader, which dequantises and
  un-permutes) and run on a validation text next to the source model. Reported: the largest
  absolute logit difference, top-1 agreement with the source's argmax, mean NLL of the text's next
  tokens and its change, and KL(source ‖ exported) per token, with the same definitions as
  `kdforge.scoring.agreement` (which computes the last three).
- Tokenizer: the tokenizer read back from the file must give the source tokenizer's ids on a mixed
  Unicode text (English, Chinese, code, emoji, whitespace runs, special tokens).
- llama.cpp (when `llama-cpp-python` is installed): the same two checks with llama.cpp itself, the
  runtime the file is for.

Two validation texts, from the bundled prompt set's validation split (every k-th prompt, so every
category and both languages appear), each rendered with the chat template as a user turn:

- ``answers``: each prompt followed by the source model's own greedy answer (48 tokens at most);
  the answer tokens are the targets. Top-1 agreement here says how often the exported model would
  pick the token the source generated, which is what a chat user sees. The acceptance bars (f16:
  100%, q8_0: >= 99%) apply to this set.
- ``prompt_text``: the chat-formatted prompts alone, every token a target. Predicting a user's
  prompt is high-entropy (many near-ties between candidates), so top-1 agreement is lower here
  for the same weights; reported for completeness.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdforge.data.batching import left_pad
from kdforge.data.chat import EncodedConversation
from kdforge.distill.losses import divergence, hard_ce

# English, Chinese, code, emoji (with a skin-tone modifier and a ZWJ sequence), accented letters,
# runs of spaces, tabs and newlines, digits, and special tokens in the middle of text. The text is in
# Unicode NFC: GGUF has no normalizer, so a tokenizer that normalizes (Qwen2's applies NFC) tokenizes
# *decomposed* text differently once exported; that case is probed separately (`UNNORMALIZED_TEXT`).
MIXED_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?\n"
    "你好，世界！今天天气很好，我们去公园散步吧。知识蒸馏把大模型压缩成小模型。\n"
    "def fizzbuzz(n: int) -> str:\n"
    "    return 'Fizz' * (n % 3 == 0) + 'Buzz' * (n % 5 == 0) or str(n)  # 12345\n"
    "\tif x  !=  y:\t\ty += 1;    // 注释\n\n\n"
    "Emoji: 😀🚀👍🏽 👩\u200d💻 ❤️  café naïve — “quotes” «guillemets» ¿qué? Ünïcödé\n"
    "    trailing spaces    \n"
    "<|im_start|>assistant\nOK<|im_end|>"
)
UNNORMALIZED_TEXT = "Cafe\u0301 nai\u0308ve A\u030a \uff21\uff22\uff23 \u2460"  # decomposed accents, fullwidth


def _prompts(n: int, split: str = "validation"):
    from kdforge.data.formats import select_split
    from kdforge.data.prompts import BUNDLED, load_prompt_set

    chosen = select_split(load_prompt_set(BUNDLED), split)
    step = max(1, len(chosen) // n)
    return chosen[::step][:n]  # every k-th: all categories, English and Chinese


def validation_data(tokenizer, n: int = 16, max_length: int = 256) -> list[EncodedConversation]:
    """Prompt text: ``n`` bundled validation prompts, chat-formatted, every token a target."""
    from kdforge.data.chat import encode_prompt

    out = []
    for conv in _prompts(n):
        ids = encode_prompt(tokenizer, conv.prompt_messages)[:max_length]
        out.append(EncodedConversation(ids, list(ids)))  # labels = ids: every next token is a target
    return out


@torch.inference_mode()
def answer_data(model, tokenizer, n: int = 16, new_tokens: int = 48, batch_size: int = 16,
                split: str = "validation") -> list[EncodedConversation]:
    """Answers: the same prompts followed by ``model``'s own greedy answer; only answer tokens are targets.

    Top-1 agreement here is the share of answer positions where the other model would have picked the
    source's token (teacher-forced): how often its greedy output would start to differ.
    ``split="train"`` gives calibration text for the export's calibrated rounding, disjoint from the
    validation prompts its checks use.
    """
    from kdforge.data.chat import IGNORE_INDEX, encode_prompt
    from kdforge.models.loading import end_of_turn_ids

    device = next(model.parameters()).device
    stop = set(end_of_turn_ids(tokenizer, model))
    prompts = [encode_prompt(tokenizer, c.prompt_messages) for c in _prompts(n, split)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        ids, attn = left_pad(batch, pad)  # (B, W)
        width = ids.shape[1]
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=sorted(stop))  # (B, W + new)
        for j, p in enumerate(batch):
            new = gen[j, width:].tolist()
            cut = next((k + 1 for k, t in enumerate(new) if t in stop), len(new))  # keep the end-of-turn token
            answer = new[:cut]
            out.append(EncodedConversation(p + answer, [IGNORE_INDEX] * len(p) + answer))
    return out


def validation_sets(model, tokenizer, n: int = 16, new_tokens: int = 48) -> dict[str, list[EncodedConversation]]:
    """The two validation texts every round trip reports: the source's answers, and the prompt text."""
    return {"answers": answer_data(model, tokenizer, n, new_tokens), "prompt_text": validation_data(tokenizer, n)}


def tokenizer_texts(tokenizer) -> list[str]:
    """The mixed text alone and inside a chat-formatted conversation (if the tokenizer has a template)."""
    texts = [MIXED_TEXT]
    if tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": MIXED_TEXT}, {"role": "assistant", "content": "好的 👍 OK."}], tokenize=False))
    return texts


def normalizer_probe(source_tok, other_tok) -> dict[str, Any]:
    """Informational: the source's normalizer (GGUF cannot carry one) and whether un-normalized text
    still tokenizes the same."""
    import json

    norm = json.loads(source_tok.backend_tokenizer.to_str()).get("normalizer")
    same = source_tok(UNNORMALIZED_TEXT)["input_ids"] == other_tok(UNNORMALIZED_TEXT)["input_ids"]
    return {"source_normalizer": (norm or {}).get("type"), "unnormalized_text_match": same}


def compare_ids(source: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """Whether two tokenizations agree; the first difference if not."""
    for t, (a, b) in enumerate(zip(source, other)):
        if a != b:
            i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return {"match": False, "text": t, "position": i, "source": a[i:i + 8], "exported": b[i:i + 8],
                    "source_len": len(a), "exported_len": len(b)}
    return {"match": True, "tokens": sum(len(a) for a in source)}


def logits_agreement(ref: list[torch.Tensor], other: list[torch.Tensor], data: list[EncodedConversation],
                     vocab: int) -> dict[str, float]:
    """Agreement from per-sequence logits, each (T, V), at the target positions of ``data``: max |Δlogit|,
    top-1 agreement, NLL (and its change), KL(source ‖ other) per token, as kdforge.scoring.agreement.

    Used where the other model is not a torch module (llama.cpp) and for the max difference.
    """
    from kdforge.data.chat import IGNORE_INDEX

    nll_ref = nll = kl = top1 = 0.0
    max_diff = 0.0
    n = 0
    for r, o, e in zip(ref, other, data):
        labels = torch.tensor(e.labels[1:])
        keep = labels != IGNORE_INDEX  # position t predicts token t+1
        if not keep.any():
            continue
        r, o = r[:-1][keep, :vocab].float(), o[:-1][keep, :vocab].float()  # (N, V)
        targets = labels[keep]
        max_diff = max(max_diff, float((r - o).abs().max()))
        nll_ref += float(hard_ce(r, targets).sum())
        nll += float(hard_ce(o, targets).sum())
        kl += float(divergence(o, r, "forward_kl", chunk_size=1024).sum())
        top1 += float((r.argmax(-1) == o.argmax(-1)).sum())
        n += targets.numel()
    n = max(n, 1)
    return {"max_abs_diff": max_diff, "top1": top1 / n, "nll_source": nll_ref / n, "nll": nll / n,
            "nll_delta": (nll - nll_ref) / n, "kl": kl / n, "tokens": n}


@torch.inference_mode()
def torch_logits(model, data: list[EncodedConversation]) -> list[torch.Tensor]:
    """Full logits per sequence, batch 1 (no padding), (T, V) each."""
    device = next(model.parameters()).device
    return [model(torch.tensor([e.input_ids], device=device)).logits[0].float().cpu() for e in data]


Sets = dict[str, list[EncodedConversation]]
Logits = dict[str, list[torch.Tensor]]


def source_logits(model, sets: Sets) -> Logits:
    return {k: torch_logits(model, v) for k, v in sets.items()}


def model_report(source, other, sets: Sets, vocab: int, ref: Logits | None = None) -> dict[str, dict[str, float]]:
    """Per validation set: logit comparison of two torch models (agreement + max |Δlogit|)."""
    from kdforge.scoring import agreement

    ref = ref if ref is not None else source_logits(source, sets)
    out = {}
    for name, data in sets.items():
        fig = logits_agreement(ref[name], torch_logits(other, data), data, vocab)
        # The same quality figures through the shared scorer (what `kdforge eval` reports).
        q_src, q_oth = agreement(source, [source, other], data, pad_id=0, vocab=vocab)
        fig |= {"agreement_nll": q_oth["nll"], "agreement_kl": q_oth["kl"], "agreement_top1": q_oth["top1"],
                "agreement_nll_source": q_src["nll"]}
        out[name] = fig
    return out


def gguf_roundtrip(source, tokenizer, gguf_path: str | Path, sets: Sets, ref: Logits | None = None,
                   with_llama_cpp: bool = True) -> dict[str, Any]:
    """Read ``gguf_path`` back with transformers (and llama.cpp when installed) and compare with ``source``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    vocab = len(tokenizer)
    ref = ref if ref is not None else source_logits(source, sets)
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    report: dict[str, Any] = {"validation_sequences": {k: len(v) for k, v in sets.items()},
                              "transformers": model_report(source, reloaded, sets, vocab, ref)}
    del reloaded
    texts = tokenizer_texts(tokenizer)
    src_ids = [tokenizer(t)["input_ids"] for t in texts]
    gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    report["tokenizer"] = compare_ids(src_ids, [gguf_tok(t)["input_ids"] for t in texts])
    report["tokenizer"]["normalizer"] = normalizer_probe(tokenizer, gguf_tok)
    if with_llama_cpp:
        from kdforge.runtime import llama_cpp_available

        if llama_cpp_available():
            report["llama_cpp"] = llama_cpp_roundtrip(path, tokenizer, sets, ref, texts, src_ids)
        else:
            report["llama_cpp"] = {"skipped": "llama-cpp-python is not installed (pip install 'kdforge[llamacpp]')"}
    return report


def llama_cpp_roundtrip(path: Path, tokenizer, sets: Sets, ref: Logits, texts: list[str],
                        src_ids: list[list[int]]) -> dict[str, Any]:
    """Tokenizer ids and logits from llama.cpp itself (the runtime the file is for), against the source."""
    from kdforge.runtime import LLAMA_CPP, open_model

    # The source's tokenizer renders nothing here: llama.cpp tokenizes the texts itself (add_bos as the
    # file's tokenizer.ggml.add_bos_token says, as the HF tokenizer follows its own flag).
    with open_model(str(path), backend=LLAMA_CPP) as lm:
        out: dict[str, Any] = {"tokenizer": compare_ids(src_ids, [lm.tokenize(t) for t in texts]), "logits": {}}
        for name, data in sets.items():
            logits = [lm.sequence_logits(e.input_ids) for e in data]  # (T, V) each
            out["logits"][name] = logits_agreement(ref[name], logits, data, len(tokenizer))
    return out
