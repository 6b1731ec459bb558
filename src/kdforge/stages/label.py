"""`kdforge label`: the teacher's soft labels, computed once and cached on disk.

For every conversation of the data (a `generate` folder or any supported JSONL), every target
position (whose next token is the assistant's) gets the teacher's top-k token ids and
log-probabilities plus the log of the mass outside the top-k (format: softlabels/format.py,
docs/soft-label-cache.md); optionally the hidden states of chosen teacher layers for every real
token (fp16). Shards of ``shard_size`` examples are written atomically and skipped on a re-run,
so an interrupted run loses at most the shard in flight; ``manifest.json`` is written last.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from kdforge.artifacts import atomic_write_json, file_sha256, fsync_dir, write_config, write_meta
from kdforge.config import ConfigError, Dtype, StageConfig, dump, read_yaml
from kdforge.data.formats import data_file, load_training_data, select_split
from kdforge.softlabels import MANIFEST, shard_name
from kdforge.stages import Stage


class LabelConfig(StageConfig):
    """`kdforge label`: the teacher's top-k soft labels cached on disk (offline distillation)."""

    teacher: str = Field(description="teacher: HF folder, GGUF file, or embedded:smollm2-135m-instruct")
    data: str = Field(description="a generate artifact folder or a JSONL file of conversations")
    out: str = Field("artifacts/labels", description="output folder (finished shards are reused on a re-run)")
    split: Literal["train", "validation", "all"] = "all"
    limit: int | None = Field(None, gt=0)
    top_k: int = Field(64, gt=1, le=1024, description="teacher log-probs kept per target token")
    temperature: float = Field(1.0, gt=0, description="capture temperature")
    max_length: int = Field(256, gt=8, description="must equal distill.max_length when training from the cache")
    hidden_layers: list[int] = Field(default_factory=list, description="teacher layers whose hidden states to keep")
    batch_size: int = Field(8, gt=0, description="conversations per teacher forward pass")
    shard_size: int = Field(256, gt=0, description="conversations per shard")
    dtype: Dtype = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


_SAME = ("teacher", "data", "split", "limit", "top_k", "temperature", "max_length", "hidden_layers", "shard_size")


def _weights_sha256(spec: str) -> str:
    from kdforge.models.loading import resolve_model

    src = resolve_model(spec)
    files = [src.folder / src.gguf_file] if src.gguf_file else sorted(src.folder.glob("*.safetensors"))
    return file_sha256(files[0]) if len(files) == 1 else json.dumps([file_sha256(f) for f in files])


def run(cfg: LabelConfig, overwrite: bool = False) -> dict[str, Any]:
    from safetensors.numpy import save_file
    from tqdm import tqdm

    from kdforge.data.batching import shared_vocab_size
    from kdforge.data.chat import encode_conversation
    from kdforge.models.loading import load_model
    from kdforge.softlabels.format import FORMAT_VERSION, bytes_per_target, id_dtype, tokenizer_fingerprint

    t0 = time.time()
    out = Path(cfg.out)
    convs = select_split(load_training_data(cfg.data), cfg.split, cfg.limit)
    convs = [c for c in convs if c.has_answer]
    if not convs:
        raise ConfigError(f"{cfg.data}: no conversations with assistant answers in split '{cfg.split}'")
    if overwrite and out.exists():
        shutil.rmtree(out)
    if (out / "config.yaml").is_file():
        prev = read_yaml(out / "config.yaml")
        diffs = [k for k in _SAME if prev.get(k) != dump(cfg)[k]]
        if diffs:
            raise ConfigError(f"{out} holds labels made with other settings ({', '.join(diffs)}); "
                              "use another --out or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    # Shards finished by an earlier run (named in its manifest or in a shard's sidecar) are reused.
    known: dict[str, dict] = {}
    if (out / MANIFEST).is_file():
        known = {sh["file"]: sh for sh in json.loads((out / MANIFEST).read_text()).get("shards", [])}
    (out / MANIFEST).unlink(missing_ok=True)
    write_config(out, dump(cfg))

    teacher, tok = load_model(cfg.teacher, cfg.device, cfg.dtype, cfg.trust_remote_code)
    vocab = shared_vocab_size(tok, teacher)
    bad = [x for x in cfg.hidden_layers if not 0 <= x < teacher.config.num_hidden_layers]
    if bad:
        n = teacher.config.num_hidden_layers
        raise ConfigError(f"hidden_layers {bad} out of range: the teacher has {n} layers (0..{n - 1})")
    encoded = [encode_conversation(tok, c.messages, cfg.max_length) for c in convs]
    n_shards = (len(encoded) + cfg.shard_size - 1) // cfg.shard_size
    shards, stats = [], {"targets": 0, "seconds": 0.0, "reused": 0}
    bar = tqdm(total=len(encoded), desc="label", unit="conv", dynamic_ncols=True)
    for s in range(n_shards):
        lo, hi = s * cfg.shard_size, min(len(encoded), (s + 1) * cfg.shard_size)
        name = shard_name(s)
        meta_path = out / f".{name}.json"
        info = json.loads(meta_path.read_text()) if meta_path.is_file() else known.get(name)
        if info and (out / name).is_file() and info["examples"] == hi - lo:
            if info["bytes"] == (out / name).stat().st_size and info["sha256"] == file_sha256(out / name):
                shards.append(info)
                stats["reused"] += hi - lo
                bar.update(hi - lo)
                continue
        t = time.time()
        arrays = label_examples(teacher, tok, encoded[lo:hi], cfg, vocab, bar)
        stats["seconds"] += time.time() - t
        tmp = out / f".{name}.tmp"
        save_file(arrays, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out / name)
        fsync_dir(out)
        info = {"file": name, "examples": hi - lo, "targets": int(arrays["target_offsets"][-1]),
                "bytes": (out / name).stat().st_size, "sha256": file_sha256(out / name)}
        atomic_write_json(meta_path, info)
        shards.append(info)
        stats["targets"] += info["targets"]
    bar.close()

    targets = sum(sh["targets"] for sh in shards)
    label_bytes = sum(sh["bytes"] for sh in shards) if not cfg.hidden_layers else None
    manifest = {
        "format_version": FORMAT_VERSION,
        "teacher": {"spec": cfg.teacher, "weights_sha256": _weights_sha256(cfg.teacher)},
        "tokenizer": tokenizer_fingerprint(tok),
        "data": {"path": str(data_file(cfg.data).resolve()), "sha256": file_sha256(data_file(cfg.data)),
                 "split": cfg.split, "limit": cfg.limit},
        "examples": [{"id": c.id, "split": c.split or "train"} for c in convs],
        "k": cfg.top_k, "temperature": cfg.temperature, "max_length": cfg.max_length,
        "vocab_size": vocab, "hidden_layers": cfg.hidden_layers,
        "teacher_layers": teacher.config.num_hidden_layers, "teacher_hidden_size": teacher.config.hidden_size,
        "dtypes": {"topk_ids": str(id_dtype(vocab)),
                   "top1_logprob": "float16", "topk_codes": "uint8 (sqrt code)", "tail_logmass": "float16",
                   "hidden": "float16"},
        "counts": {"examples": len(encoded), "targets": targets,
                   "tokens": sum(len(e.input_ids) for e in encoded)},
        "bytes_per_target_token": {"format": bytes_per_target(cfg.top_k, vocab),
                                   "on_disk": round(label_bytes / targets, 2) if label_bytes else None},
        "shards": shards,
    }
    atomic_write_json(out / MANIFEST, manifest)
    for sh in shards:
        (out / f".{sh['file']}.json").unlink(missing_ok=True)
    metrics = {"examples": len(encoded), "targets": targets, "shards": len(shards), "reused_examples": stats["reused"],
               "label_tokens_per_s": round(stats["targets"] / stats["seconds"], 1) if stats["seconds"] else None,
               "bytes_per_target_token": manifest["bytes_per_target_token"]["on_disk"]}
    write_meta(out, "label", {"teacher": cfg.teacher if Path(cfg.teacher).exists() else None, "data": cfg.data},
               metrics, time.time() - t0)
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
    from kdforge.models.forward import DEFAULT_PACK_LENGTH, capture, target_logits
    from kdforge.softlabels.format import encode_topk

    device = next(teacher.parameters()).device
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
        counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
        enc = encode_topk(logp, cfg.top_k, vocab)
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


STAGES = (Stage("label", "cache the teacher's top-k soft labels on disk (offline distillation)", LabelConfig, run,
                positional="teacher", flags=("data", "out", "top_k", "hidden_layers", "batch_size")),)
