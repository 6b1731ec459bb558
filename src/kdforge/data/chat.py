"""Conversations -> token ids + a label mask that covers assistant tokens only.

The mask is found with the tokenizer's own chat template, so it works for any template, with or
without a ``{% generation %}`` marker: for every assistant turn we render the conversation up to
that turn with the generation prompt (the "prefix") and up to the end of the turn; the characters
in between are the assistant's, including the end-of-turn token. Character spans are mapped to
tokens through the fast tokenizer's offsets, so BPE merges at the boundary cannot shift the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # label value for positions that are not trained on
# The end-of-turn tokens of the common chat templates (ChatML, Llama 3, Phi-3, Gemma): the one list both
# the assistant mask (here) and generation's stop tokens (models.loading.end_of_turn_ids) use.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]  # input_ids where the token is the assistant's, IGNORE_INDEX elsewhere

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant turn."""
    text = render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if text.startswith(prefix) and text.startswith(upto) and len(upto) > len(prefix):
            # Trailing whitespace after the end-of-turn token is template formatting, not the
            # assistant's output (the model stops at the end-of-turn token).
            start, end = len(prefix), len(upto.rstrip())
        else:
            # Templates that re-render earlier turns differently (e.g. stripping reasoning) break
            # the prefix property; fall back to finding the answer text itself.
            start = text.find(msg["content"], cursor)
            if start < 0:
                raise ValueError(
                    f"cannot locate assistant turn {i} in the rendered chat template; "
                    "the template drops or rewrites assistant content"
                )
            end = start + len(msg["content"])
            for marker in _end_markers(tokenizer):
                if text.startswith(marker, end):
                    end += len(marker)
                    break
        spans.append((start, end))
        cursor = end
    return text, spans


def _end_markers(tokenizer) -> list[str]:
    markers = list(END_OF_TURN_MARKERS)
    if tokenizer.eos_token:
        markers.append(tokenizer.eos_token)
    return markers


def encode_conversation(tokenizer, messages: list[dict], max_length: int | None = None) -> EncodedConversation:
    """Token ids of the whole conversation and labels on every assistant turn (right-truncated)."""
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    span_idx = 0
    for t, (s, e) in enumerate(enc["offset_mapping"]):
        while span_idx < len(spans) and spans[span_idx][1] <= s:
            span_idx += 1
        if span_idx == len(spans):
            break
        a, b = spans[span_idx]
        if e > a and s < b:  # token overlaps the assistant span
            labels[t] = ids[t]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return EncodedConversation(ids, labels)


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation followed by the generation prompt (for the teacher to answer)."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
