"""`kdforge generate`: the teacher answers a prompt set, batched and resumable.

Output folder: ``data.jsonl`` (one finished answer a line), ``config.yaml``, ``meta.json`` (written
last, so its presence marks a complete run). Resuming: a re-run with the same settings reads
``data.jsonl``, drops a torn last line if the previous run was killed mid-write, and only answers
the prompts that are missing. Each batch is appended with one write + fsync, so a kill loses at
most the batch in flight.
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from kdforge.artifacts import (
    CONFIG_NAME,
    META_NAME,
    append_lines,
    check_resume,
    check_writable,
    read_lines,
    removed_if_unstarted,
    write_config,
    write_meta,
)
from kdforge.config import ConfigError, Dtype, StageConfig, dump, read_yaml
from kdforge.data.formats import Conversation, select_split
from kdforge.data.prompts import BUNDLED, bundled_prompts_path, load_prompt_set
from kdforge.stages import Stage


class GenerateConfig(StageConfig):
    """`kdforge generate`: the teacher answers a prompt set (sequence-level KD data)."""

    model: str = Field(description="teacher: HF folder, GGUF file, or embedded:smollm2-135m-instruct")
    prompts: str = Field("bundled", description="'bundled' or a JSONL file (prompt/messages/alpaca/sharegpt)")
    split: Literal["train", "validation", "all"] = Field("all", description="which prompts to answer")
    limit: int | None = Field(None, gt=0, description="use only the first N prompts of each split")
    val_limit: int | None = Field(None, gt=0, description="with split=all: cap for validation (default: limit)")
    out: str = Field("artifacts/generate", description="output folder (a re-run with the same settings resumes)")
    batch_size: int = Field(16, gt=0, description="prompts answered together (left-padded)")
    max_new_tokens: int = Field(128, gt=0, description="answer length cap in tokens")
    preset: Literal["greedy", "recipe"] | None = Field(
        None, description="greedy, or the common recipe: sampling at temperature 0.7, top-p 0.9"
    )
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0, le=2, description="sampling temperature, as the serve stage's sampler: "
                               "(0, 2]")
    top_p: float = Field(1.0, gt=0, le=1)
    num_samples: int = Field(1, gt=0, description="answers per prompt (needs sampling when > 1)")
    seed: int = Field(0, description="sampling seed (per record: the same answers on resume)")
    dtype: Dtype = "auto"
    device: str = "auto"
    backend: Literal["auto", "transformers", "llama.cpp"] = Field(
        "transformers", description="runtime of the teacher: transformers (batched), or llama.cpp for a GGUF "
        "file (one sequence at a time; auto: llama.cpp when installed)")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _apply_preset(self) -> GenerateConfig:
        if self.preset == "recipe":
            object.__setattr__(self, "do_sample", True)
            object.__setattr__(self, "temperature", 0.7)
            object.__setattr__(self, "top_p", 0.9)
        elif self.preset == "greedy":
            object.__setattr__(self, "do_sample", False)
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError("num_samples > 1 needs sampling: set do_sample=true or preset=recipe")
        return self


DATA_NAME = "data.jsonl"
FILES = {"data": DATA_NAME}  # this stage's layout (meta.json "files"): what readers look up
# Resuming appends answers to the earlier run's, so only settings that choose which prompts to answer
# (split, limits) or schedule the work may differ; any other, a new field included, must match. preset
# may differ because what it sets (do_sample, temperature, top_p) is compared resolved. dtype may not:
# bf16 and fp32 give different greedy answers, and one data set would hold both.
MAY_CHANGE = frozenset({"split", "limit", "val_limit", "out", "batch_size", "device", "preset"})


def _record_id(conv: Conversation, sample: int, num_samples: int) -> str:
    return conv.id if num_samples == 1 else f"{conv.id}/{sample}"


def read_finished(path: Path) -> set[str]:
    """Ids already answered; a torn (unterminated) last line from a killed run is cut off."""
    done = set()
    for lineno, line in enumerate(read_lines(path, repair=True), 1):
        try:
            done.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}:{lineno}: corrupt record ({e}); delete the file or use --overwrite") from e
    return done


def run(cfg: GenerateConfig, overwrite: bool = False) -> dict[str, Any]:
    t0 = time.time()
    out = Path(cfg.out)
    convs = select_split(load_prompt_set(cfg.prompts), cfg.split, cfg.limit, cfg.val_limit)
    if not convs:
        raise ConfigError(f"no prompts in split '{cfg.split}' of {cfg.prompts}")
    check_writable(out)  # before any model loads
    if overwrite and out.exists():
        shutil.rmtree(out)
    with removed_if_unstarted(out):
        out.mkdir(parents=True, exist_ok=True)
        return _generate(cfg, out, convs, out / DATA_NAME, t0)


def _generate(cfg: GenerateConfig, out: Path, convs: list[Conversation], data_path: Path,
              t0: float) -> dict[str, Any]:
    if (out / CONFIG_NAME).is_file():
        check_resume(out, read_yaml(out / CONFIG_NAME), dump(cfg), MAY_CHANGE, "a generate run",
                     "Choose another --out, or pass --overwrite to start again.", ConfigError)
    write_config(out, dump(cfg))
    done = read_finished(data_path)
    todo = [(c, k) for c in convs for k in range(cfg.num_samples)
            if _record_id(c, k, cfg.num_samples) not in done]
    (out / META_NAME).unlink(missing_ok=True)  # the run is incomplete until meta.json is rewritten

    stats = {"generated_tokens": 0, "seconds": 0.0, "stop": 0, "length": 0}
    if todo:
        from kdforge.runtime import open_model

        with open_model(cfg.model, cfg.backend, cfg.device, cfg.dtype, trust_remote_code=cfg.trust_remote_code) as lm:
            generate_into(lm, todo, cfg, data_path, stats)
    total = len(done) + len(todo)
    metrics = {
        "records": total,
        "prompts": len(convs),
        "resumed_records": len(done),
        "generated_tokens_this_run": stats["generated_tokens"],
        "tokens_per_s_this_run": round(stats["generated_tokens"] / stats["seconds"], 2) if stats["seconds"] else None,
        "finish_reasons_this_run": {"stop": stats["stop"], "length": stats["length"]},
    }
    prompts_src = bundled_prompts_path() if cfg.prompts == BUNDLED else cfg.prompts
    write_meta(out, "generate", {"prompts": prompts_src, "teacher": _local_path(cfg.model)},
               metrics, time.time() - t0, extra={"complete": True, "data": DATA_NAME}, files=FILES)
    return metrics


def _local_path(spec: str) -> str | None:
    return spec if Path(spec).exists() else None


def generate_into(lm, todo: list[tuple[Conversation, int]], cfg: GenerateConfig, data_path: Path,
                  stats: dict[str, Any]) -> None:
    """Answer ``todo`` with the runtime ``lm``, appending one record a line to ``data_path``, batch by batch.

    Sampled answers come from kdforge's one sampler (`kdforge.runtime.sampling`), each record with its
    own generator seeded from ``seed`` and its id: a resumed run, or another batch size, draws the
    same answer for the same record.
    """
    from tqdm import tqdm

    from kdforge.data.chat import encode_prompt
    from kdforge.runtime import SamplingParams, make_generator

    tok = lm.tokenizer
    stop_ids = lm.stop_ids()
    encoded = [(c, k, encode_prompt(tok, c.prompt_messages)) for c, k in todo]
    # Longest first: similar lengths share a batch (little padding) and an out-of-memory shows at once.
    encoded.sort(key=lambda x: -len(x[2]))
    params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature if cfg.do_sample else 0.0,
                            top_p=cfg.top_p if cfg.do_sample else 1.0)
    bar = tqdm(total=len(encoded), desc="generate", unit="answer", dynamic_ncols=True)
    for start in range(0, len(encoded), cfg.batch_size):
        batch = encoded[start:start + cfg.batch_size]
        ids_of = [_record_id(conv, k, cfg.num_samples) for conv, k, _ in batch]
        generators = ([make_generator(cfg.seed * 1_000_003 + zlib.crc32(rid.encode())) for rid in ids_of]
                      if cfg.do_sample else None)
        t = time.time()
        answers = lm.generate([ids for _, _, ids in batch], params, stop_ids, generators, batch_size=len(batch))
        stats["seconds"] += time.time() - t
        lines = []
        for (conv, k, ids), rid, answer_ids in zip(batch, ids_of, answers):
            # Answers come without their stop token: one shorter than the cap means the turn ended.
            finish = "stop" if len(answer_ids) < cfg.max_new_tokens else "length"
            n_tokens = len(answer_ids) + (finish == "stop")
            stats["generated_tokens"] += n_tokens
            stats[finish] += 1
            answer = tok.decode(answer_ids, skip_special_tokens=True).strip()
            rec = {
                "id": rid, "prompt_id": conv.id, "sample": k, "split": conv.split or "train",
                "category": conv.category,
                "messages": conv.prompt_messages + [{"role": "assistant", "content": answer}],
                "prompt_tokens": len(ids), "completion_tokens": n_tokens, "finish_reason": finish,
            }
            lines.append(json.dumps(rec, ensure_ascii=False))
        append_lines(data_path, lines)  # one fsynced write per batch: a kill loses at most this batch
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{stats['generated_tokens'] / max(stats['seconds'], 1e-9):.1f}")
    bar.close()

STAGES = (Stage("generate", "the teacher answers a prompt set (batched, resumable)", GenerateConfig, run,
                positional="model",
                flags=("prompts", "split", "limit", "out", "batch_size", "max_new_tokens", "preset", "num_samples",
                       "seed")),)
