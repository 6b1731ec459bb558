"""The chat page in a real browser: `kdforge app` on a tiny model, driven by headless Chromium.

Debian's ``chromium`` through Playwright's Python package (``pip install 'kdforge[browser]'``), pointed at
the system browser: no browser download. Skipped where either is missing (``make test-fast`` leaves it out
with ``-m "not browser"``); ``KDFORGE_REQUIRE_BROWSER=1`` (set by .ci/run) turns the skip into a failure.
The screenshot of the two turns is kept under pytest's base temp (printed), and copied to
``$KDFORGE_TEST_ARTIFACTS`` when that is set.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny

pytestmark = pytest.mark.browser

SYSTEM = "Answer briefly."
MAX_TOKENS = 24
TURNS = ("Hello there", "Tell me more")
SHOT, FAILED_SHOT = "chat-two-turns.png", "chat-failure.png"
BOX = 'textarea[data-testid="textbox"]'  # the message box (no label); the first textarea


def _need(what: str) -> None:
    if os.environ.get("KDFORGE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"KDFORGE_REQUIRE_BROWSER=1 but {what}")
    pytest.skip(what)


def _chromium() -> str:
    path = os.environ.get("KDFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        _need("no chromium on PATH (apt-get install chromium, or set KDFORGE_CHROMIUM)")
    return path


def _keep(shot: Path) -> None:
    print(f"\nscreenshot: {shot}")
    if os.environ.get("KDFORGE_TEST_ARTIFACTS"):
        folder = Path(os.environ["KDFORGE_TEST_ARTIFACTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, folder / shot.name)
        print(f"copied to {folder / shot.name}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain_words_model(path: Path, tokenizer) -> Path:
    """A tiny random Llama whose greedy answers are varied plain words, so the page's Markdown shows them
    verbatim: weights scaled up (a default-init tiny model repeats one token, mostly "\\n"), and every token
    that is not letters (with an optional leading space) gets a zero embedding, hence a zero logit (tied
    embeddings) that a letters-only token always beats."""
    model = make_tiny("llama", len(tokenizer), seed=0)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    keep = torch.tensor([bool(re.fullmatch(r"Ġ?[A-Za-z]{2,}", t or "")) for t in vocab])
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" not in name:
                weight.mul_(6.0)
        model.get_input_embeddings().weight[~keep] = 0.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _greedy(engine, messages: list[dict]) -> str:
    from kdforge.data.chat import encode_prompt
    from kdforge.runtime.sampling import SamplingParams

    handle = engine.submit(encode_prompt(engine.tokenizer, messages),
                           SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    outs = list(handle)
    assert outs and outs[-1].finish_reason in ("stop", "length"), outs[-1:]
    return "".join(o.text for o in outs)


def _norm(text: str) -> str:
    return " ".join(text.split())


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"kdforge app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"kdforge app did not answer on {url} in {timeout:.0f}s:\n{log.read_text()[-3000:]}")


# The page's messages in order, as (role, shown text): Gradio's Chatbot marks them data-testid="user"/"bot".
MESSAGES_JS = """() => Array.from(document.querySelectorAll('[data-testid="user"], [data-testid="bot"]'))
                      .map(e => [e.dataset.testid, e.innerText])"""


def _send(page, text: str, expected: str, n_before: int) -> list[str]:
    """Type ``text``, press Enter, wait until the new last bot message shows ``expected`` (whitespace
    normalised) and the page is idle again; returns the bot message's texts seen while it streamed."""
    box = page.locator(BOX).first  # not get_by_placeholder: Gradio drops the placeholder after the first turn
    box.fill(text)
    page.evaluate("""(i) => { window.__seen = []; if (window.__watch) window.__watch.disconnect();
        window.__watch = new MutationObserver(() => { const b = document.querySelectorAll('[data-testid="bot"]')[i];
            if (b) window.__seen.push(b.innerText); });
        window.__watch.observe(document.body, {subtree: true, childList: true, characterData: true}); }""",
                  n_before // 2)
    box.press("Enter")
    want = _norm(expected)
    try:
        page.wait_for_function(
            """([n, want]) => { const m = document.querySelectorAll('[data-testid="user"], [data-testid="bot"]');
                 return m.length === n + 2 && m[m.length - 1].innerText.split(/\\s+/).filter(Boolean).join(' ')
                        === want; }""",
            arg=[n_before, want], timeout=30_000)
    except Exception:
        shown = page.evaluate(MESSAGES_JS)
        raise AssertionError(f"page never showed the greedy answer {want!r}; it shows {shown!r}") from None
    # Idle: the box is editable and empty again (a second message typed while streaming would be queued).
    page.wait_for_function("""(box) => { const t = document.querySelector(box);
                                         return t && !t.disabled && t.value === ''; }""", arg=BOX, timeout=10_000)
    page.locator("button.submit-button").wait_for(state="visible", timeout=10_000)  # the stop button is gone
    return page.evaluate("() => window.__seen")


def test_chat_page_streams_greedy_answers_with_history(request, tmp_path, tmp_path_factory):
    if importlib.util.find_spec("gradio") is None:  # not imported here: only the app needs it
        _need("the chat page needs Gradio (pip install 'kdforge[ui]')")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright is not installed (pip install 'kdforge[browser]')")
    chromium = _chromium()

    from kdforge.serve.launch import load_engine

    model_dir = _plain_words_model(tmp_path / "model", request.getfixturevalue("tokenizer"))  # after the skips
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "app.log"
    # One thread in both processes: the same float reductions, so greedy picks the same tokens.
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    shots = tmp_path_factory.getbasetemp() / "browser"
    shots.mkdir(exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kdforge.cli", "app", str(model_dir), "--host", "127.0.0.1",
                                 "--port", str(port), "--temperature", "0", "--max-tokens", str(MAX_TOKENS),
                                 "--system", SYSTEM], stdout=out, stderr=subprocess.STDOUT, env=env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = None
    try:
        # The expected answers, from this process's engine, while the app starts.
        engine = load_engine(str(model_dir), max_batch=1)
        first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
        answer1 = _greedy(engine, first)
        second = [*first, {"role": "assistant", "content": answer1}, {"role": "user", "content": TURNS[1]}]
        answer2 = _greedy(engine, second)
        alone = _greedy(engine, [first[0], second[-1]])
        assert len(_norm(answer1).split()) >= 3 and _norm(answer1) != _norm(answer2)
        assert _norm(answer2) != _norm(alone), "the second answer must depend on the history for this test to check it"

        _wait_http(url, proc, log)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 800})
                page.goto(url)
                try:
                    seen1 = _send(page, TURNS[0], answer1, 0)
                    seen2 = _send(page, TURNS[1], answer2, 2)
                    shown = page.evaluate(MESSAGES_JS)
                    path = shots / SHOT
                    page.screenshot(path=str(path), full_page=True)
                except BaseException:
                    page.screenshot(path=str(shots / FAILED_SHOT), full_page=True)
                    _keep(shots / FAILED_SHOT)
                    print(f"kdforge app's log:\n{log.read_text()[-3000:]}")
                    raise
            finally:
                browser.close()
        _keep(path)

        assert [role for role, _ in shown] == ["user", "bot", "user", "bot"]
        assert [_norm(t) for _, t in shown] == [TURNS[0], _norm(answer1), TURNS[1], _norm(answer2)]
        # What the page showed while streaming grew towards the answer, through at least one partial answer.
        for seen, answer in ((seen1, answer1), (seen2, answer2)):
            words = _norm(answer)
            assert all(words.startswith(_norm(s)) for s in seen), (seen, answer)
            assert len({_norm(s) for s in seen} - {"", words}) >= 1, f"no partial answer was shown: {seen}"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if engine is not None:
            engine.shutdown()
        torch.set_num_threads(threads)
