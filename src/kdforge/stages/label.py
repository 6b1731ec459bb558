"""`kdforge label`: the teacher's soft labels, computed once and cached on disk.

For every conversation of the data (a `generate` folder or any supported JSONL), every target
position (whose next token is the assistant's) gets the teacher's top-k token ids and
log-probabilities plus the log of the mass outside the top-k (format: softlabels/format.py,
docs/soft-label-cache.md); optionally the hidden states of chosen teacher layers for every real
token (fp16). Reads top to bottom: config and resume check, the teacher, then per shard of
``shard_size`` examples either reuse (a re-run keeps finished shards, so an interrupted run loses at
most the shard in flight) or teacher forward + ``writer.write_shard``; ``writer.finish`` writes
``manifest.json`` last (softlabels/writer.py).

Under ``torchrun --nproc-per-node N`` (or ``accelerate launch``) every rank loads its own teacher: the
ranks first check the earlier run's shards between them (each every N-th), then share out the shards
still to label round robin (rank r labels the r-th, (r+N)-th, ... of them: shards r, r+N, ... in a
fresh run) and write each as one process would, shard file and sidecar; rank 0 waits for all and
writes the manifest. A shard's bytes depend only on its examples and the teacher, so the cache is the
one one process writes (with the same threads per process: float sums depend on how they are split).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from kdforge import distributed
from kdforge.artifacts import (
    CONFIG_NAME,
    check_resume,
    check_writable,
    file_sha256,
    removed_if_unstarted,
    write_config,
    write_meta,
)
from kdforge.config import ConfigError, StageConfig, dump, read_yaml
from kdforge.data.formats import data_file, load_training_data, select_split
from kdforge.models.placement import (
    SERVED_MAY_CHANGE,
    ServedTeacher,
    TeacherPlacement,
    earlier_precision,
    earlier_served,
    is_url,
)
from kdforge.softlabels import MANIFEST
from kdforge.stages import Stage

if TYPE_CHECKING:
    from kdforge.softlabels.manifest import ShardInfo
    from kdforge.softlabels.writer import CacheWriter


class LabelConfig(StageConfig, TeacherPlacement, ServedTeacher):
    """`kdforge label`: the teacher's top-k soft labels cached on disk (offline distillation)."""

    teacher: str = Field(description="teacher: HF folder, GGUF file, embedded:smollm2-135m-instruct, or a "
                         "served model http(s)://host:port/v1[#name] (with --set tokenizer=DIR)")
    data: str = Field(description="a generate artifact folder or a JSONL file of conversations")
    out: str = Field("artifacts/labels", description="output folder (finished shards are reused on a re-run)")
    split: Literal["train", "validation", "all"] = "all"
    limit: int | None = Field(None, gt=0)
    top_k: int = Field(64, gt=1, le=1024, description="teacher log-probs kept per target token")
    temperature: float = Field(1.0, gt=0, description="capture temperature")
    max_length: int = Field(256, gt=8, description="must equal distill.max_length when training from the cache")
    hidden_layers: list[int] = Field(default_factory=list, description="teacher layers whose hidden states to keep")
    batch_size: int = Field(8, gt=0, description="conversations per teacher forward pass")
    shard_size: int = Field(256, gt=0, description="conversations per shard (the unit of resume and of the "
                            "work shared between processes)")
    cross_tokenizer: bool = Field(False, description="also keep what a student with another tokenizer needs: "
                                  "the teacher's own target tokens, their log-probs and the teacher's tokenizer "
                                  "(docs/cross-tokenizer.md; +6 bytes per target token)")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _served_teacher(self) -> LabelConfig:
        if not is_url(self.teacher):
            if self.tokenizer is not None:
                raise ValueError("tokenizer applies to a served teacher (http(s)://...); a local teacher "
                                 "brings its own")
            return self
        if self.cross_tokenizer:
            raise ValueError("cross_tokenizer: labelling a served teacher for a student with another tokenizer is not "
                             "supported yet (it needs the teacher's log-prob of each written token); label with the "
                             "teacher loaded locally")
        if self.hidden_layers:
            raise ValueError(f"hidden_layers: a served teacher ({self.teacher}) returns log-probabilities only, "
                             "never hidden states; label with the teacher loaded locally to keep them")
        if self.temperature != 1.0:
            raise ValueError(f"temperature {self.temperature}: a served teacher's prompt_logprobs are the "
                             "model's log-softmax at temperature 1 and the top-k alone cannot be re-tempered; "
                             "label at temperature 1 (distill applies its own temperature to the cache)")
        if self.tokenizer is None:
            raise ValueError(f"a served teacher ({self.teacher}) needs its tokenizer: --set tokenizer=DIR (the "
                             "teacher's folder or tokenizer files; checked against the server's /tokenize)")
        return self


# Resuming keeps finished shards, so every setting that changes what a shard holds must match the
# earlier run's: these are the only ones that may differ (how the work is scheduled, not its result).
# dtype and precision are not among them: resuming in another precision would mix bf16 and fp32 labels
# in one cache; where the weights sit (device, device_map, max_memory, offload_folder) may change.
# The served teacher's request settings (concurrency, timeout, retries) schedule the work too.
MAY_CHANGE = (frozenset({"out", "batch_size", "device", "device_map", "max_memory", "offload_folder"})
              | SERVED_MAY_CHANGE)
FILES = {"manifest": MANIFEST}  # this stage's layout (meta.json "files"); the manifest lists the shards


def _weights_sha256(spec: str) -> str:
    from kdforge.models.loading import resolve_model

    src = resolve_model(spec)
    files = [src.folder / src.gguf_file] if src.gguf_file else sorted(src.folder.glob("*.safetensors"))
    return file_sha256(files[0]) if len(files) == 1 else json.dumps([file_sha256(f) for f in files])


def run(cfg: LabelConfig, overwrite: bool = False) -> dict[str, Any]:
    from kdforge.models.placement import check_available

    check_writable(cfg.out)  # before the teacher loads
    check_available(cfg.precision)  # int8/4bit without bitsandbytes or CUDA: one line, nothing written
    device = distributed.init(cfg.device)  # joins the launcher's process group; this rank's device
    # Rank 0 alone creates the folder, so it alone removes one it created and left empty.
    with removed_if_unstarted(cfg.out) if distributed.is_main() else contextlib.nullcontext():
        metrics = _label(cfg, overwrite, device)
    distributed.barrier()  # every rank leaves after rank 0 has written the manifest and meta.json
    return metrics


def _label(cfg: LabelConfig, overwrite: bool, device: str) -> dict[str, Any]:
    from kdforge.data.batching import shared_vocab_size
    from kdforge.memory import reuse_freed_memory
    from kdforge.models.loading import load_model
    from kdforge.softlabels.writer import CacheWriter

    t0 = time.time()
    reuse_freed_memory()  # the teacher's (N, V) logits of every batch reuse the last one's pages (kdforge.memory)
    out = Path(cfg.out)
    convs = select_split(load_training_data(cfg.data), cfg.split, cfg.limit)
    convs = [c for c in convs if c.has_answer]
    if not convs:
        raise ConfigError(f"{cfg.data}: no conversations with assistant answers in split '{cfg.split}'")
    opened: list[CacheWriter] = []

    def open_folder() -> dict[str, ShardInfo]:
        if overwrite and out.exists():
            shutil.rmtree(out)
        if (out / CONFIG_NAME).is_file():
            previous = earlier_served(earlier_precision(read_yaml(out / CONFIG_NAME)))
            check_resume(out, previous, dump(cfg), MAY_CHANGE, "labels",
                         "Use another --out, or --overwrite to label again.", ConfigError)
        # Shards finished by an earlier run (named in its manifest or in a shard's sidecar) are reused.
        opened.append(CacheWriter(out))
        write_config(out, dump(cfg))
        return opened[0].known

    known = distributed.on_main(open_folder)  # rank 0 alone reads (and removes) the old manifest
    writer = opened[0] if opened else CacheWriter(out, known=known)

    if is_url(cfg.teacher):
        from kdforge.runtime.served import ServedRuntime

        # Every rank opens its own client; the server(s) take the load (requests in flight per URL per rank).
        teacher = ServedRuntime.load(cfg.teacher, trust_remote_code=cfg.trust_remote_code,
                                     placement={k: v for k, v in cfg.load_kwargs(device).items()
                                                if k not in ("device", "dtype")}, **cfg.served_options())
        tok = teacher.tokenizer
        vocab = len(tok)
    else:
        teacher, tok = load_model(cfg.teacher, trust_remote_code=cfg.trust_remote_code, **cfg.load_kwargs(device))
        vocab = shared_vocab_size(tok, teacher)
    try:
        return _label_with(cfg, out, convs, writer, teacher, tok, vocab, t0)
    finally:
        if is_url(cfg.teacher):
            teacher.close()


def _label_with(cfg: LabelConfig, out: Path, convs: list, writer: CacheWriter, teacher, tok, vocab: int,
                t0: float) -> dict[str, Any]:
    from tqdm import tqdm

    from kdforge.data.chat import encode_conversation

    bad = [x for x in cfg.hidden_layers if not 0 <= x < teacher.config.num_hidden_layers]
    if bad:
        n = teacher.config.num_hidden_layers
        raise ConfigError(f"hidden_layers {bad} out of range: the teacher has {n} layers (0..{n - 1})")
    encoded = [encode_conversation(tok, c.messages, cfg.max_length) for c in convs]
    n_shards = (len(encoded) + cfg.shard_size - 1) // cfg.shard_size
    bounds = [(s * cfg.shard_size, min(len(encoded), (s + 1) * cfg.shard_size)) for s in range(n_shards)]
    # Which shards an earlier run finished: each rank hashes every N-th, then every rank learns them all.
    checked = {s: info for s in distributed.shard_of(list(range(n_shards)))
               if (info := writer.reuse(s, bounds[s][1] - bounds[s][0])) is not None}
    reused = {s: info for part in distributed.gather(checked) for s, info in part.items()}
    mine = distributed.shard_of([s for s in range(n_shards) if s not in reused])  # whole shards, round robin
    stats = {"targets": 0, "seconds": 0.0, "reused": sum(bounds[s][1] - bounds[s][0] for s in reused)}
    bar = tqdm(total=stats["reused"] + sum(bounds[s][1] - bounds[s][0] for s in mine), initial=stats["reused"],
               desc="label" if not distributed.launched() else f"label (rank 0 of {distributed.world_size()})",
               unit="request" if is_url(cfg.teacher) else "conv",  # a served teacher: one request a conversation
               dynamic_ncols=True, disable=not distributed.is_main())
    written: dict[int, ShardInfo] = {}
    for s in mine:
        lo, hi = bounds[s]
        t = time.time()
        label = served_label_examples if is_url(cfg.teacher) else label_examples
        arrays = label(teacher, tok, encoded[lo:hi], cfg, vocab, bar)
        stats["seconds"] += time.time() - t
        written[s] = writer.write_shard(s, arrays)
        stats["targets"] += written[s].targets
        bar.set_postfix(target_tok_s=f"{stats['targets'] / max(stats['seconds'], 1e-9):.0f}")
    bar.close()
    every = distributed.gather((written, stats))  # also the point where every rank has written its shards
    for part, _ in every:
        reused.update(part)  # now: every shard of the cache, reused or labelled by any rank
    stats["targets"] = sum(st["targets"] for _, st in every)
    stats["seconds"] = max(st["seconds"] for _, st in every)  # ranks label at the same time: the slowest one's
    return distributed.on_main(lambda: _finish(cfg, writer, reused, stats, teacher, tok, convs, encoded, vocab, t0))


def _finish(cfg: LabelConfig, writer: CacheWriter, shards: dict[int, ShardInfo], stats: dict[str, float], teacher,
            tok, convs: list, encoded: list, vocab: int, t0: float) -> dict[str, Any]:
    """Rank 0: the manifest over every rank's ``shards`` (in index order, as one process lists them), meta.json."""
    from kdforge.models.placement import precision_of
    from kdforge.softlabels.format import tokenizer_fingerprint
    from kdforge.softlabels.manifest import DataInfo, ExampleInfo, TeacherInfo

    for index, info in shards.items():
        writer.adopt(index, info)
    data = data_file(cfg.data)
    if cfg.cross_tokenizer:
        # Offline cross-tokenizer training encodes the data as the teacher did: its tokenizer travels with the cache.
        from kdforge.artifacts import atomic_dir
        from kdforge.softlabels.manifest import TEACHER_TOKENIZER

        with atomic_dir(Path(cfg.out) / TEACHER_TOKENIZER, overwrite=True) as tmp:
            tok.save_pretrained(tmp)
    if is_url(cfg.teacher):
        # The weights are the server's: the manifest names the server, the model it reports and the local
        # tokenizer (whose hashes are the manifest's tokenizer section); layers and width from its config.json.
        info = TeacherInfo(spec=cfg.teacher, weights_sha256="n/a (served)", served_model=teacher.model_name,
                           tokenizer=str(Path(cfg.tokenizer).resolve()) if Path(cfg.tokenizer).exists()
                           else cfg.tokenizer)
        shape = _served_shape(cfg.tokenizer)
    else:
        info = TeacherInfo(spec=cfg.teacher, weights_sha256=_weights_sha256(cfg.teacher),
                           precision=precision_of(teacher))
        shape = (teacher.config.num_hidden_layers, teacher.config.hidden_size)
    manifest = writer.finish(
        teacher=info,
        tokenizer=tokenizer_fingerprint(tok),
        data=DataInfo(path=str(data.resolve()), sha256=file_sha256(data), split=cfg.split, limit=cfg.limit),
        examples=[ExampleInfo(id=c.id, split=c.split or "train") for c in convs],
        k=cfg.top_k, temperature=cfg.temperature, max_length=cfg.max_length, vocab_size=vocab,
        hidden_layers=cfg.hidden_layers, teacher_layers=shape[0], teacher_hidden_size=shape[1],
        tokens=sum(len(e.input_ids) for e in encoded), cross_tokenizer=cfg.cross_tokenizer)
    metrics = {"examples": len(encoded), "targets": manifest.counts.targets, "shards": len(manifest.shards),
               "reused_examples": stats["reused"],
               "label_tokens_per_s": round(stats["targets"] / stats["seconds"], 1) if stats["seconds"] else None,
               "bytes_per_target_token": manifest.bytes_per_target_token.on_disk}
    if distributed.launched():
        metrics["processes"] = distributed.world_size()
    if is_url(cfg.teacher):
        metrics["served"] = {"model": teacher.model_name, "urls": teacher.urls, **teacher.stats}
    write_meta(cfg.out, "label", {"teacher": cfg.teacher if Path(cfg.teacher).exists() else None, "data": cfg.data},
               metrics, time.time() - t0, files=FILES)
    return metrics


def label_examples(teacher, tok, examples, cfg: LabelConfig, vocab: int, bar) -> dict:
    """Top-k labels (and hidden states) of a shard's examples, concatenated in example order: name -> array."""
    import torch

    with torch.inference_mode():
        return _label_examples(teacher, tok, examples, cfg, vocab, bar)


def _label_examples(teacher, tok, examples, cfg: LabelConfig, vocab: int, bar) -> dict:
    import numpy as np
    import torch.nn.functional as F

    from kdforge.data.batching import collate
    from kdforge.data.chat import IGNORE_INDEX
    from kdforge.models.forward import DEFAULT_PACK_LENGTH, capture, target_logits
    from kdforge.models.loading import input_device
    from kdforge.softlabels.format import encode_topk

    device = input_device(teacher)  # a device-mapped teacher takes its inputs where its embedding runs
    parts: dict[str, list[np.ndarray]] = {}
    n_targets, n_tokens = [0], [0]
    # Longest first within the shard keeps padding low; results are put back in example order.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    per_example: dict[int, dict[str, np.ndarray]] = {}
    for b0 in range(0, len(order), cfg.batch_size):
        idx = order[b0:b0 + cfg.batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], tok.pad_token_id).items()}
        with capture(teacher, cfg.hidden_layers, bool(cfg.hidden_layers), False) as store:
            # Hidden states are kept in the padded (B, T) layout: pack only when none are kept.
            pack = None if cfg.hidden_layers else DEFAULT_PACK_LENGTH
            logits, _ = target_logits(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"], vocab,
                                      pack)
        logp = F.log_softmax(logits.float() / cfg.temperature, dim=-1).cpu()  # (N, V)
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()  # targets per row
        enc = encode_topk(logp, cfg.top_k, vocab)
        if cfg.cross_tokenizer:
            enc |= own_tokens(logp, batch["labels"], vocab)
        start = 0
        for row, i in enumerate(idx):
            ex = {k: v[start:start + counts[row]] for k, v in enc.items()}
            n_real = len(examples[i].input_ids)
            for layer in cfg.hidden_layers:
                ex[f"hidden_{layer}"] = store["hidden"][layer][row, :n_real].float().cpu().numpy().astype(np.float16)
            per_example[i] = ex
            start += counts[row]
        bar.update(len(idx))
    for i in range(len(examples)):
        for k, v in per_example[i].items():
            parts.setdefault(k, []).append(v)
        n_targets.append(n_targets[-1] + len(per_example[i]["top1_logprob"]))
        n_tokens.append(n_tokens[-1] + len(examples[i].input_ids))
    arrays = {k: np.ascontiguousarray(np.concatenate(v)) for k, v in parts.items()}
    arrays["target_offsets"] = np.asarray(n_targets, dtype=np.int64)
    if cfg.hidden_layers:
        arrays["token_offsets"] = np.asarray(n_tokens, dtype=np.int64)
    return arrays


def own_tokens(logp, labels, vocab: int) -> dict:
    """A cross-tokenizer cache's extra arrays: each target token as written and its log-prob (N,), from the
    (N, V) log-probs and the batch's (B, T) labels (the target rows are the labels of positions 1..)."""

    from kdforge.data.chat import IGNORE_INDEX
    from kdforge.softlabels.format import id_dtype

    lab = labels[:, 1:]
    ids = lab[lab != IGNORE_INDEX].cpu()  # (N,) in the rows' order
    return {"target_ids": ids.numpy().astype(id_dtype(vocab)),
            "target_logprob": logp.gather(1, ids[:, None])[:, 0].float().numpy()}


def _served_shape(tokenizer: str) -> tuple[int, int]:
    """(layers, hidden size) from a served teacher's config.json next to its tokenizer (0, 0 when there is none)."""
    path = Path(tokenizer) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0, 0
    config = config.get("text_config", config)
    return int(config.get("num_hidden_layers") or 0), int(config.get("hidden_size") or 0)


def served_label_examples(teacher, tok, examples, cfg: LabelConfig, vocab: int, bar) -> dict:
    """A shard's labels from a served teacher: one prompt_logprobs request per example (concurrent), its rows
    at the target positions encoded as the local path encodes its log_softmax top-k (`encode_topk_values`)."""
    import numpy as np
    import torch

    from kdforge.data.chat import IGNORE_INDEX
    from kdforge.softlabels.format import encode_topk_values

    got = teacher.prompt_topk([e.input_ids for e in examples], cfg.top_k, progress=bar.update)
    parts: dict[str, list[np.ndarray]] = {}
    n_targets = [0]
    for ex, rows in zip(examples, got):
        keep = torch.tensor([lab != IGNORE_INDEX for lab in ex.labels[1:]], dtype=torch.bool)  # (L-1,)
        if rows.ids.numel() and int(rows.ids.max()) >= vocab:
            raise ConfigError(f"the served teacher returned token id {int(rows.ids.max())}, past the tokenizer's "
                              f"{vocab} tokens (padded embedding rows); the tokenizer does not go with the model")
        enc = encode_topk_values(rows.logprobs[keep], rows.ids[keep], vocab)
        for k, v in enc.items():
            parts.setdefault(k, []).append(v)
        n_targets.append(n_targets[-1] + int(keep.sum()))
    arrays = {k: np.ascontiguousarray(np.concatenate(v)) for k, v in parts.items()}
    arrays["target_offsets"] = np.asarray(n_targets, dtype=np.int64)
    return arrays


STAGES = (Stage("label", "cache the teacher's top-k soft labels on disk (offline distillation)", LabelConfig, run,
                positional="teacher", flags=("data", "out", "top_k", "hidden_layers", "batch_size", "precision"),
                parallel=True),)
