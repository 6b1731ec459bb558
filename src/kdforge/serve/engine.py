"""The request side of every serving backend: handles, per-sequence bookkeeping, the engine thread.

A backend (``hf.TransformersEngine``, ``llamacpp.LlamaCppEngine``) owns a background thread that
runs :meth:`BaseEngine._step` in a loop. Callers on any thread (the asyncio server, the terminal
chat, the Gradio UI) call :meth:`BaseEngine.submit` and read :class:`Output` deltas from the returned
:class:`GenerationHandle`, synchronously or with ``async for``. The engine thread is the only one
that touches the model, so no locks are needed around it; hand-offs go through thread-safe queues.

Besides generation, :meth:`BaseEngine.score` queues a *scoring job*: the log-probabilities of several
prompts' own tokens from one forward pass over all of them (a backend's :meth:`BaseEngine._score`), run on
the engine thread between decode steps. A job may carry one-token generations: the first answer token
of each prompt is sampled from the same pass's last-position logits, so a teacher's ``max_tokens: 1``
request (or lm-eval's loglikelihood request) costs one forward, not two.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from kdforge.runtime.sampling import SamplingParams, make_generator, sample_token
from kdforge.serve.detokenize import IncrementalDetokenizer, StopStringFilter, TokenPieces
from kdforge.serve.scoring import LOGPROB_FLOOR, PromptScores, ScoringUnavailable, floor

__all__ = ["LOGPROB_FLOOR", "BaseEngine", "ContextLengthExceeded", "GenerationHandle", "Output", "PromptScores",
           "ScoringUnavailable", "Sequence", "token_logprobs"]

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


def token_logprobs(logits: torch.Tensor, token: int, top: int, pieces: TokenPieces) -> dict:
    """OpenAI's logprob entry of ``token`` under ``logits`` (V,): log_softmax of the raw logits
    (temperature 1, as OpenAI reports them, whatever temperature sampled it) and the ``top`` likeliest.
    Every entry also carries the token's ``id`` (for vLLM's ``return_tokens_as_token_ids``)."""
    logp = torch.log_softmax(logits.float(), dim=-1)

    def entry(tid: int, value: float) -> dict:
        text, raw = pieces(tid)
        return {"token": text, "logprob": floor(float(value)), "bytes": raw, "id": tid}

    best = []
    if top > 0:
        values, ids = torch.topk(logp, min(top, logp.numel()))
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


@dataclass
class ScoreJob:
    """Prompts to score in one pass, and (optionally) one-token generations to sample from its last rows."""

    prompts: list[list[int]]
    top: int  # alternatives per position (the actual token is always scored)
    future: concurrent.futures.Future  # -> list[PromptScores], one per prompt
    handles: list[GenerationHandle]  # [] or one per prompt, each with max_tokens == 1


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
        self._jobs: queue.Queue[ScoreJob] = queue.Queue()
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
        if logprobs is not None and logprobs < 0:
            raise ValueError("logprobs must be >= 0")
        self.resolve_max_tokens(len(prompt_ids), params.max_tokens)  # raises if it cannot fit
        handle = GenerationHandle(next(self._ids), list(prompt_ids), params, self._wake, self._release,
                                  logprobs=logprobs)
        with self._lock:
            self._in_flight += 1
        self._inbox.put(handle)
        self._wake.set()
        return handle

    def score(self, prompts: list[list[int]], top: int, params: list[SamplingParams] | None = None,
              logprobs: int | None = None) -> tuple[concurrent.futures.Future, list[GenerationHandle]]:
        """Queue a scoring job: every prompt token's log-probability, its rank and the ``top`` likeliest
        alternatives at each position, from one forward pass (the future's result: one
        :class:`PromptScores` per prompt).

        ``params``: one per prompt, each with ``max_tokens == 1``: also sample each prompt's first answer
        token from the same pass (the returned handles deliver it, with ``logprobs`` as in :meth:`submit`).
        Raises ScoringUnavailable when the backend cannot score, ContextLengthExceeded when a prompt leaves
        no room for one token (vLLM's rule, also when nothing is generated).
        """
        if type(self)._score is BaseEngine._score:
            raise ScoringUnavailable(f"the {self.backend} engine cannot compute prompt log-probabilities")
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if top < 0 or (logprobs is not None and logprobs < 0):
            raise ValueError("top and logprobs must be >= 0")
        if params is not None and (len(params) != len(prompts) or any(p.max_tokens != 1 for p in params)):
            raise ValueError("one SamplingParams with max_tokens == 1 per prompt")
        for p in prompts:
            self.resolve_max_tokens(len(p), 1)  # raises if it cannot fit
        handles = [GenerationHandle(next(self._ids), list(p), pp, self._wake, self._release, logprobs=logprobs)
                   for p, pp in zip(prompts, params)] if params is not None else []
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._in_flight += len(prompts)  # each prompt takes a slot until its job (or its handle) is done
        self._jobs.put(ScoreJob([list(p) for p in prompts], top, future, handles))
        self._wake.set()
        return future, handles

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

    def _release(self, n: int = 1) -> None:
        with self._lock:
            self._in_flight -= n

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
        return self._inbox.qsize() + len(self._waiting) + self._jobs.qsize()

    # ---- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            self._run_scoring()
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
            self._waiting.append(Sequence(handle, self.tokenizer, self.eot_ids, self._pieces_for(handle)))

    def _has_work(self) -> bool:
        return bool(self._waiting) or self.num_active > 0 or not self._jobs.empty()

    def _run_scoring(self) -> None:
        """Run the queued scoring jobs (between decode steps: each is one bounded forward pass)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            self._score_job(job)

    def _score_job(self, job: ScoreJob) -> None:
        try:
            scores = self._score(job.prompts, job.top)
        except Exception as e:  # e.g. out of memory on a long prompt: fail this job, not the server
            if not isinstance(e, ScoringUnavailable):  # that one is the client's 400, not a failure
                log.exception("scoring failed")
                self.stats.errors += 1
            for handle in job.handles:
                Sequence(handle, self.tokenizer, self.eot_ids, self._pieces_for(handle)).finish(
                    "error", error=f"{type(e).__name__}: {e}")
            if not job.handles:
                self._release(len(job.prompts))
            job.future.set_exception(e)
            return
        self.stats.prompt_tokens += sum(len(p) for p in job.prompts)
        for handle, s in zip(job.handles, scores):
            seq = Sequence(handle, self.tokenizer, self.eot_ids, self._pieces_for(handle))
            if handle.cancelled:
                self._cancelled(seq)
                continue
            # max_tokens is 1: the first token ends the sequence (end of turn, a stop string or length).
            if not seq.accept(sample_token(s.next_logits, seq.params, seq.generator), s.next_logits):
                seq.finish("length")
            self._done(seq)
        if not job.handles:
            self._release(len(job.prompts))  # with handles, each released its slot when it finished
        job.future.set_result(scores)

    def _pieces_for(self, handle: GenerationHandle) -> TokenPieces | None:
        if handle.logprobs is not None and self._pieces is None:
            self._pieces = TokenPieces(self.tokenizer)
        return self._pieces

    def _score(self, prompts: list[list[int]], top: int) -> list[PromptScores]:
        """One :class:`PromptScores` per prompt from the model's logits at every position (fp32 log_softmax);
        a backend that can compute them overrides this."""
        raise ScoringUnavailable(f"the {self.backend} engine cannot compute prompt log-probabilities")

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
