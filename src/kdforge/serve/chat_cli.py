"""`kdforge chat MODEL`: a terminal chat that streams answers and keeps the conversation.

``/reset`` starts a new conversation, ``/exit`` (or Ctrl-D) quits, Ctrl-C stops the answer being
written and keeps what was written so far. The engine runs in this process; no server is needed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from kdforge.data.chat import encode_prompt
from kdforge.runtime.sampling import SamplingParams
from kdforge.serve.engine import BaseEngine, ContextLengthExceeded

HELP = "/reset starts a new conversation, /exit quits, Ctrl-C stops an answer."


def run_chat(engine: BaseEngine, model_name: str, system: str | None = None, temperature: float = 0.7,
             top_p: float = 1.0, max_tokens: int = 512, seed: int | None = None,
             read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> list[dict]:
    """Read-answer loop; returns the conversation as it stood at exit (for tests)."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    out.write(f"kdforge chat with {model_name}. {HELP}\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return history
        command = line.strip()
        if command in ("/exit", "/quit"):
            return history
        if command == "/reset":
            history = list(start)
            out.write("(new conversation)\n")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        prompt = encode_prompt(engine.tokenizer, history)
        try:
            # Long conversations: answer with what still fits rather than refuse outright.
            limit = engine.resolve_max_tokens(len(prompt), None)
        except ContextLengthExceeded as e:
            history.pop()
            out.write(f"(error: {e} Use /reset.)\n")
            continue
        handle = engine.submit(prompt, SamplingParams(max_tokens=min(max_tokens, limit), temperature=temperature,
                                                      top_p=top_p, seed=seed))
        out.write("assistant> ")
        parts: list[str] = []
        try:
            for delta in handle:
                parts.append(delta.text)
                out.write(delta.text)
                out.flush()
                if delta.finish_reason == "length":
                    out.write(" [max tokens reached]")
                elif delta.finish_reason == "error":
                    out.write(f" [error: {delta.error}]")
        except KeyboardInterrupt:
            handle.cancel()
            out.write(" [stopped]")
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(parts)})
