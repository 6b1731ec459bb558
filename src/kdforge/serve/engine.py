"""The request side of every serving backend: handles, per-sequence bookkeeping, the engine thread.

A backend (``hf.TransformersEngine``, ``llamacpp.LlamaCppEngine``) owns a background thread that
runs :meth:`BaseEngine._step` in a loop. Callers on any thread (the asyncio server, the terminal
chat, the Gradio UI) call :meth:`BaseEngine.submit` and read :class:`Output` deltas from the returned
:class:`GenerationHandle`, synchronously or with ``async for``. The engine thread is the only one
that touches the model, so no locks are needed around it; hand-offs go through thread-safe queues.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from kdforge.runtime.sampling import SamplingParams, make_generator
from kdforge.serve.detokenize import IncrementalDetokenizer, StopStringFilter, TokenPieces

log = logging.getLogger("kdforge.serve")


class ContextLengthExceeded(ValueError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""


@dataclass
class Output:
    """A delta of one request: new text, and on the last one the finish reason and usage."""

    text: str
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"; on the last Output only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # With log-probabilities asked for: one entry per token sampled since the previous Output (OpenAI's
    # {"token", "logprob", "bytes", "top_logprobs"}); None otherwise. Tokens whose text is held back
    # (part of a character, a possible stop string) arrive with the Output that carries their text.
    logprobs: list[dict] | None = None


# The floor of a reported log-probability: JSON has no -inf (OpenAI reports -9999.0 too).
LOGPROB_FLOOR = -9999.0
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


def token_logprobs(logits: torch.Tensor, token: int, top: int, pieces: TokenPieces) -> dict:
    """OpenAI's logprob entry of ``token`` under ``logits`` (V,): log_softmax of the raw logits
    (temperature 1, as OpenAI reports them, whatever temperature sampled it) and the ``top`` likeliest."""
    logp = torch.log_softmax(logits.float(), dim=-1)

    def entry(tid: int, value: float) -> dict:
        text, raw = pieces(tid)
        value = value if value == value else LOGPROB_FLOOR  # NaN from a broken model: the floor
        return {"token": text, "logprob": max(float(value), LOGPROB_FLOOR), "bytes": raw}

    best = []
    if top > 0:
        values, ids = torch.topk(logp, min(top, MAX_TOP_LOGPROBS, logp.numel()))
        best = [entry(int(i), float(v)) for v, i in zip(values, ids)]
    return {**entry(token, float(logp[token])), "top_logprobs": best}


@dataclass
class EngineStats:
    """Counters the tests and benchmarks read (the engine thread writes, readers only look)."""

    decode_steps: int = 0
    batch_sizes: Counter = field(default_factory=Counter)  # active sequences per decode step -> count
    max_active: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    errors: int = 0


class GenerationHandle:
    """The consumer's end of one request. Iterate for :class:`Output` deltas; :meth:`cancel` stops it.

    Created inside a running asyncio loop it delivers through an ``asyncio.Queue`` (the engine
    thread hands items over with ``call_soon_threadsafe``), otherwise through a ``queue.Queue``.
    """

    def __init__(self, request_id: int, prompt_ids: list[int], params: SamplingParams, wake: threading.Event,
                 on_finish=None, logprobs: int | None = None):
        self.request_id = request_id
        self.logprobs = logprobs  # None: none; k >= 0: each token's log-probability and the k likeliest
        self._on_finish = on_finish  # called once on the engine thread after the last Output
        self.prompt_ids = prompt_ids
        self.params = params
        self._wake = wake
        self._cancel = threading.Event()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._aqueue: asyncio.Queue[Output] | None = asyncio.Queue() if self._loop else None
        self._queue: queue.Queue[Output] = queue.Queue()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the engine to drop this request; it does so before its next decode step."""
        self._cancel.set()
        self._wake.set()

    def _emit(self, out: Output) -> None:  # engine thread
        if out.finish_reason is not None and self._on_finish is not None:
            self._on_finish()
        if self._loop is None:
            self._queue.put(out)
            return
        try:
            self._loop.call_soon_threadsafe(self._aqueue.put_nowait, out)
        except RuntimeError:  # the consumer's loop has closed: nobody is listening any more
            self._cancel.set()

    def __iter__(self) -> Iterator[Output]:
        if self._loop is not None:
            raise RuntimeError("this handle was created in an event loop; use `async for`")
        while True:
            out = self._queue.get()
            yield out
            if out.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[Output]:
        if self._aqueue is None:
            raise RuntimeError("this handle was created outside an event loop; iterate it synchronously")
        while True:
            out = await self._aqueue.get()
            yield out
            if out.finish_reason is not None:
                return


class Sequence:
    """One request inside the engine: sampling state, detokenizer, stop strings and counts."""

    def __init__(self, handle: GenerationHandle, tokenizer, eot_ids: set[int], pieces: TokenPieces | None = None):
        self.handle = handle
        self.params = handle.params
        self.prompt_ids = handle.prompt_ids
        self.eot_ids = eot_ids
        self.generator = make_generator(self.params.seed)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stopper = StopStringFilter(self.params.stop)
        self.completion_tokens = 0
        self.last_token = -1  # the newest sampled token, not yet run through the model
        self.position = len(self.prompt_ids)  # its position id: tokens before it are in the KV cache
        self.finished = False
        self.top_logprobs = handle.logprobs
        if pieces is None and handle.logprobs is not None:
            pieces = TokenPieces(tokenizer)
        self.pieces = pieces
        self._logprobs: list[dict] | None = [] if handle.logprobs is not None else None

    def accept(self, token: int, logits: torch.Tensor | None = None) -> bool:
        """Take a sampled token (and the (V,) logits it was sampled from, for log-probabilities);
        emit the text it settles. True when the sequence is finished."""
        self.completion_tokens += 1
        self.last_token = token
        if token in self.eot_ids and not self.params.ignore_eos:
            return self.finish("stop")  # the end-of-turn token is no text, and gets no logprob entry
        if self._logprobs is not None and logits is not None:
            self._logprobs.append(token_logprobs(logits, token, self.top_logprobs or 0, self.pieces))
        text = self.stopper.push(self.detok.push(token))
        if self.stopper.stopped:
            return self.finish("stop", text)
        if self.completion_tokens >= self.params.max_tokens:
            return self.finish("length", text)
        if text:
            self.handle._emit(Output(text, logprobs=self._take_logprobs()))
        return False

    def _take_logprobs(self) -> list[dict] | None:
        if self._logprobs is None:
            return None
        out, self._logprobs = self._logprobs, []
        return out

    def finish(self, reason: str, text: str = "", error: str | None = None) -> bool:
        if self.finished:
            return True
        self.finished = True
        if reason in ("stop", "length") and not self.stopper.stopped:
            # Text held back for an incomplete character or a possible stop string is real output now.
            text += self.stopper.push(self.detok.flush())
            if self.stopper.stopped:
                reason = "stop"
            text += self.stopper.flush()
        self.handle._emit(Output(text, reason, len(self.prompt_ids), self.completion_tokens, error,
                                 self._take_logprobs()))
        return True


class BaseEngine:
    """Queueing, admission and the background thread; a backend implements :meth:`_step`."""

    backend = "base"

    def __init__(self, tokenizer, eot_ids: list[int], context_length: int, max_batch: int = 16,
                 max_tokens_cap: int | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.tokenizer = tokenizer
        self.eot_ids = set(eot_ids)
        self.context_length = context_length
        self.max_batch = max_batch
        self.max_tokens_cap = max_tokens_cap
        self.stats = EngineStats()
        self._inbox: queue.Queue[GenerationHandle] = queue.Queue()
        self._waiting: deque[Sequence] = deque()
        self._wake = threading.Event()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._in_flight = 0  # submitted and not yet finished (queued, waiting or active)
        self._pieces: TokenPieces | None = None  # token id -> (text, bytes) for log-probabilities, made once

    # ---- caller side -------------------------------------------------------------------------
    def resolve_max_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        """The number of tokens a request may generate; raises ContextLengthExceeded if none fit.

        The server's cap applies first (a policy, like OpenAI's per-model output limit), then the
        context: prompt + max_tokens must fit, as the OpenAI API requires.
        """
        room = self.context_length - prompt_tokens
        if room < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens. However, your "
                f"prompt has {prompt_tokens} tokens, leaving no room for an answer. Shorten the prompt."
            )
        limit = room if requested is None else requested
        if self.max_tokens_cap is not None:
            limit = min(limit, self.max_tokens_cap)
        if limit > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens. However, you "
                f"requested {prompt_tokens + limit} tokens ({prompt_tokens} in the prompt, {limit} for the "
                "completion). Reduce the prompt or max_tokens."
            )
        return limit

    def submit(self, prompt_ids: list[int], params: SamplingParams, logprobs: int | None = None) -> GenerationHandle:
        """Queue a request; it joins the running batch at the engine's next step.

        ``logprobs``: None for none, else every generated token's log-probability with the ``logprobs``
        likeliest alternatives (at most 20), in :attr:`Output.logprobs`.
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        self.resolve_max_tokens(len(prompt_ids), params.max_tokens)  # raises if it cannot fit
        handle = GenerationHandle(next(self._ids), list(prompt_ids), params, self._wake, self._release,
                                  logprobs=logprobs)
        with self._lock:
            self._in_flight += 1
        self._inbox.put(handle)
        self._wake.set()
        return handle

    def start(self) -> BaseEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"kdforge-{self.backend}-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not finished; the server bounds this number."""
        return self._in_flight

    @property
    def num_active(self) -> int:
        """Sequences in the running batch (read from other threads for health/metrics only)."""
        return 0

    @property
    def num_waiting(self) -> int:
        return self._inbox.qsize() + len(self._waiting)

    # ---- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self._has_work():
                self._wake.wait(0.5)  # idle: sleep until a submit or cancel wakes us
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as e:  # a backend failure must fail its requests, not kill the server
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")

    def _drain_inbox(self) -> None:
        while True:
            try:
                handle = self._inbox.get_nowait()
            except queue.Empty:
                return
            if handle.logprobs is not None and self._pieces is None:
                self._pieces = TokenPieces(self.tokenizer)
            self._waiting.append(Sequence(handle, self.tokenizer, self.eot_ids, self._pieces))

    def _has_work(self) -> bool:
        return bool(self._waiting) or self.num_active > 0

    def _drop_cancelled_waiting(self) -> None:
        for seq in [s for s in self._waiting if s.handle.cancelled]:
            self._waiting.remove(seq)
            self._cancelled(seq)

    def _cancelled(self, seq: Sequence) -> None:
        seq.finish("cancelled")
        self.stats.cancelled += 1

    def _done(self, seq: Sequence) -> None:
        self.stats.finished += 1
        self.stats.completion_tokens += seq.completion_tokens

    def _fail_all(self, message: str) -> None:
        self.stats.errors += 1
        for seq in list(self._waiting):
            seq.finish("error", error=message)
        self._waiting.clear()

    def _step(self) -> None:
        raise NotImplementedError
