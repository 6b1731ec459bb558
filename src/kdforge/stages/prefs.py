"""`kdforge prefs`: for every prompt, several answers of the sampler ranked by the teacher, as preference data.

What `kdforge distill --objective dpo|kto|distillm2` trains on. Per conversation of the data (a generate
folder or a JSONL of conversations): ``num_samples`` answers of the sampler (usually the student, after a
first distill), optionally the data's own answer too (``include_reference``), each scored by the teacher
(``rank_by``: loglik, its mean log-probability of the answer's tokens; judge, a 1-10 grade from a fixed
prompt); then pairs (DPO, DistiLLM-2) and singles (KTO) built from the ranking.

Output folder: ``candidates.jsonl`` (one conversation a line: every candidate and its score), then
``pairs.jsonl`` and ``singles.jsonl`` (rebuilt from the candidates at the end, atomically), ``config.yaml``
and ``meta.json`` (last). Resuming: a re-run with the same settings keeps the conversations already in
``candidates.jsonl`` (a torn last line from a kill is dropped) and samples only the others; ``pairs``,
``min_margin`` and ``kto_split`` only shape the products, so a re-run with other values rebuilds them from
the candidates without sampling anything. Format and options: docs/preferences.md.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from kdforge.artifacts import (
    CONFIG_NAME,
    META_NAME,
    append_lines,
    atomic_write_text,
    check_resume,
    check_writable,
    read_lines,
    removed_if_unstarted,
    write_config,
    write_meta,
)
from kdforge.config import ConfigError, StageConfig, dump, read_yaml
from kdforge.data.formats import Conversation, load_training_data, select_split
from kdforge.models.placement import (
    SERVED_MAY_CHANGE,
    ServedTeacher,
    TeacherPlacement,
    earlier_precision,
    earlier_served,
    is_url,
)
from kdforge.stages import Stage


class PrefsConfig(StageConfig, TeacherPlacement, ServedTeacher):
    """`kdforge prefs`: sampled answers ranked by the teacher, as DPO pairs and KTO singles."""

    data: str = Field(description="the prompts: a generate artifact folder or a JSONL of conversations (each "
                      "conversation's turns before its last answer; split and category are kept)")
    sampler: str = Field(description="the model that writes the candidates (usually the student): HF folder, "
                         "GGUF file or embedded:NAME")
    teacher: str = Field(description="the model that ranks them: HF folder, GGUF file, embedded:NAME, or a served "
                         "model http(s)://host:port/v1[#name] (with --set tokenizer=DIR)")
    out: str = Field("artifacts/prefs", description="output folder (a re-run with the same settings resumes)")
    split: Literal["train", "validation", "all"] = Field("all", description="which conversations")
    limit: int | None = Field(None, gt=0, description="use only the first N conversations of each split")
    num_samples: int = Field(4, ge=2, le=64, description="candidates the sampler writes per prompt")
    temperature: float = Field(0.8, gt=0, le=2, description="sampling temperature of the candidates: (0, 2]")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus (top-p) of the candidates' sampling")
    max_new_tokens: int = Field(128, gt=0, description="candidate length cap in tokens (a candidate cut there is "
                                "kept, marked finished: false)")
    seed: int = Field(0, description="sampling seed; each (conversation, sample) draws from its own generator "
                      "seeded from it, so resumes and batch sizes draw the same candidates")
    batch_size: int = Field(16, gt=0, description="sequences the sampler decodes together (the teacher scores "
                            "one conversation's candidates per pass)")
    include_reference: bool = Field(False, description="also rank the data's own answer (e.g. the teacher's, "
                                    "from kdforge generate) as a candidate marked from: data")
    rank_by: Literal["loglik", "judge"] = Field("loglik", description="loglik: the teacher's mean log-probability "
                                                "of the answer's tokens; judge: the teacher grades each answer "
                                                "1-10 (docs/preferences.md)")
    pairs: Literal["best_worst", "all"] = Field("best_worst", description="DPO pairs per prompt: best vs worst, "
                                                "or every (better, worse) pair at least min_margin apart")
    min_margin: float = Field(0.0, ge=0, description="skip prompts whose best and worst scores are closer than "
                              "this (and, with pairs=all, pairs closer than this)")
    kto_split: Literal["median"] = Field("median", description="KTO singles: above the prompt's median score "
                                         "desirable, below it undesirable, at it dropped")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check_models(self) -> PrefsConfig:
        if is_url(self.sampler):
            raise ValueError(f"sampler {self.sampler}: the sampler runs locally (a folder, GGUF file or "
                             "embedded:NAME); only the teacher may be a served model")
        if is_url(self.teacher):
            if self.tokenizer is None:
                raise ValueError(f"a served teacher ({self.teacher}) needs its tokenizer: --set tokenizer=DIR (the "
                                 "teacher's folder or tokenizer files; checked against the server's /tokenize)")
        elif self.tokenizer is not None:
            raise ValueError("tokenizer applies to a served teacher (http(s)://...); a local teacher brings its own")
        return self


CANDIDATES_NAME, PAIRS_NAME, SINGLES_NAME = "candidates.jsonl", "pairs.jsonl", "singles.jsonl"
FILES = {"candidates": CANDIDATES_NAME, "pairs": PAIRS_NAME, "singles": SINGLES_NAME}  # meta.json "files"
# Resuming keeps the candidates already sampled and scored, so what makes or scores a candidate must match;
# which conversations (split, limit), how the work is scheduled and where the weights sit may change, and so
# may the settings that only build the products from the candidates (pairs, min_margin, kto_split).
MAY_CHANGE = (frozenset({"out", "split", "limit", "batch_size", "device", "device_map", "max_memory",
                         "offload_folder", "pairs", "min_margin", "kto_split"}) | SERVED_MAY_CHANGE)


def run(cfg: PrefsConfig, overwrite: bool = False) -> dict[str, Any]:
    from kdforge.models.placement import check_available

    t0 = time.time()
    out = Path(cfg.out)
    convs = [c for c in select_split(load_training_data(cfg.data), cfg.split, cfg.limit) if c.prompt_messages]
    if not convs:
        raise ConfigError(f"{cfg.data}: no conversations with a prompt in split '{cfg.split}'")
    check_writable(out)  # before any model loads
    check_available(cfg.precision)
    if overwrite and out.exists():
        shutil.rmtree(out)
    with removed_if_unstarted(out):
        done = _open_folder(cfg, out, convs)
        todo = [c for c in convs if c.id not in done]
        stats = {"seconds_sampling": 0.0, "seconds_ranking": 0.0}
        if todo:
            _sample_and_rank(cfg, out, todo, stats)
        return _finish(cfg, out, convs, len(done), stats, t0)


def _open_folder(cfg: PrefsConfig, out: Path, convs: list[Conversation]) -> set[str]:
    """Check the resume, write config.yaml, cut a torn last line; the ids already in candidates.jsonl."""
    from kdforge.distill.preference_data import read_candidate_rows

    out.mkdir(parents=True, exist_ok=True)
    if (out / CONFIG_NAME).is_file():
        previous = earlier_served(earlier_precision(read_yaml(out / CONFIG_NAME)))
        check_resume(out, previous, dump(cfg), MAY_CHANGE, "preference candidates",
                     "Choose another --out, or pass --overwrite to start again.", ConfigError)
    write_config(out, dump(cfg))
    path = out / CANDIDATES_NAME
    rows = read_candidate_rows(read_lines(path, repair=True), str(path))
    prompts = {c.id: c.prompt_messages for c in convs}
    for row in rows:
        # Same id, other prompt: the data file changed under the folder; mixing the two would be silent.
        if row["id"] in prompts and row["messages"] != prompts[row["id"]]:
            raise ConfigError(f"{path}: conversation {row['id']!r} has another prompt in {cfg.data} than when it "
                              "was sampled (the data changed); choose another --out, or pass --overwrite")
    (out / META_NAME).unlink(missing_ok=True)  # incomplete until meta.json is rewritten
    return {row["id"] for row in rows}


def _sample_and_rank(cfg: PrefsConfig, out: Path, todo: list[Conversation], stats: dict[str, float]) -> None:
    """Sample, score and append the candidates of ``todo``, a group of conversations at a time (one fsynced
    append per group: a kill loses at most the group in flight)."""
    from tqdm import tqdm

    from kdforge.data.batching import shared_vocab_size
    from kdforge.distill import preference_data as prefdata
    from kdforge.runtime import TRANSFORMERS, SamplingParams, open_model

    served = is_url(cfg.teacher)
    placement = {k: v for k, v in cfg.load_kwargs().items() if k not in ("device", "dtype")}
    with contextlib.ExitStack() as models:
        teacher = models.enter_context(open_model(cfg.teacher, TRANSFORMERS, cfg.device, cfg.dtype,
                                                  trust_remote_code=cfg.trust_remote_code, placement=placement,
                                                  served=cfg.served_options()))
        # The same spec samples and ranks (self-rewarding): one copy in memory.
        sampler = teacher if cfg.sampler == cfg.teacher else models.enter_context(
            open_model(cfg.sampler, TRANSFORMERS, cfg.device, "auto", trust_remote_code=cfg.trust_remote_code))
        vocab = 0  # the teacher's scored columns (loglik only: a judge only generates)
        if cfg.rank_by == "loglik":
            vocab = len(teacher.tokenizer) if served else shared_vocab_size(teacher.tokenizer, teacher)
        params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        per_group = max(1, cfg.batch_size // cfg.num_samples)  # conversations whose samples fill one batch
        bar = tqdm(total=len(todo), desc="prefs", unit="prompt", dynamic_ncols=True)
        for start in range(0, len(todo), per_group):
            group = todo[start:start + per_group]
            t = time.time()
            sampled = prefdata.sample_candidates(sampler, [(c.id, c.prompt_messages) for c in group],
                                                 cfg.num_samples, params, cfg.seed, cfg.batch_size)
            stats["seconds_sampling"] += time.time() - t
            t = time.time()
            lines = []
            for conv, cands in zip(group, sampled):
                reference = _reference(conv) if cfg.include_reference else None
                if reference is not None:
                    cands.append(prefdata.Candidate(reference, prefdata.DATA, None, None, True))
                _score(cfg, prefdata, teacher, vocab, served, conv, cands)
                row = {"id": conv.id, "split": conv.split or "train", "category": conv.category,
                       "messages": conv.prompt_messages, "candidates": [c.to_json() for c in cands]}
                lines.append(json.dumps(row, ensure_ascii=False))
            stats["seconds_ranking"] += time.time() - t
            append_lines(out / CANDIDATES_NAME, lines)
            bar.update(len(group))
        bar.close()


def _reference(conv: Conversation) -> str | None:
    """The data's own answer: the conversation's last message when it is an assistant's."""
    return conv.messages[-1]["content"] if conv.messages[-1]["role"] == "assistant" else None


def _score(cfg: PrefsConfig, prefdata, teacher, vocab: int, served: bool, conv: Conversation, cands: list) -> None:
    from kdforge.data.formats import DataError

    texts = [c.text for c in cands]
    try:
        if cfg.rank_by == "loglik":
            scores = prefdata.loglik_scores(teacher, conv.prompt_messages, texts, vocab, whole_rows=not served)
            replies = [None] * len(cands)
        else:
            scores, replies = prefdata.judge_scores(teacher, conv.prompt_messages, texts)
    except ValueError as e:  # chat templating refused a message (a control token in the data's content)
        raise DataError(f"{cfg.data}: conversation {conv.id!r}: {e}") from None
    for c, s, reply in zip(cands, scores, replies):
        c.score, c.judge = s, reply


def _finish(cfg: PrefsConfig, out: Path, convs: list[Conversation], resumed: int, stats: dict[str, float],
            t0: float) -> dict[str, Any]:
    """Order candidates.jsonl as the data, build pairs.jsonl and singles.jsonl from it, write meta.json."""
    from kdforge.distill.preference_data import build_pairs, build_singles, read_candidate_rows

    path = out / CANDIDATES_NAME
    lines = read_lines(path)
    rows = read_candidate_rows(lines, str(path))
    # The data's order, whatever order the runs appended in (a limit raised on resume appends later
    # conversations of the first split after earlier ones of the second); rows of conversations outside today's
    # selection (a smaller limit) stay, last, as found.
    position = {c.id: i for i, c in enumerate(convs)}
    order = sorted(range(len(rows)), key=lambda i: (position.get(rows[i]["id"], len(position)), i))
    if order != list(range(len(rows))):
        atomic_write_text(path, "".join(f"{lines[i]}\n" for i in order))
        rows = [rows[i] for i in order]
    pairs, singles, gaps = [], [], []
    skipped = {"too_few_scored": 0, "tie": 0, "margin": 0}
    n_candidates = unfinished = unscored = references = 0
    for row in rows:
        cands = row["candidates"]
        n_candidates += len(cands)
        references += sum(c.source == "data" for c in cands)
        unfinished += sum(not c.finished for c in cands)
        unscored += sum(c.score is None for c in cands)
        p, reason = build_pairs(row, cands, cfg.pairs, cfg.min_margin)
        s, _ = build_singles(row, cands, cfg.min_margin)
        if reason is not None:
            skipped[reason] += 1
        pairs += p
        singles += s
        gaps += [x.chosen_score - x.rejected_score for x in p]
    atomic_write_text(out / PAIRS_NAME, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in pairs))
    atomic_write_text(out / SINGLES_NAME, "".join(json.dumps(s.to_json(), ensure_ascii=False) + "\n"
                                                  for s in singles))
    metrics = {
        "prompts": len(rows),
        "resumed_prompts": resumed,
        "candidates": n_candidates,
        "reference_candidates": references,
        "unfinished_candidates": unfinished,
        "unscored_candidates": unscored,
        "pairs": len(pairs),
        "singles": len(singles),
        "desirable": sum(s.desirable for s in singles),
        "undesirable": sum(not s.desirable for s in singles),
        "skipped": skipped,
        "mean_score_gap": round(sum(gaps) / len(gaps), 6) if gaps else None,
        "seconds_sampling_this_run": round(stats["seconds_sampling"], 3),
        "seconds_ranking_this_run": round(stats["seconds_ranking"], 3),
    }
    parents = {"data": cfg.data, "sampler": _local_path(cfg.sampler), "teacher": _local_path(cfg.teacher)}
    write_meta(out, "prefs", parents, metrics, time.time() - t0, files=FILES)
    return metrics


def _local_path(spec: str) -> str | None:
    return spec if Path(spec).exists() else None


STAGES = (Stage("prefs", "sampled answers ranked by the teacher: DPO pairs and KTO singles (resumable)", PrefsConfig,
                run, flags=("data", "sampler", "teacher", "out", "split", "limit", "num_samples", "temperature",
                            "top_p", "max_new_tokens", "seed", "batch_size", "include_reference", "rank_by", "pairs",
                            "min_margin", "precision")),)
