"""Read conversations from JSONL in the common formats, with errors that name file and line.

Accepted per line (detected by keys):
- ``{"prompt": "...", "system"?: "..."}``
- OpenAI-style ``{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}``
- Alpaca ``{"instruction": "...", "input"?: "...", "output"?: "..."}``
- ShareGPT ``{"conversations": [{"from": "human|gpt|system", "value": "..."}, ...]}``
Optional fields kept on every record: ``id``, ``category``, ``split``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdforge.artifacts import META_NAME, product
from kdforge.errors import UserError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class DataError(UserError):
    """A data file could not be read; the message says which file and line, and what is wrong."""


@dataclass
class Conversation:
    id: str
    messages: list[dict[str, str]]
    category: str = "general"
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to (not including) the final assistant answer, for a teacher to answer."""
        msgs = list(self.messages)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        return msgs

    @property
    def has_answer(self) -> bool:
        return any(m["role"] == "assistant" for m in self.messages)


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{j}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{j}].role is {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: messages[{j}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in out):
        raise DataError(f"{where}: the conversation has no user message")
    return out


def record_to_conversation(rec: Any, where: str, default_id: str) -> Conversation:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        messages = _check_messages(rec["messages"], where)
    elif "conversations" in rec:
        conv = rec["conversations"]
        if not isinstance(conv, list) or not conv:
            raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects")
        messages = []
        for j, turn in enumerate(conv):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(f"{where}: conversations[{j}] must be an object with 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise DataError(f"{where}: conversations[{j}].from is {turn['from']!r}; expected human, gpt or system")
            messages.append({"role": role, "content": turn["value"]})
        messages = _check_messages(messages, where)
    elif "instruction" in rec:
        if not isinstance(rec["instruction"], str) or not rec["instruction"].strip():
            raise DataError(f"{where}: 'instruction' must be a non-empty string")
        user = rec["instruction"]
        if rec.get("input"):
            user = f"{user}\n\n{rec['input']}"
        messages = [{"role": "user", "content": user}]
        if rec.get("output"):
            messages.append({"role": "assistant", "content": str(rec["output"])})
    elif "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": rec["prompt"]}]
        if rec.get("system"):
            messages.insert(0, {"role": "system", "content": str(rec["system"])})
        if rec.get("response") or rec.get("completion"):
            messages.append({"role": "assistant", "content": str(rec.get("response") or rec.get("completion"))})
    else:
        raise DataError(
            f"{where}: unrecognised record with keys {sorted(rec)[:6]}; expected one of "
            "'prompt', 'messages', 'instruction' (Alpaca) or 'conversations' (ShareGPT)"
        )
    known = {"id", "category", "split", "messages", "conversations", "instruction", "input", "output",
             "prompt", "system", "response", "completion"}
    return Conversation(
        id=str(rec.get("id", default_id)),
        messages=messages,
        category=str(rec.get("category", "general")),
        split=rec.get("split"),
        extra={k: v for k, v in rec.items() if k not in known},
    )


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Parse a JSONL file; a malformed line raises DataError with file name and line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                # json's message may end in "at" already ("Unterminated string starting at"): no "at at".
                where = f"{e.msg} column {e.colno}" if e.msg.endswith(" at") else f"{e.msg} at column {e.colno}"
                raise DataError(f"{path}:{lineno}: not valid JSON ({where})") from None
    return records


def load_conversations(path: str | Path) -> list[Conversation]:
    out = []
    seen: set[str] = set()
    for lineno, rec in read_jsonl(path):
        conv = record_to_conversation(rec, f"{path}:{lineno}", default_id=f"line{lineno}")
        if conv.id in seen:
            raise DataError(f"{path}:{lineno}: duplicate id {conv.id!r}; ids must be unique")
        seen.add(conv.id)
        out.append(conv)
    if not out:
        raise DataError(f"{path}: no records")
    return out


def select_split(convs: list[Conversation], split: str, limit: int | None = None,
                 val_limit: int | None = None) -> list[Conversation]:
    """Records of one split (records without a split count as train), at most ``limit`` per split
    (``val_limit``, if given, for the validation part of split="all")."""
    if split == "all":
        train = [c for c in convs if (c.split or "train") == "train"]
        val = [c for c in convs if c.split == "validation"]
        val_cap = val_limit or limit
        return (train[:limit] if limit else train) + (val[:val_cap] if val_cap else val)
    chosen = [c for c in convs if (c.split or "train") == split]
    return chosen[:limit] if limit else chosen


def data_file(spec: str | Path) -> Path:
    """The JSONL file behind a data spec: the file itself, or the conversations file a finished artifact
    folder (a `kdforge generate` run) declares in its meta.json."""
    path = Path(spec)
    if not path.is_dir():
        return path
    declared = product(path, "data")
    if declared is None:
        what = "is incomplete (no meta.json)" if not (path / META_NAME).is_file() else "declares no data file"
        raise DataError(f"the artifact folder {path} {what}; expected a finished `kdforge generate` output folder "
                        "(re-run `kdforge generate` with the same --out to finish it) or a JSONL file")
    return declared


def load_training_data(spec: str | Path) -> list[Conversation]:
    """Conversations from a generate artifact folder (must be complete) or a JSONL file."""
    return load_conversations(data_file(spec))
