"""The bundled task set: short answers scored by normalised match, code scored by running tests.

``tasks.jsonl`` (written for kdforge, held out from the bundled training prompts) holds one item a
line: ``id``, ``type`` (``short`` or ``code``), ``category``, ``lang`` (en/zh), ``prompt``, and

- short: ``answer``, ``match`` (``number`` or ``text``), optional ``aliases``;
- code: ``entry_point``, ``tests`` (assert statements), ``solution`` (a reference that passes).

Scoring a short answer (see docs/evaluation.md):
- ``number``: the answer's numbers are read (digits, English number words up to the thousands,
  Chinese numerals) from its first paragraph; the prediction is the number after an explicit
  answer marker, else a short first line's only new number, else the number after the last "=",
  else the first number that is not an operand of the question (see :func:`predicted_number`).
  Correct when it equals the gold number.
- ``text``: the gold answer or an alias occurs in the normalised first line of the answer, as whole
  words for Latin script and as a substring for Chinese.
Normalisation: Unicode NFKC (full-width to half-width), lower case, punctuation to spaces, one
space between words.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kdforge.data.prompts import BUNDLED
from kdforge.errors import UserError


class TaskError(UserError):
    """A task file could not be read; the message names the file, line and field."""


@dataclass
class TaskItem:
    id: str
    type: str  # "short" | "code"
    category: str
    lang: str
    prompt: str
    answer: str = ""
    match: str = "text"
    aliases: list[str] = field(default_factory=list)
    entry_point: str = ""
    tests: str = ""
    solution: str = ""


def bundled_tasks_path() -> Path:
    return Path(str(resources.files("kdforge.eval") / "tasks.jsonl"))


def load_tasks(spec: str = BUNDLED, limit: int | None = None) -> list[TaskItem]:
    """Items of a task file ('bundled' or a path); ``limit``: at most N items of each type."""
    path = bundled_tasks_path() if spec == BUNDLED else Path(spec)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    items: list[TaskItem] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            item = TaskItem(**rec)
        except (json.JSONDecodeError, TypeError) as e:
            raise TaskError(f"{path}:{lineno}: not a task item ({e})") from None
        need = ("answer", "match") if item.type == "short" else ("entry_point", "tests")
        if item.type not in ("short", "code") or not all(getattr(item, k) for k in need):
            raise TaskError(f"{path}:{lineno}: type must be short (with answer, match) or code "
                            "(with entry_point, tests)")
        if item.type == "short" and item.match not in ("number", "text"):
            raise TaskError(f"{path}:{lineno}: match must be 'number' or 'text', got {item.match!r}")
        items.append(item)
    if limit:
        counts: dict[str, int] = {}
        kept = []
        for it in items:
            counts[it.type] = counts.get(it.type, 0) + 1
            if counts[it.type] <= limit:
                kept.append(it)
        items = kept
    return items


# ---------------------------------------------------------------- normalisation and numbers

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation and symbols to spaces, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i >= 2}
_ZH_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8,
              "九": 9}
_ZH_UNITS = {"十": 10, "百": 100, "千": 1000}
# A minus sign counts only where it cannot be subtraction ("-3", not the "-3" of "9-3").
_NUM_TOKEN = re.compile(r"(?:(?<![\w.])-)?\d+(?:\.\d+)?|[零〇一二两三四五六七八九十百千]+|[a-z]+")


def _zh_numeral(s: str) -> int | None:
    """Chinese numerals below 10,000: 七 -> 7, 十二 -> 12, 二十 -> 20, 一千 -> 1000."""
    total, digit = 0, None
    for ch in s:
        if ch in _ZH_DIGITS:
            digit = _ZH_DIGITS[ch]
        elif ch in _ZH_UNITS:
            total += (1 if digit is None else digit) * _ZH_UNITS[ch]
            digit = None
        else:
            return None
    return total + (digit or 0)


def numbers_in(text: str, words: bool = True) -> list[float]:
    """Numbers in reading order. ``words``: also English number words and Chinese numerals."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    out: list[float] = []
    tokens = _NUM_TOKEN.findall(text)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok[0].isdigit() or (tok[0] == "-" and len(tok) > 1):
            out.append(float(tok))
        elif words and tok in _TENS:
            value = _TENS[tok]
            # "twenty four" / "twenty-four" (the hyphen was split off by the tokenizer)
            if i + 1 < len(tokens) and tokens[i + 1] in _WORDS and 0 < _WORDS[tokens[i + 1]] < 10:
                value += _WORDS[tokens[i + 1]]
                i += 1
            out.append(float(value))
        elif words and tok in _WORDS:
            value = _WORDS[tok]
            if i + 1 < len(tokens) and tokens[i + 1] in ("hundred", "thousand"):
                value *= 100 if tokens[i + 1] == "hundred" else 1000
                i += 1
            out.append(float(value))
        elif words and (tok[0] in _ZH_DIGITS or tok[0] in _ZH_UNITS):
            value = _zh_numeral(tok)
            if value is not None:
                out.append(float(value))
        i += 1
    return out


_ANSWER_MARK = re.compile(r"answer is|answer:|####|答案是|答案为|答案[:：]", re.I)


def first_paragraph(text: str, max_chars: int = 300) -> str:
    """The answer up to its first blank line, at most ``max_chars``: where a short answer gives its result."""
    return re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0][:max_chars]


def predicted_number(answer: str, prompt: str) -> float | None:
    """The number an answer gives, read from its first paragraph, by the first rule that applies:

    1. after an explicit marker ("the answer is", "####", "答案是");
    2. a short first line (at most 6 words) holding exactly one number that is not in the question;
    3. after the last "=" that a number follows (the result of a worked sum: "2 * 60 = 120");
    4. the first number that is not in the question ("3 plus 4 makes 7"), else the first number.
    """
    text = first_paragraph(answer)
    if not numbers_in(text):
        return None
    # The question's own numbers ("3 + 4", "一小时") are operands an answer may repeat before its result.
    operands = set(numbers_in(prompt))
    mark = _ANSWER_MARK.search(text)
    if mark and (after := numbers_in(text[mark.end():])):
        return after[0]
    line = text.splitlines()[0] if text.splitlines() else ""
    in_line = numbers_in(line)
    if len(line.split()) <= 6 and len(in_line) == 1 and in_line[0] not in operands:
        return in_line[0]
    for pos in reversed([m.start() for m in re.finditer("=", text)]):
        after = numbers_in(text[pos + 1:].split("\n", 1)[0])
        if after:
            return after[0]
    found = numbers_in(text)
    return next((x for x in found if x not in operands), found[0])


def first_line(text: str, max_chars: int = 200) -> str:
    """The answer's first non-empty line, at most ``max_chars``: a short answer is judged on its start."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()[:max_chars]
    return ""


def text_match(answer: str, golds: list[str]) -> bool:
    """A gold answer occurs in the normalised answer: whole words (Latin) or a substring (Chinese)."""
    ans = normalize(first_line(answer))
    padded = f" {ans} "
    for gold in golds:
        g = normalize(gold)
        if not g:
            continue
        if _CJK.search(g):
            if g in ans:
                return True
        elif f" {g} " in padded:
            return True
    return False


def score_short(item: TaskItem, answer: str) -> float:
    """1.0 if ``answer`` is correct for a short-answer item, else 0.0."""
    if item.match == "number":
        got = predicted_number(answer, item.prompt)
        return float(got is not None and abs(got - float(item.answer)) < 1e-6)
    return float(text_match(answer, [item.answer, *item.aliases]))


def chance_level(items: list[TaskItem]) -> dict[str, float | None]:
    """Expected score of a model that answers each question with the gold answer of a random other
    question of the same category (the answer prior). Code has no such answer: its chance is 0.

    Keys as in :func:`summarize`: ``short``, ``short_en``, ``short_zh``, ``code``, ``overall``, and
    ``short/<category>``.
    """
    shorts = [it for it in items if it.type == "short"]
    per_item: dict[str, float] = {}
    for it in shorts:
        others = [o for o in shorts if o.category == it.category and o.id != it.id]
        per_item[it.id] = sum(score_short(it, o.answer) for o in others) / len(others) if others else 0.0

    def mean(ids: list[str]) -> float | None:
        return sum(per_item[i] for i in ids) / len(ids) if ids else None

    out: dict[str, float | None] = {
        "short": mean([it.id for it in shorts]),
        "short_en": mean([it.id for it in shorts if it.lang == "en"]),
        "short_zh": mean([it.id for it in shorts if it.lang == "zh"]),
        "code": 0.0 if any(it.type == "code" for it in items) else None,
        "overall": sum(per_item.values()) / len(items) if items else None,
    }
    for c in sorted({it.category for it in shorts}):
        out[f"short/{c}"] = mean([it.id for it in shorts if it.category == c])
    return out


# ---------------------------------------------------------------- code

_CODE_START = re.compile(r"(def|import|from|class|@|return|[A-Za-z_]\w*\s*=)")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(answer: str, entry_point: str) -> str:
    """The Python an answer gives: the fenced block that defines ``entry_point`` (an unclosed fence
    runs to the end, as a cut-off answer does), else the first fenced block, else the unfenced
    ``def`` and the indented lines after it."""
    blocks = [body for lang, body in _FENCE.findall(answer) if lang.lower() in ("", "python", "py", "python3")]
    for body in blocks:
        if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", body):
            return body.strip("\n")
    if blocks:
        return blocks[0].strip("\n")
    lines = answer.splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(r"\s*(def|import|from|class)\s", ln)), None)
    if start is None:
        return ""
    kept = [lines[start]]
    for ln in lines[start + 1:]:
        # Stop at the first unindented line that is not code (prose after the function).
        if ln.strip() and not ln[0].isspace() and not _CODE_START.match(ln):
            break
        kept.append(ln)
    return "\n".join(kept).rstrip()


def score_code(item: TaskItem, answer: str, timeout_s: float = 5.0, memory_mb: int = 512) -> dict[str, Any]:
    """Run the extracted code against the item's tests in the sandbox: {'score', 'status', ...}."""
    from kdforge.eval.sandbox import run_python

    code = extract_code(answer, item.entry_point)
    if not code:
        return {"score": 0.0, "status": "no_code"}
    res = run_python(code, item.tests, timeout_s=timeout_s, memory_mb=memory_mb)
    return {"score": float(res.status == "pass"), "status": res.status}


def score_item(item: TaskItem, answer: str, timeout_s: float = 5.0, memory_mb: int = 512) -> dict[str, Any]:
    if item.type == "code":
        return score_code(item, answer, timeout_s, memory_mb)
    return {"score": score_short(item, answer), "status": "scored"}


def summarize(items: list[TaskItem], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean scores: short-answer exact match (overall, per language, per category), code pass rate."""
    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    short = [(it, r) for it, r in zip(items, results) if it.type == "short"]
    code = [(it, r) for it, r in zip(items, results) if it.type == "code"]
    out: dict[str, Any] = {
        "short_em": mean([r["score"] for _, r in short]),
        "short_em_en": mean([r["score"] for it, r in short if it.lang == "en"]),
        "short_em_zh": mean([r["score"] for it, r in short if it.lang == "zh"]),
        "code_pass": mean([r["score"] for _, r in code]),
        "overall": mean([r["score"] for r in results]),
        "short_items": len(short), "code_items": len(code),
        "by_category": {c: mean([r["score"] for it, r in zip(items, results) if it.category == c])
                        for c in sorted({it.category for it in items})},
        "code_status": {},
    }
    for _, r in code:
        out["code_status"][r["status"]] = out["code_status"].get(r["status"], 0) + 1
    return out


def run_tasks(model, tokenizer, items: list[TaskItem], batch_size: int = 16, short_tokens: int = 32,
              code_tokens: int = 128, timeout_s: float = 5.0, memory_mb: int = 512) -> dict[str, Any]:
    """Greedy answers to every item, scored: {'summary': ..., 'items': [{id, answer, score, status}]}.

    ``model``: a runtime (`kdforge.runtime.CausalLM`) or a loaded transformers module."""
    from kdforge.eval.generation import generate_texts

    answers: dict[str, str] = {}
    for kind, max_new in (("short", short_tokens), ("code", code_tokens)):
        group = [it for it in items if it.type == kind]
        if group:
            texts = generate_texts(model, tokenizer, [it.prompt for it in group], max_new, batch_size)
            answers.update({it.id: t[0] for it, t in zip(group, texts)})
    results = [score_item(it, answers[it.id], timeout_s, memory_mb) | {"id": it.id, "answer": answers[it.id]}
               for it in items]
    return {"summary": summarize(items, results), "items": results}
