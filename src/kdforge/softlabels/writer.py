"""Write a soft-label cache: shards as they are labelled, the manifest last.

A shard is written atomically and then described by a sidecar, ``.shard-NNNNN.safetensors.json``
(its :class:`ShardInfo`), so a run killed between shards leaves every finished shard reusable: a
re-run opens the folder, keeps each shard whose size and checksum match its sidecar (or the old
manifest's entry) and labels only the rest. ``manifest.json`` is written last, from the shards' infos;
its presence marks a finished cache, and the sidecars are removed after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from kdforge.artifacts import atomic_file, atomic_write_json, file_sha256
from kdforge.softlabels import MANIFEST, shard_name
from kdforge.softlabels.format import FORMAT_VERSION, bytes_per_target, id_dtype
from kdforge.softlabels.manifest import (
    BytesPerTarget,
    Counts,
    DataInfo,
    Dtypes,
    ExampleInfo,
    Manifest,
    ShardInfo,
    TeacherInfo,
    TokenizerInfo,
)
from kdforge.softlabels.reader import CacheError, read_manifest


def sidecar_name(index: int) -> str:
    return f".{shard_name(index)}.json"


class CacheWriter:
    """The cache folder being written. Opening it forgets the old manifest (the cache is unfinished until
    :meth:`finish`) but remembers its shards, so they can be reused.

    Several processes may write one cache (`kdforge label` under torchrun): rank 0 opens the folder
    first, the others open it with ``known`` (rank 0's :attr:`known`), each writes its own shards (a shard
    file and its sidecar, never another rank's), and rank 0 :meth:`adopt` s the others' shard infos before
    :meth:`finish`.
    """

    def __init__(self, folder: str | Path, known: dict[str, ShardInfo] | None = None):
        """``known``: the shards an earlier manifest listed, as the first process to open the folder read
        them; given, this process neither reads nor removes the manifest (that process did)."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._known: dict[str, ShardInfo] = dict(known or {})
        if known is None:
            if (self.folder / MANIFEST).is_file():
                try:
                    self._known = {sh.file: sh for sh in read_manifest(self.folder / MANIFEST).shards}
                except CacheError:
                    pass  # a corrupt old manifest only costs the reuse of its shards
            (self.folder / MANIFEST).unlink(missing_ok=True)
        self._shards: dict[int, ShardInfo] = {}  # shard index -> its info, written or reused by this run

    @property
    def known(self) -> dict[str, ShardInfo]:
        """The old manifest's shards (file name -> info), for the other processes writing this cache."""
        return dict(self._known)

    @property
    def shards(self) -> dict[int, ShardInfo]:
        """Shard index -> info of every shard this process wrote, reused or adopted."""
        return dict(self._shards)

    def adopt(self, index: int, info: ShardInfo) -> None:
        """Count shard ``index``, written or verified by another process of the run, in :meth:`finish`."""
        if info.file != shard_name(index):
            raise ValueError(f"shard {index} is {shard_name(index)}, not {info.file}")
        self._shards[index] = info

    def reuse(self, index: int, examples: int) -> ShardInfo | None:
        """Keep shard ``index`` from an earlier run if it holds ``examples`` examples and its size and checksum
        are the recorded ones; return its info (None: it must be labelled)."""
        name = shard_name(index)
        sidecar = self._sidecar(index)
        info = sidecar or self._known.get(name)
        path = self.folder / name
        if info is None or not path.is_file() or info.examples != examples:
            return None
        if info.bytes != path.stat().st_size or info.sha256 != file_sha256(path):
            return None
        if sidecar is None:
            # Known from the old manifest only, which is gone now: a sidecar keeps it reusable if this run is killed.
            atomic_write_json(self.folder / sidecar_name(index), info.model_dump(mode="json"))
        self._shards[index] = info
        return info

    def _sidecar(self, index: int) -> ShardInfo | None:
        path = self.folder / sidecar_name(index)
        if not path.is_file():
            return None
        try:
            return ShardInfo.model_validate_json(path.read_bytes())
        except ValidationError:
            return None  # written by something else: label the shard again

    def write_shard(self, index: int, arrays: dict[str, np.ndarray]) -> ShardInfo:
        """Write shard ``index`` (the arrays of softlabels/format.py, ``target_offsets`` included), then its sidecar."""
        from safetensors.numpy import save_file

        path = self.folder / shard_name(index)
        with atomic_file(path) as tmp:
            save_file(arrays, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
        info = ShardInfo(file=path.name, examples=len(arrays["target_offsets"]) - 1,
                         targets=int(arrays["target_offsets"][-1]), bytes=path.stat().st_size,
                         sha256=file_sha256(path))
        atomic_write_json(self.folder / sidecar_name(index), info.model_dump(mode="json"))
        self._shards[index] = info
        return info

    def finish(self, *, teacher: TeacherInfo, tokenizer: dict[str, str] | TokenizerInfo, data: DataInfo,
               examples: list[ExampleInfo], k: int, temperature: float, max_length: int, vocab_size: int,
               hidden_layers: list[int], teacher_layers: int, teacher_hidden_size: int, tokens: int,
               cross_tokenizer: bool = False) -> Manifest:
        """Write ``manifest.json`` over the shards written or reused, in index order; the derived fields
        (dtypes, counts, bytes per target token) are computed here, from the format."""
        shards = [self._shards[i] for i in sorted(self._shards)]
        targets = sum(sh.targets for sh in shards)
        # Hidden states share the shards: bytes per target token only means the labels' cost without them.
        label_bytes = sum(sh.bytes for sh in shards) if not hidden_layers else None
        manifest = Manifest(
            format_version=FORMAT_VERSION, teacher=teacher,
            tokenizer=tokenizer if isinstance(tokenizer, TokenizerInfo) else TokenizerInfo(**tokenizer),
            data=data, examples=examples, k=k, temperature=temperature, max_length=max_length,
            vocab_size=vocab_size, hidden_layers=list(hidden_layers), teacher_layers=teacher_layers,
            teacher_hidden_size=teacher_hidden_size,
            dtypes=Dtypes(topk_ids=str(id_dtype(vocab_size)), top1_logprob="float16", topk_codes="uint8 (sqrt code)",
                          tail_logmass="float16", hidden="float16"),
            counts=Counts(examples=len(examples), targets=targets, tokens=tokens),
            bytes_per_target_token=BytesPerTarget(format=bytes_per_target(k, vocab_size),
                                                  on_disk=round(label_bytes / targets, 2) if label_bytes else None),
            shards=shards, cross_tokenizer=True if cross_tokenizer else None,
        )
        write_manifest(self.folder, manifest)
        for i in self._shards:
            (self.folder / sidecar_name(i)).unlink(missing_ok=True)
        return manifest


def write_manifest(folder: str | Path, manifest: Manifest) -> None:
    atomic_write_json(Path(folder) / MANIFEST, manifest_json(manifest))


def manifest_json(manifest: Manifest) -> dict[str, Any]:
    """The JSON object of ``manifest``: the keys, in the order, the cache has always had (a teacher
    precision only when known: a cache made before it was recorded keeps its bytes; a served teacher's
    model name and tokenizer only for one)."""
    out = manifest.model_dump(mode="json")
    for key in ("precision", "served_model", "tokenizer"):
        if out["teacher"].get(key) is None:
            del out["teacher"][key]
    if out.get("cross_tokenizer") is None:
        out.pop("cross_tokenizer", None)
    return out
