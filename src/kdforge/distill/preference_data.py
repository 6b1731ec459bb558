"""Preference data for DPO, KTO and DistiLLM-2: candidates sampled per prompt, ranked by the teacher, as pairs
and singles; and the reader the trainer uses (`load_pairs`, `load_singles`).

`kdforge prefs` (stages/prefs.py) drives it: for each prompt the sampler (usually the student) draws
``num_samples`` answers with kdforge's one sampler, each from a generator seeded by (seed, conversation id,
sample index) alone, so an answer does not depend on the batch it was drawn in, on a resume, or on the other
prompts; the teacher scores every candidate (:func:`loglik_scores`: its length-normalised log-likelihood of
the answer, or :func:`judge_scores`: a 1-10 grade from a fixed prompt); :func:`rank` orders them and
:func:`build_pairs` / :func:`build_singles` turn a ranked conversation into DPO pairs and KTO singles.

Nothing here knows file names: the stage declares its layout (``FILES``) and the readers find the products
through an artifact's meta.json (`kdforge.artifacts.product`). The readers also take a plain JSONL in TRL's
formats (``{"prompt", "chosen", "rejected"}``; ``{"prompt", "completion", "label"}``), so a user's own
preference data trains without this stage. Format: docs/preferences.md.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdforge.artifacts import META_NAME, product
from kdforge.data.formats import ROLES, DataError, read_jsonl

SAMPLER, DATA = "sampler", "data"  # where a candidate came from ("from" in the files)
SPLITS = ("train", "validation", "all")

# The judge's prompt (rank_by=judge), verbatim in docs/preferences.md: one user turn, answered greedily.
JUDGE_PROMPT = (
    "You are grading an AI assistant's answer. Read the conversation and the answer, then rate the answer "
    "from 1 (wrong, unhelpful or off-topic) to 10 (correct, helpful, clear and complete).\n\n"
    "[Conversation]\n{conversation}\n\n"
    "[Answer]\n{answer}\n\n"
    "Reply with the score only: one whole number from 1 to 10."
)
JUDGE_MAX_TOKENS = 8  # "7", "Score: 7", "8/10": a grade needs a few tokens, never an essay
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


# ---- candidates ---------------------------------------------------------------------------------------

@dataclass
class Candidate:
    """One answer to a prompt. ``tokens``: the sampler's answer tokens without the end-of-turn (None for the
    data's own answer); ``finished``: it ended its turn (False: no text, or cut at max_new_tokens)."""

    text: str
    source: str  # SAMPLER or DATA
    sample: int | None  # the sample index (None for the data's own answer)
    tokens: int | None
    finished: bool
    score: float | None = None  # the teacher's; None: not scored (a judge reply without a grade)
    judge: str | None = None  # rank_by=judge: the judge's reply the score was read from

    def to_json(self) -> dict[str, Any]:
        d = {"text": self.text, "from": self.source, "sample": self.sample, "tokens": self.tokens,
             "finished": self.finished, "score": self.score}
        if self.judge is not None:
            d["judge"] = self.judge
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Candidate:
        return cls(text=d["text"], source=d["from"], sample=d.get("sample"), tokens=d.get("tokens"),
                   finished=bool(d.get("finished", True)), score=d.get("score"), judge=d.get("judge"))


def candidate_seed(seed: int, conversation_id: str, sample: int) -> int:
    """The sampling seed of one (conversation, sample): a function of these alone, so a resumed run, another
    batch size or another selection of prompts draws the same answer."""
    return seed * 1_000_003 + zlib.crc32(f"{conversation_id}/{sample}".encode())


def sample_candidates(lm, prompts: list[tuple[str, list[dict]]], num_samples: int, params, seed: int,
                      batch_size: int) -> list[list[Candidate]]:
    """``num_samples`` answers per (conversation id, prompt messages) from the runtime ``lm``, batch_size
    sequences per `CausalLM.generate` call; one list of candidates per prompt, in sample order."""
    from kdforge.data.chat import encode_prompt
    from kdforge.runtime import make_generator

    tok = lm.tokenizer
    encoded = [encode_prompt(tok, messages) for _, messages in prompts]
    jobs = [(i, k) for i in range(len(prompts)) for k in range(num_samples)]
    answers = lm.generate([encoded[i] for i, _ in jobs], params, lm.stop_ids(),
                          [make_generator(candidate_seed(seed, prompts[i][0], k)) for i, k in jobs],
                          batch_size=batch_size)
    out: list[list[Candidate]] = [[] for _ in prompts]
    for (i, k), ids in zip(jobs, answers):
        text = tok.decode(ids, skip_special_tokens=True).strip()
        # Answers come without their stop token: as long as the cap means the turn never ended.
        finished = bool(text) and len(ids) < params.max_tokens
        out[i].append(Candidate(text, SAMPLER, k, len(ids), finished))
    return out


# ---- ranking ------------------------------------------------------------------------------------------

def answer_encoding(tokenizer, prompt: list[dict], answer: str, max_length: int | None = None):
    """``prompt`` + the assistant ``answer`` in the tokenizer's chat template, labels on the answer's tokens
    (its end-of-turn included) only: earlier assistant turns of a multi-turn prompt are not the answer.
    ``max_length``: cut on the right (what is left of the answer keeps its labels)."""
    from kdforge.data.chat import IGNORE_INDEX, EncodedConversation, encode_conversation

    enc = encode_conversation(tokenizer, [*prompt, {"role": "assistant", "content": answer}], max_length)
    labels = list(enc.labels)
    # The answer is the last run of labelled tokens (a user turn separates it from any earlier one).
    end = max((t for t, x in enumerate(labels) if x != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    labels = [x if start <= t <= end else IGNORE_INDEX for t, x in enumerate(labels)]
    return EncodedConversation(enc.input_ids, labels)


def loglik_scores(lm, prompt: list[dict], answers: list[str], vocab: int, whole_rows: bool = True) -> list[float]:
    """The teacher's mean log-probability of each answer's tokens (end-of-turn included) after ``prompt``,
    in the teacher's own tokenisation: mean over t of log p_teacher(answer_t | prompt, answer_<t).

    The answers are one batch, so a score depends on its conversation alone (not on which others share a
    forward pass). ``whole_rows``: the runtime gives logit rows (`target_logits`: a local model); False: a
    served model, which gives the log-probability of each written token (`topk_logprobs(..., own=True)`).
    """
    import torch

    from kdforge.data.batching import collate
    from kdforge.models.forward import target_positions

    tok = lm.tokenizer
    encs = [answer_encoding(tok, prompt, a) for a in answers]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batch = collate(encs, int(pad))
    mask = target_positions(batch["labels"])  # (B, T-1)
    targets = batch["labels"][:, 1:][mask]  # (N,)
    if whole_rows:
        logits = lm.target_logits(batch["input_ids"], batch["attention_mask"], batch["labels"], vocab)  # (N, V)
        logp = torch.log_softmax(logits.float().cpu(), dim=-1)  # (N, V)
        token_lp = logp.gather(1, targets[:, None]).squeeze(1)  # (N,)
    else:
        token_lp = lm.topk_logprobs(batch["input_ids"], batch["attention_mask"], batch["labels"], vocab, 1,
                                    own=True)[2].float().cpu()  # (N,)
    per_answer = torch.split(token_lp, mask.sum(1).tolist())  # B tensors of each answer's token log-probs
    return [float(x.double().mean()) for x in per_answer]


def judge_messages(prompt: list[dict], answer: str) -> list[dict]:
    """The one user turn the judge answers for (prompt, answer): JUDGE_PROMPT filled in."""
    conversation = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)
    return [{"role": "user", "content": JUDGE_PROMPT.format(conversation=conversation, answer=answer)}]


def parse_judge_score(reply: str) -> float | None:
    """The grade in a judge's reply: its first number, when it lies in [1, 10] ("8", "Score: 8", "8/10");
    None otherwise (no number, or 0, 11, ...)."""
    m = _NUMBER.search(reply)
    if m is None:
        return None
    value = float(m.group())
    return value if 1.0 <= value <= 10.0 else None


def judge_scores(lm, prompt: list[dict], answers: list[str]) -> tuple[list[float | None], list[str]]:
    """The judge's grade of each answer (None where its greedy reply holds none) and the replies."""
    from kdforge.data.chat import encode_prompt
    from kdforge.runtime import SamplingParams

    tok = lm.tokenizer
    encoded = [encode_prompt(tok, judge_messages(prompt, a)) for a in answers]
    ids = lm.generate(encoded, SamplingParams(max_tokens=JUDGE_MAX_TOKENS, temperature=0.0), lm.stop_ids(),
                      None, batch_size=len(encoded))
    replies = [tok.decode(x, skip_special_tokens=True).strip() for x in ids]
    return [parse_judge_score(r) for r in replies], replies


def rank(candidates: list[Candidate]) -> list[int]:
    """Indices of the scored candidates with distinct texts, best first. Ties keep list order (samples in
    index order, then the data's answer), so equal scores always rank the same way; a text that occurs
    twice counts once (its first occurrence), since a pair of equal texts teaches nothing."""
    seen: set[str] = set()
    kept = []
    for i, c in enumerate(candidates):
        if c.score is None or c.text in seen or not math.isfinite(c.score):
            continue
        seen.add(c.text)
        kept.append(i)
    return sorted(kept, key=lambda i: (-candidates[i].score, i))


# ---- pairs and singles ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreferencePair:
    """One DPO / DistiLLM-2 example: the prompt messages and a chosen and a rejected answer (text)."""

    id: str
    split: str
    category: str
    messages: list[dict]  # the prompt (system/user/assistant turns, ending before the answer)
    chosen: str
    rejected: str
    chosen_score: float | None = None
    rejected_score: float | None = None
    chosen_from: str = SAMPLER
    rejected_from: str = SAMPLER

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PreferenceSingle:
    """One KTO example: the prompt messages, an answer and whether it is desirable."""

    id: str
    split: str
    category: str
    messages: list[dict]
    completion: str
    desirable: bool
    score: float | None = None
    source: str = SAMPLER

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["from"] = d.pop("source")
        return d


def skip_reason(candidates: list[Candidate], order: list[int], min_margin: float) -> str | None:
    """Why a ranked conversation gives no pairs or singles: fewer than two scored distinct answers, best and
    worst equal ("tie"), or closer than ``min_margin`` ("margin"); None when it gives some."""
    if len(order) < 2:
        return "too_few_scored"
    gap = candidates[order[0]].score - candidates[order[-1]].score
    if gap <= 0:
        return "tie"
    if gap < min_margin:
        return "margin"
    return None


def build_pairs(row: dict[str, Any], candidates: list[Candidate], mode: str, min_margin: float
                ) -> tuple[list[PreferencePair], str | None]:
    """A conversation's DPO pairs and, when it gives none, why (:func:`skip_reason`).

    ``best_worst``: the best against the worst; ``all``: every (better, worse) pair with a score gap of at
    least ``min_margin`` (and above 0), better one's rank first. ``row``: its id, split, category, messages.
    """
    order = rank(candidates)
    reason = skip_reason(candidates, order, min_margin)
    if reason is not None:
        return [], reason
    if mode == "best_worst":
        chosen_rejected = [(order[0], order[-1])]
    else:
        chosen_rejected = [(a, b) for x, a in enumerate(order) for b in order[x + 1:]
                           if 0 < candidates[a].score - candidates[b].score >= min_margin]
    pairs = [PreferencePair(row["id"], row["split"], row["category"], row["messages"], candidates[a].text,
                            candidates[b].text, candidates[a].score, candidates[b].score, candidates[a].source,
                            candidates[b].source) for a, b in chosen_rejected]
    return pairs, None


def build_singles(row: dict[str, Any], candidates: list[Candidate], min_margin: float
                  ) -> tuple[list[PreferenceSingle], str | None]:
    """A conversation's KTO singles (median split): above the median of its scores desirable, below it
    undesirable, at it dropped; the conversations :func:`skip_reason` skips give none."""
    order = rank(candidates)
    reason = skip_reason(candidates, order, min_margin)
    if reason is not None:
        return [], reason
    median = statistics.median(candidates[i].score for i in order)
    singles = [PreferenceSingle(row["id"], row["split"], row["category"], row["messages"], candidates[i].text,
                                candidates[i].score > median, candidates[i].score, candidates[i].source)
               for i in order if candidates[i].score != median]
    return singles, None


# ---- reading: the artifact's products or a user's TRL-format JSONL ----------------------------------------

def _fail(where: str, what: str) -> DataError:
    return DataError(f"{where}: {what}. Rows are kdforge prefs rows or TRL's format; see docs/preferences.md")


def _messages(value: Any, where: str, field: str, need_user: bool = True) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _fail(where, f"'{field}' must be a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _fail(where, f"{field}[{j}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise _fail(where, f"{field}[{j}].role is {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise _fail(where, f"{field}[{j}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if need_user and not any(m["role"] == "user" for m in out):
        raise _fail(where, f"'{field}' has no user message")
    return out


def _prompt(value: Any, where: str, field: str = "prompt") -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise _fail(where, f"'{field}' is empty")
        return [{"role": "user", "content": value}]
    msgs = _messages(value, where, field)
    if msgs[-1]["role"] == "assistant":
        raise _fail(where, f"'{field}' ends with an assistant turn; the prompt ends before the answer")
    return msgs


def _answer(value: Any, where: str, field: str) -> str:
    """An answer: a string, or TRL's conversational form, a list holding one assistant message."""
    if isinstance(value, str):
        return value
    msgs = _messages(value, where, field, need_user=False)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise _fail(where, f"'{field}' must be a string or a list of exactly one assistant message "
                    f"(got roles {[m['role'] for m in msgs]})")
    return msgs[0]["content"]


def _implicit(chosen: Any, rejected: Any, where: str) -> tuple[list[dict], str, str]:
    """TRL's implicit-prompt form: chosen and rejected are whole conversations that differ in the last
    (assistant) message only; the shared turns are the prompt."""
    c, r = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise _fail(where, "with no 'prompt', 'chosen' and 'rejected' must be conversations ending with an "
                    "assistant message")
    if c[:-1] != r[:-1]:
        raise _fail(where, "with no 'prompt', 'chosen' and 'rejected' must share every message but the last "
                    "(the shared turns are the prompt)")
    return _prompt(c[:-1], where, "chosen[:-1]"), c[-1]["content"], r[-1]["content"]


def _score(rec: dict, key: str, where: str) -> float | None:
    v = rec.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(where, f"'{key}' must be a number or null, not {v!r}")
    return float(v)


def _common(rec: dict, where: str, default_id: str) -> tuple[str, str, str]:
    split = rec.get("split") or "train"
    if split not in ("train", "validation"):
        raise _fail(where, f"'split' is {split!r}; expected train or validation")
    return str(rec.get("id", default_id)), split, str(rec.get("category", "general"))


def pair_from_record(rec: Any, where: str, default_id: str) -> PreferencePair:
    """A pairs row (kdforge's: ``messages``, ``chosen``, ``rejected``; TRL's: ``prompt`` or an implicit
    prompt, answers as strings or one-message lists) -> a PreferencePair; DataError naming ``where``."""
    if not isinstance(rec, dict):
        raise _fail(where, f"expected a JSON object, got {type(rec).__name__}")
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise _fail(where, f"no '{key}' field (keys: {sorted(rec)[:8]})")
    if "messages" in rec:
        prompt = _prompt(rec["messages"], where, "messages")
        chosen, rejected = _answer(rec["chosen"], where, "chosen"), _answer(rec["rejected"], where, "rejected")
    elif "prompt" in rec:
        prompt = _prompt(rec["prompt"], where)
        chosen, rejected = _answer(rec["chosen"], where, "chosen"), _answer(rec["rejected"], where, "rejected")
    else:
        prompt, chosen, rejected = _implicit(rec["chosen"], rec["rejected"], where)
    pid, split, category = _common(rec, where, default_id)
    return PreferencePair(pid, split, category, prompt, chosen, rejected, _score(rec, "chosen_score", where),
                          _score(rec, "rejected_score", where), str(rec.get("chosen_from", DATA)),
                          str(rec.get("rejected_from", DATA)))


def single_from_record(rec: Any, where: str, default_id: str) -> PreferenceSingle:
    """A singles row (kdforge's: ``messages``, ``completion``, ``desirable``; TRL's KTO format: ``prompt``,
    ``completion``, ``label``) -> a PreferenceSingle; DataError naming ``where``."""
    if not isinstance(rec, dict):
        raise _fail(where, f"expected a JSON object, got {type(rec).__name__}")
    if "completion" not in rec:
        raise _fail(where, f"no 'completion' field (keys: {sorted(rec)[:8]})")
    label_key = "desirable" if "desirable" in rec else "label"
    if not isinstance(rec.get(label_key), bool):
        raise _fail(where, "'desirable' (or TRL's 'label') must be true or false")
    if "messages" in rec:
        prompt = _prompt(rec["messages"], where, "messages")
    elif "prompt" in rec:
        prompt = _prompt(rec["prompt"], where)
    else:
        raise _fail(where, "no 'messages' or 'prompt' field")
    pid, split, category = _common(rec, where, default_id)
    return PreferenceSingle(pid, split, category, prompt, _answer(rec["completion"], where, "completion"),
                            rec[label_key], _score(rec, "score", where), str(rec.get("from", DATA)))


def preference_file(spec: str | Path, role: str) -> Path:
    """The JSONL behind a spec: the file itself, or the ``role`` ("pairs", "singles") product a finished
    `kdforge prefs` folder declares in its meta.json."""
    path = Path(spec)
    if not path.is_dir():
        if not path.is_file():
            raise DataError(f"preference data {path} does not exist; give a `kdforge prefs` output folder or a "
                            "JSONL of pairs (docs/preferences.md)")
        return path
    declared = product(path, role)
    if declared is None:
        what = "is incomplete (no meta.json)" if not (path / META_NAME).is_file() else f"declares no {role} file"
        raise DataError(f"the folder {path} {what}; expected a finished `kdforge prefs` output folder (re-run "
                        "`kdforge prefs` with the same --out to finish it) or a JSONL file")
    return declared


def _load(spec: str | Path, split: str, role: str, parse: Callable[[Any, str, str], Any]) -> list:
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    path = preference_file(spec, role)
    rows = [parse(rec, f"{path}:{lineno}", f"line{lineno}") for lineno, rec in read_jsonl(path)]
    chosen = [r for r in rows if split == "all" or r.split == split]
    if not chosen:
        where = f" in split '{split}'" if split != "all" and rows else ""
        raise DataError(f"{path}: no {role}{where} ({len(rows)} rows in all); a prefs run skips prompts whose "
                        "candidates the teacher cannot tell apart (meta.json metrics.skipped)")
    return chosen


def load_pairs(spec: str | Path, split: str = "train") -> list[PreferencePair]:
    """The preference pairs of a `kdforge prefs` folder (its ``pairs`` product) or of a JSONL file (kdforge
    rows or TRL's ``{"prompt", "chosen", "rejected"}``), those of ``split`` (train, validation, all; rows
    without a split are train). A bad row raises DataError with file, line, field and the fix."""
    return _load(spec, split, "pairs", pair_from_record)


def load_singles(spec: str | Path, split: str = "train") -> list[PreferenceSingle]:
    """The KTO singles of a `kdforge prefs` folder (its ``singles`` product) or of a JSONL file (kdforge rows
    or TRL's ``{"prompt", "completion", "label"}``), as :func:`load_pairs` reads pairs."""
    return _load(spec, split, "singles", single_from_record)


def read_candidate_rows(lines: list[str], where: str) -> list[dict[str, Any]]:
    """Parsed candidates.jsonl rows (their ``candidates`` as `Candidate` objects); DataError on a bad line."""
    rows = []
    for lineno, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            rec["candidates"] = [Candidate.from_json(c) for c in rec["candidates"]]
            if not isinstance(rec["id"], str):
                raise TypeError("id")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{where}:{lineno}: corrupt candidates row ({type(e).__name__}: {e}); delete the file "
                            "or use --overwrite") from None
        rows.append(rec)
    return rows
