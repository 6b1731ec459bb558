"""A model behind an OpenAI/vLLM-compatible server as a runtime: ``http(s)://host:port/v1[#model-name]``.

vLLM, SGLang and ``kdforge serve`` host a teacher on other GPUs or nodes; this runtime reaches it over
HTTP and gives the stages what they take from a local teacher:

- **top-k log-probabilities at every prompt position** (`prompt_topk`, `topk_logprobs`): one
  ``POST /v1/completions`` per sequence with the prompt as token ids, ``max_tokens: 1``,
  ``prompt_logprobs: k`` and ``return_tokens_as_token_ids: true``; vLLM's ``prompt_logprobs`` (None for
  the first position, then ``{"<id>": {"logprob", "rank", ...}}`` with the prompt's own token first and
  the k likeliest after it) is parsed back to (L-1, k) values and ids, likeliest first;
- **generation** (`generate`): ``POST /v1/completions`` with the token-id prompt (rendered by the local
  chat template, so the server sees exactly the tokens a local teacher would), the sampling parameters
  (temperature 0 = greedy, top-p, a seed per sequence), ``stop_token_ids`` and ``logprobs: 0`` with
  ``return_tokens_as_token_ids`` so the answer comes back as token ids; `chat` sends messages through
  ``POST /v1/chat/completions`` instead (the server's chat template).

The tokenizer stays local (``tokenizer``: the teacher's tokenizer folder, or any spec
`kdforge.models.loading.load_tokenizer` reads). On open the runtime asks every server for its model
(``GET /v1/models``; ``#name`` picks one) and checks that it tokenizes a probe text as the local tokenizer
does (``POST /tokenize``, vLLM's endpoint outside ``/v1``; where a server has none, the prompt ids its
``prompt_logprobs`` echo back): a mismatch is a :class:`ServedModelError`, never a silent misalignment.

Several URLs (comma-separated) share the load: each has at most ``max_in_flight`` requests in flight and a
request goes to the least busy one. Connection errors, timeouts, 429 and 502/503/504 are retried with
exponential backoff (honouring ``Retry-After``) up to ``retries`` times; a k above the server's cap
(vLLM's 400 "... greater than max allowed: 20") is an error telling the user to restart the server with
``--max-logprobs K``. httpx is imported when a served model is opened.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from kdforge.errors import UserError
from kdforge.models.forward import target_positions
from kdforge.runtime.base import SERVED, CausalLM
from kdforge.runtime.sampling import SamplingParams

log = logging.getLogger("kdforge.runtime.served")

SCHEMES = ("http://", "https://")
API_KEY_ENV = "KDFORGE_API_KEY"  # sent as a bearer token when set (kdforge serve reads the same variable)
PROBE_TEXT = "Hello, world! The quick brown fox costs $12.50 -- naïve café, 東京, 🙂\n\tdone."
RETRY_STATUS = (429, 502, 503, 504)
TOKEN_ID_PREFIX = "token_id:"
DEFAULTS = {"max_in_flight": 4, "timeout": 600.0, "retries": 8, "backoff": 0.5}


class ServedModelError(UserError):
    """A served model that cannot be used as asked: unreachable, another tokenizer, a cap too low."""


def is_served_spec(spec: str) -> bool:
    """True for ``http(s)://...`` model specs (one URL or several, comma-separated)."""
    return isinstance(spec, str) and spec.strip().lower().startswith(SCHEMES)


def parse_spec(spec: str) -> tuple[list[str], str | None]:
    """``http://a:8000/v1,http://b:8000/v1#name`` -> (the ``/v1`` base URLs, the model name or None)."""
    urls, names = [], set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if not part.lower().startswith(SCHEMES):
            raise ServedModelError(f"{part!r} in the model spec {spec!r} is not an http(s):// URL")
        base, _, name = part.partition("#")
        parts = urlsplit(base)
        if not parts.netloc:
            raise ServedModelError(f"{part!r}: no host in the URL (expected http(s)://host:port/v1[#model])")
        base = base.rstrip("/")
        if not parts.path.strip("/"):
            base += "/v1"  # http://host:port means its OpenAI API at /v1
        if name:
            names.add(name)
        urls.append(base)
    if not urls:
        raise ServedModelError(f"no URL in the model spec {spec!r}")
    if len(names) > 1:
        raise ServedModelError(f"the URLs of {spec!r} name different models: {sorted(names)}")
    return urls, (names.pop() if names else None)


def root_of(base: str) -> str:
    """``http://h:p/v1`` -> ``http://h:p`` (vLLM's tokenizer endpoints sit outside /v1)."""
    return base[: -len("/v1")] if base.endswith("/v1") else base


@dataclass
class PromptTopK:
    """The server's top-k at every position of one prompt of L tokens: row i predicts prompt[i+1]."""

    logprobs: torch.Tensor  # (L-1, k) fp32, descending
    ids: torch.Tensor  # (L-1, k) long
    own: torch.Tensor | None = None  # (L-1,) fp32: the log-prob of the prompt's own next token (listed first)


def parse_prompt_logprobs(entries: list, k: int, prompt: list[int] | None = None) -> PromptTopK:
    """vLLM's ``prompt_logprobs`` of one prompt (None, then a dict per position keyed by the token id as a
    string) -> the k likeliest tokens per position. The prompt's own token (listed first, with its rank)
    is one of them only when it is among the k likeliest. ``prompt``: checked against the first keys."""
    if not isinstance(entries, list) or not entries:
        raise ServedModelError(f"the server's prompt_logprobs are not a list of positions: {str(entries)[:200]}")
    if prompt is not None and len(entries) != len(prompt):
        raise ServedModelError(f"the server returned prompt_logprobs for {len(entries)} positions of a "
                               f"{len(prompt)}-token prompt")
    values = torch.empty(len(entries) - 1, k, dtype=torch.float32)
    ids = torch.empty(len(entries) - 1, k, dtype=torch.long)
    own = torch.empty(len(entries) - 1, dtype=torch.float32)
    for i, pos in enumerate(entries[1:]):
        if not isinstance(pos, dict):
            raise ServedModelError(f"prompt_logprobs position {i + 1} is {pos!r}, not a dict of token ids")
        if prompt is not None and pos and next(iter(pos)) != str(prompt[i + 1]):
            raise ServedModelError(f"prompt_logprobs position {i + 1} starts with token {next(iter(pos))}, not "
                                   f"the prompt's token {prompt[i + 1]}: the server scored another prompt")
        # Likeliest first; among equal values the server's rank order (its top-k order).
        ranked = sorted(((float(e["logprob"]), int(e.get("rank") or 0), int(t)) for t, e in pos.items()),
                        key=lambda x: (-x[0], x[1]))
        if len(ranked) < k:
            raise ServedModelError(f"the server returned {len(ranked)} log-probabilities at position {i + 1}, "
                                   f"fewer than the {k} asked for")
        values[i] = torch.tensor([v for v, _, _ in ranked[:k]])
        ids[i] = torch.tensor([t for _, _, t in ranked[:k]])
        own[i] = float(next(iter(pos.values()))["logprob"])  # vLLM lists the prompt's token first
    return PromptTopK(values, ids, own)


def answer_ids(choice: dict, tokenizer: Any = None) -> list[int]:
    """The generated token ids of a completion choice: its ``logprobs.tokens`` written ``token_id:N``
    (vLLM's ``return_tokens_as_token_ids``), or ``token_ids`` where a server returns them; else the text
    tokenized locally (lossy: a server that returns neither)."""
    if isinstance(choice.get("token_ids"), list):
        return [int(t) for t in choice["token_ids"]]
    tokens = ((choice.get("logprobs") or {}).get("tokens")) or []
    if tokens and all(isinstance(t, str) and t.startswith(TOKEN_ID_PREFIX) for t in tokens):
        return [int(t[len(TOKEN_ID_PREFIX):]) for t in tokens]
    if not choice.get("text"):
        return []
    if tokenizer is None:
        raise ServedModelError("the server returned the answer as text only (no token ids)")
    return list(tokenizer(choice["text"], add_special_tokens=False)["input_ids"])


def error_message(resp) -> str:
    """The message of an error response, in vLLM's shapes (``{"error": {"message"}}`` or ``{"message"}``)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "detail" in body:
            return str(body["detail"])
    return json.dumps(body)[:500]


class _Slots:
    """At most ``per_url`` requests in flight on each URL; :meth:`take` gives the least busy one."""

    def __init__(self, urls: list[str], per_url: int):
        self.busy = dict.fromkeys(urls, 0)
        self.per_url = per_url
        self._cond = threading.Condition()
        self._turn = 0

    def take(self) -> str:
        with self._cond:
            while min(self.busy.values()) >= self.per_url:
                self._cond.wait()
            least = min(self.busy.values())
            free = [u for u, n in self.busy.items() if n == least]
            self._turn += 1
            url = free[self._turn % len(free)]
            self.busy[url] += 1
            return url

    def give(self, url: str) -> None:
        with self._cond:
            self.busy[url] -= 1
            self._cond.notify()


class ServedRuntime(CausalLM):
    """A model behind one or more vLLM-compatible servers, with the local tokenizer."""

    backend = SERVED
    max_batch = None

    def __init__(self, spec: str, tokenizer: Any, tokenizer_spec: str, *, max_in_flight: int = 4,
                 timeout: float = 600.0, retries: int = 8, backoff: float = 0.5, api_key: str | None = None,
                 check_tokenizer: bool = True) -> None:
        import httpx

        self.spec = spec
        self.urls, wanted = parse_spec(spec)
        self._tokenizer = tokenizer
        self.tokenizer_spec = tokenizer_spec
        self.max_in_flight, self.timeout, self.retries, self.backoff = max_in_flight, timeout, retries, backoff
        self._slots = _Slots(self.urls, max_in_flight)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        total = max_in_flight * len(self.urls)
        self._client = httpx.Client(timeout=timeout, headers=headers,
                                    limits=httpx.Limits(max_connections=total + len(self.urls),
                                                        max_keepalive_connections=total + len(self.urls)))
        self._pool = ThreadPoolExecutor(max_workers=total, thread_name_prefix="kdforge-served")
        self.stats = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._stats_lock = threading.Lock()
        try:
            self.model_name = self._model_name(wanted)
            if check_tokenizer:
                for url in self.urls:
                    self.check_tokenizer(url)
        except BaseException:
            self.close()
            raise

    # ---- opening -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
             context: int | None = None, trust_remote_code: bool = False,
             placement: dict[str, Any] | None = None, tokenizer: str | None = None,
             max_in_flight: int | None = None, timeout: float | None = None, retries: int | None = None,
             backoff: float | None = None, check_tokenizer: bool = True) -> ServedRuntime:
        """Open the served model ``spec``; ``tokenizer``: the teacher's tokenizer (a folder or model spec),
        required. device/dtype/threads/context do not apply (the server placed the model); a placement
        that asks for more than the default (a device map, int8/4bit) is refused."""
        from kdforge.models.loading import load_tokenizer

        asked = {k: v for k, v in (placement or {}).items() if v not in (None, "auto", False)}
        if asked:
            raise ServedModelError(f"{spec} is a served model: the server places its weights; "
                                   f"{', '.join(sorted(asked))} do not apply")
        if not tokenizer:
            raise ServedModelError(f"{spec} is a served model: name the teacher's tokenizer with --set "
                                   "tokenizer=DIR (the model's folder or its tokenizer files; it must tokenize "
                                   "as the server does)")
        tok = _local_tokenizer(tokenizer, trust_remote_code) if Path(tokenizer).is_dir() and not \
            (Path(tokenizer) / "config.json").is_file() else load_tokenizer(tokenizer, trust_remote_code)
        opts = {"max_in_flight": max_in_flight, "timeout": timeout, "retries": retries, "backoff": backoff}
        opts = {k: DEFAULTS[k] if v is None else v for k, v in opts.items()}
        return cls(spec, tok, tokenizer, api_key=os.environ.get(API_KEY_ENV) or None,
                   check_tokenizer=check_tokenizer, **opts)

    def _model_name(self, wanted: str | None) -> str:
        names = None
        for url in self.urls:
            body = self._request("GET", url, "/models")
            here = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]
            if wanted is not None and wanted not in here:
                raise ServedModelError(f"{url} serves {here}, not {wanted!r} (the name after # in the spec)")
            if wanted is None and len(here) != 1:
                raise ServedModelError(f"{url} serves {len(here)} models ({here}): name one, {url}#NAME")
            if names is not None and wanted is None and here != names:
                raise ServedModelError(f"the servers of {self.spec} serve different models: {names} and {here}")
            names = here
        return wanted if wanted is not None else names[0]

    def check_tokenizer(self, url: str, text: str = PROBE_TEXT) -> None:
        """Refuse a server that tokenizes ``text`` otherwise than the local tokenizer."""
        import httpx

        mine = list(self._tokenizer(text)["input_ids"])
        try:
            body = self._request("POST", root_of(url), "/tokenize",
                                 {"model": self.model_name, "prompt": text, "add_special_tokens": True},
                                 passthrough=(404, 405))
        except httpx.HTTPStatusError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("tokens"), list):
            theirs = [int(t) for t in body["tokens"]]
            how = "/tokenize"
        else:  # no /tokenize: the prompt's ids are the first keys of its prompt_logprobs
            resp = self._request("POST", url, "/completions",
                                 {"model": self.model_name, "prompt": text, "max_tokens": 1, "temperature": 0,
                                  "prompt_logprobs": 1})
            lps = resp["choices"][0].get("prompt_logprobs") or []
            theirs = [mine[0] if mine else -1] + [int(next(iter(p))) for p in lps[1:]]
            how = "the prompt ids of /v1/completions"
        if theirs != mine:
            at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            raise ServedModelError(
                f"{url} tokenizes differently from the local tokenizer {self.tokenizer_spec} (checked with {how} "
                f"on a probe text: {len(theirs)} tokens there, {len(mine)} here, first difference at token {at}: "
                f"{theirs[at:at + 3]} there, {mine[at:at + 3]} here). Point --set tokenizer= at the served "
                "model's own tokenizer folder, or serve the model that goes with it: labels from another "
                "tokenizer would be misaligned")

    # ---- HTTP with retries -----------------------------------------------------------------------
    def _request(self, method: str, base: str, path: str, body: dict | None = None,
                 passthrough: tuple[int, ...] = ()) -> dict:
        """One request to ``base + path`` (a fixed server), retried on connection errors, timeouts, 429 and 5xx."""
        return self._send(method, path, body, fixed=base, passthrough=passthrough)

    def _post(self, path: str, body: dict) -> dict:
        """POST ``/v1`` + ``path`` to the least busy URL (another one, maybe, on each retry)."""
        return self._send("POST", path, body)

    def _send(self, method: str, path: str, body: dict | None, fixed: str | None = None,
              passthrough: tuple[int, ...] = ()) -> dict:
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            base = fixed or self._slots.take()
            wait = None
            try:
                resp = self._client.request(method, base + path, json=body)
            except httpx.TransportError as e:  # refused, reset, timed out, closed mid-answer
                last = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code < 400:
                    return resp.json()
                if resp.status_code in passthrough:
                    raise httpx.HTTPStatusError(f"{resp.status_code}", request=resp.request, response=resp)
                if resp.status_code not in RETRY_STATUS:
                    raise self._refusal(base, path, body, resp)
                last = f"HTTP {resp.status_code}: {error_message(resp)}"
                after = resp.headers.get("retry-after")
                wait = float(after) if after and after.replace(".", "", 1).isdigit() else None
            finally:
                if fixed is None:
                    self._slots.give(base)
            if attempt == self.retries:
                break
            with self._stats_lock:
                self.stats["retries"] += 1
            delay = wait if wait is not None else self.backoff * 2 ** attempt * (0.5 + random.random())
            log.warning("%s%s: %s; retry %d of %d in %.1fs", fixed or "", path, last, attempt + 1, self.retries,
                        delay)
            time.sleep(min(delay, 60.0))
        where = fixed or ", ".join(self.urls)
        raise ServedModelError(f"{where}{path} failed after {self.retries + 1} attempts ({last}). Is the server "
                               "running? A re-run of the stage resumes where this one stopped")

    def _refusal(self, base: str, path: str, body: dict | None, resp) -> ServedModelError:
        message = error_message(resp)
        if resp.status_code == 400 and "greater than max allowed" in message:
            k = max(int((body or {}).get("prompt_logprobs") or 0), int((body or {}).get("logprobs") or 0))
            return ServedModelError(
                f"{base} refused {k} log-probabilities per position ({message}). Restart the server with "
                f"--max-logprobs {k} or more (vllm serve MODEL --max-logprobs {k}; kdforge serve MODEL "
                f"--max-logprobs {k}; SGLang has no cap), or ask for fewer (top_k)")
        if resp.status_code in (401, 403):
            return ServedModelError(f"{base}{path}: {resp.status_code} {message} (set {API_KEY_ENV} to the "
                                    "server's API key)")
        return ServedModelError(f"{base}{path} answered {resp.status_code}: {message}")

    def _count(self, usage: dict | None) -> None:
        with self._stats_lock:
            self.stats["requests"] += 1
            for key in ("prompt_tokens", "completion_tokens"):
                self.stats[key] += int((usage or {}).get(key) or 0)

    def _map(self, fn, items: list, progress: Callable[[int], Any] | None = None) -> list:
        """``fn`` over ``items`` concurrently (up to every URL's slots), results in order; ``progress(1)`` after
        each (on this thread). The first error is raised once the requests in flight are done; the
        ones not yet sent are dropped."""
        futures = [self._pool.submit(fn, x) for x in items]
        try:
            for future in as_completed(futures):
                future.result()
                if progress is not None:
                    progress(1)
        except BaseException:
            for future in futures:
                future.cancel()
            wait(futures)
            raise
        return [f.result() for f in futures]

    # ---- what the stages ask for -----------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def vocab_rows(self) -> int:  # type: ignore[override]
        return len(self._tokenizer)  # the server's logit columns are not known; its ids stay below this

    def stop_ids(self, tokenizer: Any = None) -> list[int]:
        from kdforge.models.loading import end_of_turn_ids

        return end_of_turn_ids(tokenizer or self._tokenizer, _GenerationConfigOf(self.tokenizer_spec))

    def prompt_topk(self, prompts: list[list[int]], k: int, progress: Callable[[int], Any] | None = None
                    ) -> list[PromptTopK]:
        """The server's k likeliest next tokens at every position of each prompt (requests concurrent;
        ``progress(1)`` as each is answered)."""
        def one(prompt: list[int]) -> PromptTopK:
            body = self._post("/completions", {
                "model": self.model_name, "prompt": list(prompt), "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": k, "return_tokens_as_token_ids": True})
            self._count(body.get("usage"))
            choices = body.get("choices") or []
            if len(choices) != 1 or "prompt_logprobs" not in choices[0]:
                raise ServedModelError("the server's answer has no prompt_logprobs: it does not speak vLLM's "
                                       "protocol (vLLM, SGLang or kdforge serve do)")
            return parse_prompt_logprobs(choices[0]["prompt_logprobs"], k, list(prompt))

        return self._map(one, [list(p) for p in prompts], progress)

    def topk_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      vocab: int, k: int, own: bool = False) -> tuple[torch.Tensor, ...]:
        """(N, k) log-probs and ids at the target positions; with ``own`` also (N,) the log-probs of the
        targets as written (what a student with another tokenizer needs: kdforge.distill.cross_losses)."""
        lengths = attention_mask.sum(1).tolist()
        rows = self.prompt_topk([input_ids[b, :n].tolist() for b, n in enumerate(lengths)], k)
        mask = target_positions(labels.cpu())  # (B, T-1)
        values, ids, mine = [], [], []
        for b, got in enumerate(rows):
            keep = mask[b, : lengths[b] - 1]
            values.append(got.logprobs[keep])
            ids.append(got.ids[keep])
            if own:
                mine.append(got.own[keep])
        return (torch.cat(values), torch.cat(ids)) + ((torch.cat(mine),) if own else ())

    def target_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      vocab: int) -> torch.Tensor:
        raise ServedModelError(f"{self.spec} is a served model: it gives top-k log-probabilities "
                               "(topk_logprobs), not whole logit rows")

    def sequence_logits(self, ids: list[int]) -> torch.Tensor:
        return self.target_logits(None, None, None, 0)  # type: ignore[arg-type]

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer(text)["input_ids"])

    def generate(self, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int],
                 generators: list[torch.Generator] | None = None, batch_size: int = 16,
                 vocab: int | None = None) -> list[list[int]]:
        """Each prompt one ``/v1/completions`` request (concurrent); sampled ones carry the seed of their
        generator (``initial_seed``), so kdforge serve draws what the local runtime draws with it."""
        if generators is not None and len(generators) != len(prompts):
            raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts")
        stops = set(stop_ids)

        def one(i: int) -> list[int]:
            body = {"model": self.model_name, "prompt": list(prompts[i]), "max_tokens": params.max_tokens,
                    "temperature": 0.0 if params.greedy else params.temperature, "top_p": params.top_p,
                    "n": 1, "logprobs": 0, "return_tokens_as_token_ids": True, "stop_token_ids": sorted(stops),
                    "ignore_eos": params.ignore_eos}
            seed = generators[i].initial_seed() if generators is not None else params.seed
            if seed is not None:
                body["seed"] = int(seed) & 0x7FFF_FFFF_FFFF_FFFF
            if params.stop:
                body["stop"] = list(params.stop)
            resp = self._post("/completions", body)
            self._count(resp.get("usage"))
            ids = answer_ids(resp["choices"][0], self._tokenizer)
            while ids and ids[-1] in stops and not params.ignore_eos:
                ids.pop()  # servers differ on whether the end-of-turn token is listed: never keep it
            return ids

        return self._map(one, list(range(len(prompts))))

    def chat(self, conversations: list[list[dict]], params: SamplingParams, seeds: list[int | None] | None = None
             ) -> list[dict]:
        """Each conversation one ``/v1/chat/completions`` request (the server's chat template; concurrent):
        ``{"text", "finish_reason", "prompt_tokens", "completion_tokens"}`` per conversation."""
        def one(i: int) -> dict:
            body = {"model": self.model_name, "messages": conversations[i], "max_tokens": params.max_tokens,
                    "temperature": 0.0 if params.greedy else params.temperature, "top_p": params.top_p, "n": 1}
            seed = seeds[i] if seeds is not None else params.seed
            if seed is not None:
                body["seed"] = int(seed) & 0x7FFF_FFFF_FFFF_FFFF
            if params.stop:
                body["stop"] = list(params.stop)
            resp = self._post("/chat/completions", body)
            usage = resp.get("usage") or {}
            self._count(usage)
            choice = resp["choices"][0]
            return {"text": (choice.get("message") or {}).get("content") or "",
                    "finish_reason": choice.get("finish_reason"),
                    "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}

        return self._map(one, list(range(len(conversations))))

    def decode_speed(self, prompt_ids: list[int], new_tokens: int, batch: int = 1,
                     repeats: int = 2) -> dict[str, Any]:
        raise ServedModelError(f"{self.spec} is a served model: its decode speed is the server's "
                               "(benchmark it there)")

    def num_parameters(self) -> int:
        raise ServedModelError(f"{self.spec} is a served model: its size is not known here")

    def close(self) -> None:
        pool, client = getattr(self, "_pool", None), getattr(self, "_client", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if client is not None:
            client.close()


def _local_tokenizer(folder: str, trust_remote_code: bool):
    """A folder of tokenizer files only (no model config.json)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types; the user needs the path and the cause
        raise ServedModelError(f"could not read a tokenizer from {folder}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class _GenerationConfigOf:
    """A stand-in model whose ``generation_config`` is the tokenizer folder's generation_config.json (its
    eos ids end a turn too), for `end_of_turn_ids`."""

    def __init__(self, spec: str):
        self.generation_config = None
        path = Path(spec) / "generation_config.json"
        if path.is_file():
            try:
                eos = json.loads(path.read_text()).get("eos_token_id")
            except (OSError, ValueError):
                eos = None
            self.generation_config = type("GenerationConfig", (), {"eos_token_id": eos})()

