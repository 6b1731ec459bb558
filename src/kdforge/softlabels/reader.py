"""Read a soft-label cache without loading it: shards are memory-mapped, examples read on demand."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import safe_open

from kdforge.artifacts import file_sha256
from kdforge.errors import UserError
from kdforge.softlabels import MANIFEST
from kdforge.softlabels.format import FORMAT_VERSION, decode_topk, tokenizer_fingerprint
from kdforge.softlabels.manifest import Manifest, ShardInfo


class CacheError(UserError):
    """The cache is missing, corrupt, or does not match the tokenizer/data it is used with."""


def read_manifest(path: str | Path) -> Manifest:
    """``manifest.json`` parsed and validated; a corrupt, foreign or other-version file is a CacheError
    that names the file and the field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: corrupt manifest ({e}); re-run `kdforge label` with the same --out") from e
    if not isinstance(raw, dict):
        raise CacheError(f"{path}: not a soft-label manifest (a JSON object was expected)")
    # The version first: another version's fields are not this one's, and the fix is to re-label.
    if raw.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path}: format version {raw.get('format_version')} is not "
                         f"{FORMAT_VERSION}; re-label with this kdforge version")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        more = f" (and {e.error_count() - 5} more)" if e.error_count() > 5 else ""
        raise CacheError(f"{path}: not a valid soft-label manifest: {problems}{more}; "
                         "re-run `kdforge label` with the same --out") from None


@dataclass
class SparseLabels:
    """The teacher's signal at an example's N target positions."""

    ids: torch.Tensor        # (N, k) int64 token ids, most likely first
    logprobs: torch.Tensor   # (N, k) float32 log-probabilities at the capture temperature
    tail_logmass: torch.Tensor  # (N,) float32 log of the mass outside the top-k
    hidden: dict[int, torch.Tensor]  # teacher layer -> (T, H) float32 hidden states of all real tokens
    # (N,) float32 log-prob of each target token as written (a cache labelled with cross_tokenizer); else None
    actual_logp: torch.Tensor | None = None


class SoftLabelCache:
    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise CacheError(f"{self.path} is not a finished soft-label cache ({MANIFEST} missing); "
                             "run or re-run `kdforge label` with the same --out")
        self.manifest: Manifest = read_manifest(mpath)
        self.k = self.manifest.k
        self.temperature = self.manifest.temperature
        self.hidden_layers = list(self.manifest.hidden_layers)
        self._index: list[tuple[int, int]] = []  # example -> (shard number, row in shard)
        for s, shard in enumerate(self.manifest.shards):
            self._check_shard(shard, verify)
            self._index.extend((s, r) for r in range(shard.examples))
        self._handles: dict[int, object] = {}
        self._offsets: dict[int, np.ndarray] = {}

    def _check_shard(self, shard: ShardInfo, verify: bool) -> None:
        f = self.path / shard.file
        if not f.is_file():
            raise CacheError(f"shard {f} is missing; re-run `kdforge label` with the same --out to rebuild it")
        if f.stat().st_size != shard.bytes:
            raise CacheError(f"shard {f} is truncated or altered: {f.stat().st_size} bytes, the manifest says "
                             f"{shard.bytes}; delete it and re-run `kdforge label` to rebuild it")
        if verify and file_sha256(f) != shard.sha256:
            raise CacheError(f"shard {f} is corrupted (checksum mismatch); delete it and re-run `kdforge label`")

    def __len__(self) -> int:
        return len(self._index)

    def teacher_tokenizer(self):
        """A cross-tokenizer cache's copy of the teacher's tokenizer (what offline training encodes the data with)."""
        from transformers import AutoTokenizer

        from kdforge.softlabels.manifest import TEACHER_TOKENIZER

        folder = self.path / TEACHER_TOKENIZER
        if not folder.is_dir():
            raise CacheError(f"{folder} is missing: this cross-tokenizer cache is incomplete; re-run `kdforge label "
                             "--set cross_tokenizer=true` with the same --out")
        return AutoTokenizer.from_pretrained(folder)

    def check_compatible(self, tokenizer, data_sha256: str | None = None, data_path: str | None = None,
                         vocabulary: bool = True) -> None:
        """Refuse a cache made with another tokenizer, chat template or data file (``data_path``: the data
        the user gave now, named in the message). ``vocabulary=False``: a student trimmed from the cache's
        teacher (its ids differ by design; its chat template and special tokens must not)."""
        mine = self.manifest.tokenizer.model_dump()
        theirs = tokenizer_fingerprint(tokenizer)
        what = {"vocab_sha256": "vocabulary", "chat_template_sha256": "chat template",
                "special_tokens_sha256": "special tokens", "vocab_size": "vocabulary size"}
        if not vocabulary:
            what = {k: v for k, v in what.items() if k not in ("vocab_sha256", "vocab_size")}
        diffs = [what[k] for k in what if mine.get(k) != theirs.get(k)]
        if diffs:
            raise CacheError(f"soft-label cache {self.path} was made with a different {', '.join(diffs)} than the "
                             "student's tokenizer; re-label with the student's tokenizer or use a matching student")
        if data_sha256 is not None and self.manifest.data.sha256 != data_sha256:
            given = data_path or self.manifest.data.path
            raise CacheError(f"soft-label cache {self.path} was made from other data: {given} (sha256 "
                             f"{data_sha256[:12]}…) is not the file it labelled ({self.manifest.data.path}, sha256 "
                             f"{self.manifest.data.sha256[:12]}…); pass that data, or re-run `kdforge label --data "
                             f"{given}`")

    def rows(self) -> dict[str, int]:
        """The cache row of each example id (rows are in the order the examples were labelled)."""
        return {e.id: i for i, e in enumerate(self.manifest.examples)}

    def _shard(self, s: int):
        if s not in self._handles:
            h = safe_open(str(self.path / self.manifest.shards[s].file), framework="np")
            self._handles[s] = h
            self._offsets[s] = h.get_tensor("target_offsets")
        return self._handles[s], self._offsets[s]

    def num_targets(self, i: int) -> int:
        s, r = self._index[i]
        _, off = self._shard(s)
        return int(off[r + 1] - off[r])

    def get(self, i: int) -> SparseLabels:
        """Example ``i``'s labels; reads only its rows from the shard."""
        s, r = self._index[i]
        h, off = self._shard(s)
        a, b = int(off[r]), int(off[r + 1])
        ids = torch.from_numpy(h.get_slice("topk_ids")[a:b].astype(np.int64))
        lp = decode_topk(h.get_slice("top1_logprob")[a:b], h.get_slice("topk_codes")[a:b])
        tail = torch.from_numpy(h.get_slice("tail_logmass")[a:b].astype(np.float32))
        hidden = {}
        if self.hidden_layers:
            toff = h.get_tensor("token_offsets")
            ta, tb = int(toff[r]), int(toff[r + 1])
            hidden = {layer: torch.from_numpy(h.get_slice(f"hidden_{layer}")[ta:tb].astype(np.float32))
                      for layer in self.hidden_layers}
        actual = None
        if self.manifest.cross_tokenizer:
            actual = torch.from_numpy(h.get_slice("target_logprob")[a:b].astype(np.float32))
        return SparseLabels(ids, lp, tail, hidden, actual)
