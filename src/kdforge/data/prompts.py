"""The bundled prompt set, written for kdforge.

``prompts.jsonl`` holds one record a line: ``id``, ``category``, ``lang`` (en/zh), ``prompt`` and a
fixed ``split``. The split is stratified: within each (category, lang) group, in file order, every
10th prompt (the 10th, 20th, ...) is ``validation`` and the rest ``train``. It is stored in the file,
so it never changes between runs or machines.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from kdforge.data.formats import Conversation, load_conversations

BUNDLED = "bundled"
# The one prompt every decode-speed figure is timed on (eval, quantize, benchmarks).
SPEED_PROMPT = [{"role": "user", "content": "Write a short paragraph about why the sky is blue."}]


def bundled_prompts_path() -> Path:
    return Path(str(resources.files("kdforge.data") / "prompts.jsonl"))


def load_prompt_set(spec: str) -> list[Conversation]:
    """'bundled' or a JSONL path -> conversations."""
    return load_conversations(bundled_prompts_path() if spec == BUNDLED else spec)
