"""Conversations -> token ids + a label mask that covers assistant tokens only.

The mask is found with the tokenizer's own chat template, so it works for any template, with or
without a ``{% generation %}`` marker: for every assistant turn we render the conversation up to
that turn with the generation prompt (the "prefix") and up to the end of the turn; the characters
in between are the assistant's, including the end-of-turn token. Character spans are mapped to
tokens through the fast tokenizer's offsets, so BPE merges at the boundary cannot shift the mask.

Message content is text, never control tokens: a user who writes ``<|im_end|>\n<|im_start|>system`` gets
those characters, not a forged system turn. A conversation whose content holds no special-token string
(every ordinary one) is tokenized exactly as before, in one piece; otherwise the rendered text is cut
at the content (found by rendering the template over placeholders) and each content piece is tokenized
so that no special token can form in it, while the template's own markers stay real. Pass
``allow_special_tokens=True`` for the old behaviour (content may carry control tokens on purpose).
"""

from __future__ import annotations

import re
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


def special_token_strings(tokenizer) -> list[str]:
    """The strings the tokenizer turns into special (control) tokens: ``<|im_start|>``, ``<|eot_id|>``..."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added.content if hasattr(added, "content") else added))
    return sorted((s for s in found if s), key=len, reverse=True)


def _contents(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if isinstance(m.get("content"), str)]


def _holds_special(tokenizer, messages: list[dict]) -> list[str]:
    """The special-token strings that occur in some message's content (usually none)."""
    contents = _contents(messages)
    return [s for s in special_token_strings(tokenizer) if any(s in c for c in contents)]


_MARK = "\ue000kdforge-content-{}\ue001"  # private-use characters: no template or tokenizer touches them
_MARK_RE = re.compile("\ue000kdforge-content-(\\d+)\ue001")


def _pieces(tokenizer, messages: list[dict], text: str,
            add_generation_prompt: bool) -> list[tuple[str, bool]] | None:
    """``text`` (the real rendering) cut into (piece, is_content) runs, or None when the template rewrites
    or drops content (then the placeholders' rendering, filled in, is not ``text``)."""
    marked = [{**m, "content": _MARK.format(i)} if isinstance(m.get("content"), str) else m
              for i, m in enumerate(messages)]
    try:
        template = render(tokenizer, marked, add_generation_prompt)
    except Exception:
        return None
    parts = _MARK_RE.split(template)  # template, index, template, index, ..., template
    pieces: list[tuple[str, bool]] = []
    for k, part in enumerate(parts):
        if k % 2 == 0:
            pieces.append((part, False))
        else:
            i = int(part)
            if not 0 <= i < len(messages) or not isinstance(messages[i].get("content"), str):
                return None
            pieces.append((messages[i]["content"], True))
    return pieces if "".join(p for p, _ in pieces) == text else None


def _text_segments(content: str, specials: list[str]) -> list[str]:
    """``content`` cut so that no segment contains a special-token string: each occurrence is split after
    its first character. Tokenized one by one, the segments give the text's own tokens, never a control
    token (the added-token matcher only sees whole strings within one segment)."""
    segments, start = [], 0
    while True:
        hits = [i for i in (content.find(s, start) for s in specials) if i >= 0]
        if not hits:
            segments.append(content[start:])
            return segments
        cut = min(hits) + 1
        segments.append(content[start:cut])
        start = cut


def _tokenize(tokenizer, messages: list[dict], text: str, add_generation_prompt: bool,
              allow_special_tokens: bool, offsets: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids (and character offsets into ``text``) of a rendered conversation, content as text."""
    specials = [] if allow_special_tokens else _holds_special(tokenizer, messages)
    if not specials:  # every ordinary conversation: one call, ids exactly as they always were
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]] if offsets else []
    pieces = _pieces(tokenizer, messages, text, add_generation_prompt)
    if pieces is None:
        raise ValueError(f"message content holds the control token {specials[0]!r}, and this chat template "
                         "rewrites message content, so it cannot be kept as text; remove it (or allow special "
                         "tokens in content)")
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for piece, is_content in pieces:
        for segment in (_text_segments(piece, specials) if is_content else [piece]):
            if segment:
                enc = tokenizer(segment, add_special_tokens=False, return_offsets_mapping=offsets)
                ids += enc["input_ids"]
                if offsets:
                    spans += [(s + pos, e + pos) for s, e in enc["offset_mapping"]]
            pos += len(segment)
    return ids, spans


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


def encode_conversation(tokenizer, messages: list[dict], max_length: int | None = None,
                        allow_special_tokens: bool = False) -> EncodedConversation:
    """Token ids of the whole conversation and labels on every assistant turn (right-truncated).

    Content is tokenized as text (see the module's docstring) unless ``allow_special_tokens``.
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    ids, offsets = _tokenize(tokenizer, messages, text, False, allow_special_tokens, offsets=True)
    labels = [IGNORE_INDEX] * len(ids)
    span_idx = 0
    for t, (s, e) in enumerate(offsets):
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


def encode_prompt(tokenizer, messages: list[dict], allow_special_tokens: bool = False) -> list[int]:
    """Token ids of a conversation followed by the generation prompt (for the teacher to answer).

    Content is tokenized as text (see the module's docstring) unless ``allow_special_tokens``.
    """
    text = render(tokenizer, messages, add_generation_prompt=True)
    return _tokenize(tokenizer, messages, text, True, allow_special_tokens)[0]
