"""The soft-label cache's manifest as types: what `manifest.json` holds, declared once.

The writer (softlabels/writer.py) builds a :class:`Manifest` and dumps it; the reader
(softlabels/reader.py) validates the file against it, so a missing or mistyped field is an error
naming the field instead of a KeyError deep in training. Field order is the JSON's key order: a
dumped manifest is byte-identical to the dict the label stage wrote before these types existed (a
test pins it), so existing caches keep reading. Fields added since have defaults (old caches read)
and are left out of the JSON while unset (old caches write back byte for byte).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

TEACHER_TOKENIZER = "teacher_tokenizer"  # a cross-tokenizer cache's copy of the teacher's tokenizer


class _Part(BaseModel):
    # Unknown keys are refused: every key of the format is declared here, so one that is not was
    # written by something else (or a newer format that forgot to bump FORMAT_VERSION).
    model_config = ConfigDict(extra="forbid")


class TeacherInfo(_Part):
    spec: str                 # the model spec `kdforge label` was given
    weights_sha256: str       # sha256 of its weights file (a JSON list of hashes for several files)
    # The precision the teacher ran in (bf16, fp16, fp32, int8, 4bit). None: a cache made before it was
    # recorded; such a manifest is written back without the key (softlabels.writer.manifest_json).
    precision: str | None = None
    # A served teacher (spec http(s)://...): the model name its server reports (/v1/models) and the local
    # tokenizer it was checked against. None for a local teacher; left out of the JSON then.
    served_model: str | None = None
    tokenizer: str | None = None


class TokenizerInfo(_Part):
    """softlabels.format.tokenizer_fingerprint: hashes that change when tokenisation or chat formatting would."""

    vocab_sha256: str
    chat_template_sha256: str
    special_tokens_sha256: str
    vocab_size: str


class DataInfo(_Part):
    path: str                 # the resolved data file
    sha256: str
    split: str
    limit: int | None


class ExampleInfo(_Part):
    id: str
    split: str


class Dtypes(_Part):
    topk_ids: str
    top1_logprob: str
    topk_codes: str
    tail_logmass: str
    hidden: str


class Counts(_Part):
    examples: int
    targets: int              # target positions (rows) over all shards
    tokens: int               # real tokens over all examples (the rows of hidden states)


class BytesPerTarget(_Part):
    format: int               # what the format costs per target token (no hidden states)
    on_disk: float | None     # shard bytes per target token; None when hidden states are stored too


class ShardInfo(_Part):
    """One shard as finished: also written alone as its sidecar while the run is under way."""

    file: str
    examples: int
    targets: int
    bytes: int
    sha256: str


class Manifest(_Part):
    format_version: int
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    data: DataInfo
    examples: list[ExampleInfo]  # in cache row order
    k: int = Field(gt=1)
    temperature: float = Field(gt=0)  # the capture temperature
    max_length: int
    vocab_size: int
    hidden_layers: list[int]
    teacher_layers: int
    teacher_hidden_size: int
    dtypes: Dtypes
    counts: Counts
    bytes_per_target_token: BytesPerTarget
    shards: list[ShardInfo]
    # A cache for a student with another tokenizer (docs/cross-tokenizer.md): each shard also holds
    # target_ids (the teacher's own target tokens) and target_logprob (their log-probs), and the folder the
    # teacher's tokenizer (TEACHER_TOKENIZER). None: a same-tokenizer cache; left out of the JSON then.
    cross_tokenizer: bool | None = None
