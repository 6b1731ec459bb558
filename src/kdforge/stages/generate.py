"""`kdforge generate`: the teacher answers a prompt set, batched and resumable, in one process or several.

Output folder: ``data.jsonl`` (one finished answer a line), ``config.yaml``, ``meta.json`` (written
last, so its presence marks a complete run). Resuming: a re-run with the same settings reads
``data.jsonl``, drops a torn last line if the previous run was killed mid-write, and only answers
the prompts that are missing. Each batch is appended with one write + fsync, so a kill loses at
most the batch in flight.

Under ``torchrun --nproc-per-node N`` (or ``accelerate launch``) every rank loads its own teacher and
answers every N-th batch of the one-process schedule (same batches, same order, same per-record
seeds, so the same answers), appending to a part file of its own, ``data.rank-R.jsonl``; at the end
rank 0 merges the parts into ``data.jsonl`` in the one-process record order and removes them. A
killed parallel run resumes from its part files at any world size (one process merges them first and
appends to ``data.jsonl`` as always); a record is never in two files after a merge.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from kdforge import distributed
from kdforge.artifacts import (
    CONFIG_NAME,
    META_NAME,
    append_lines,
    atomic_file,
    check_resume,
    check_writable,
    fsync_dir,
    read_lines,
    removed_if_unstarted,
    write_config,
    write_meta,
)
from kdforge.config import ConfigError, StageConfig, dump, read_yaml
from kdforge.data.formats import Conversation, select_split
from kdforge.data.prompts import BUNDLED, bundled_prompts_path, load_prompt_set
from kdforge.models.placement import (
    QUANTIZED,
    SERVED_MAY_CHANGE,
    ServedTeacher,
    TeacherPlacement,
    earlier_precision,
    earlier_served,
    is_url,
)
from kdforge.stages import Stage


class GenerateConfig(StageConfig, TeacherPlacement, ServedTeacher):
    """`kdforge generate`: the teacher answers a prompt set (sequence-level KD data)."""

    model: str = Field(description="teacher: HF folder, GGUF file, embedded:smollm2-135m-instruct, or a served "
                       "model http(s)://host:port/v1[#name] (with --set tokenizer=DIR)")
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
        if is_url(self.model):
            if self.tokenizer is None:
                raise ValueError(f"a served teacher ({self.model}) needs its tokenizer: --set tokenizer=DIR (the "
                                 "teacher's folder or tokenizer files; checked against the server's /tokenize)")
            if self.backend == "llama.cpp":
                raise ValueError(f"{self.model} is a served model: backend llama.cpp runs local GGUF files only")
        elif self.tokenizer is not None:
            raise ValueError("tokenizer applies to a served teacher (http(s)://...); a local teacher brings its own")
        if self.backend == "llama.cpp" and (self.device_map is not None or self.precision in QUANTIZED):
            raise ValueError("device_map and int8/4bit apply to the transformers backend; llama.cpp runs the GGUF "
                             "file's own types")
        return self


DATA_NAME = "data.jsonl"
PART_GLOB = "data.rank-*.jsonl"  # one rank's answers while a parallel run is under way (merged at its end)
FILES = {"data": DATA_NAME}  # this stage's layout (meta.json "files"): what readers look up
# Resuming appends answers to the earlier run's, so only settings that choose which prompts to answer
# (split, limits) or schedule the work may differ; any other, a new field included, must match. preset
# may differ because what it sets (do_sample, temperature, top_p) is compared resolved. dtype and
# precision may not: bf16 and fp32 give different greedy answers, and one data set would hold both;
# where the weights sit (device, device_map, max_memory, offload_folder) may.
MAY_CHANGE = frozenset({"split", "limit", "val_limit", "out", "batch_size", "device", "preset", "device_map",
                        "max_memory", "offload_folder"}) | SERVED_MAY_CHANGE


def part_name(rank: int) -> str:
    return f"data.rank-{rank}.jsonl"


def _record_id(conv: Conversation, sample: int, num_samples: int) -> str:
    return conv.id if num_samples == 1 else f"{conv.id}/{sample}"


def read_finished(path: Path) -> set[str]:
    """Ids already answered; a torn (unterminated) last line from a killed run is cut off."""
    return {rec["id"] for _, rec in _records(path)}


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every whole line of a data or part file; a torn last line is cut off the file."""
    out = []
    for lineno, line in enumerate(read_lines(path, repair=True), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: corrupt record ({e}); delete the file or use --overwrite") from e
        if not isinstance(rec, dict) or "id" not in rec:
            raise ConfigError(f"{path}:{lineno}: corrupt record (no 'id'); delete the file or use --overwrite")
        out.append((line, rec))
    return out


def merge_parts(out: Path, convs: list[Conversation], num_samples: int) -> int:
    """Fold the part files of a parallel run into ``data.jsonl`` and remove them; the records added.

    ``data.jsonl``'s own lines stay first, as they are; the parts' records follow in the order one process
    writes a fresh run's (longest prompt first, then prompt-set order: `generate_into`), so that N
    processes give one process's file. A record already in ``data.jsonl`` (a merge cut short before it
    removed the parts) is not added twice. The file is replaced atomically, then the parts are removed.
    """
    parts = sorted(out.glob(PART_GLOB))
    if not parts:
        return 0
    data_path = out / DATA_NAME
    records = _records(data_path)
    kept, have = [line for line, _ in records], {rec["id"] for _, rec in records}
    position = {_record_id(c, k, num_samples): i for i, (c, k) in
                enumerate((c, k) for c in convs for k in range(num_samples))}
    new: dict[str, tuple[tuple[int, int, int, int], str]] = {}
    for f, part in enumerate(parts):
        for j, (line, rec) in enumerate(_records(part)):
            if rec["id"] in have or rec["id"] in new:
                continue
            # Records of prompts outside today's selection (a smaller limit on resume) go last, as found.
            key = (-int(rec.get("prompt_tokens", 0)), position.get(rec["id"], len(position)), f, j)
            new[rec["id"]] = (key, line)
    lines = kept + [line for _, line in sorted(new.values())]
    with atomic_file(data_path) as tmp:
        tmp.write_bytes("".join(f"{line}\n" for line in lines).encode("utf-8"))
    for part in parts:
        part.unlink()
    fsync_dir(out)
    return len(new)


def run(cfg: GenerateConfig, overwrite: bool = False) -> dict[str, Any]:
    from kdforge.models.placement import check_available

    t0 = time.time()
    out = Path(cfg.out)
    convs = select_split(load_prompt_set(cfg.prompts), cfg.split, cfg.limit, cfg.val_limit)
    if not convs:
        raise ConfigError(f"no prompts in split '{cfg.split}' of {cfg.prompts}")
    check_writable(out)  # before any model loads
    check_available(cfg.precision)  # int8/4bit without bitsandbytes or CUDA: one line, nothing written
    device = distributed.init(cfg.device)  # joins the launcher's process group; this rank's device
    if overwrite and out.exists() and distributed.is_main():
        shutil.rmtree(out)  # the other ranks wait for rank 0 in on_main below before they touch the folder
    # Rank 0 alone creates the folder, so it alone removes one it created and left empty.
    with removed_if_unstarted(out) if distributed.is_main() else contextlib.nullcontext():
        done = set(distributed.on_main(lambda: _open_folder(cfg, out, convs)))
        metrics = _generate(cfg, out, convs, done, device, t0)
    distributed.barrier()  # every rank leaves after rank 0 has written meta.json
    return metrics


def _open_folder(cfg: GenerateConfig, out: Path, convs: list[Conversation]) -> list[str]:
    """Rank 0: check the resume, write config.yaml, repair torn lines; the ids already answered."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / CONFIG_NAME).is_file():
        previous = earlier_served(earlier_precision(read_yaml(out / CONFIG_NAME)))
        check_resume(out, previous, dump(cfg), MAY_CHANGE, "a generate run",
                     "Choose another --out, or pass --overwrite to start again.", ConfigError)
    write_config(out, dump(cfg))
    if not distributed.launched():
        merge_parts(out, convs, cfg.num_samples)  # one process appends to data.jsonl itself
    done = read_finished(out / DATA_NAME)
    for part in sorted(out.glob(PART_GLOB)):
        done |= read_finished(part)
    (out / META_NAME).unlink(missing_ok=True)  # the run is incomplete until meta.json is rewritten
    return sorted(done)


def _generate(cfg: GenerateConfig, out: Path, convs: list[Conversation], done: set[str], device: str,
              t0: float) -> dict[str, Any]:
    todo = [(c, k) for c in convs for k in range(cfg.num_samples)
            if _record_id(c, k, cfg.num_samples) not in done]
    rank, world = distributed.rank(), distributed.world_size()
    stats = {"generated_tokens": 0, "seconds": 0.0, "stop": 0, "length": 0}
    if todo:
        from kdforge.runtime import open_model

        placement = {k: v for k, v in cfg.load_kwargs(device).items() if k not in ("device", "dtype")}
        path = out / (DATA_NAME if world == 1 else part_name(rank))
        with open_model(cfg.model, cfg.backend, device, cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                        placement=placement, served=cfg.served_options()) as lm:
            generate_into(lm, todo, cfg, path, stats, rank=rank, world=world)
    every = distributed.gather(stats)  # also the point where every rank has finished its batches
    tokens = sum(s["generated_tokens"] for s in every)
    seconds = max(s["seconds"] for s in every)  # ranks run at the same time: the slowest one's time
    metrics = {
        "records": len(done) + len(todo),
        "prompts": len(convs),
        "resumed_records": len(done),
        "generated_tokens_this_run": tokens,
        "tokens_per_s_this_run": round(tokens / seconds, 2) if seconds else None,
        "finish_reasons_this_run": {"stop": sum(s["stop"] for s in every), "length": sum(s["length"] for s in every)},
    }
    if world > 1:
        metrics["processes"] = world
    if distributed.is_main():
        merge_parts(out, convs, cfg.num_samples)
        prompts_src = bundled_prompts_path() if cfg.prompts == BUNDLED else cfg.prompts
        write_meta(out, "generate", {"prompts": prompts_src, "teacher": _local_path(cfg.model)},
                   metrics, time.time() - t0, extra={"complete": True, "data": DATA_NAME}, files=FILES)
    return metrics


def _local_path(spec: str) -> str | None:
    return spec if Path(spec).exists() else None


def generate_into(lm, todo: list[tuple[Conversation, int]], cfg: GenerateConfig, data_path: Path,
                  stats: dict[str, Any], rank: int = 0, world: int = 1) -> None:
    """Answer ``todo`` with the runtime ``lm``, appending one record a line to ``data_path``, batch by batch.

    Sampled answers come from kdforge's one sampler (`kdforge.runtime.sampling`), each record with its
    own generator seeded from ``seed`` and its id: a resumed run, or another batch size, draws the
    same answer for the same record. ``rank`` of ``world``: answer only batches rank, rank + world, ...
    of the one-process schedule, so that every batch holds the same records as in one process.
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
    starts = list(range(0, len(encoded), cfg.batch_size))[rank::world]  # whole batches, round robin
    mine = sum(len(encoded[b:b + cfg.batch_size]) for b in starts)
    bar = tqdm(total=mine, desc="generate" if world == 1 else f"generate (rank {rank} of {world})", unit="answer",
               dynamic_ncols=True, disable=rank != 0)
    for start in starts:
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
                       "seed", "precision"), parallel=True),)
