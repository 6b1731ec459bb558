"""`kdforge student`: build a student from the teacher and save it as an HF folder artifact.

Methods: ``layers`` (uniform subset, first and last kept), ``depth`` (the layers with the highest
block influence on calibration data), ``width`` (FFN neurons, attention heads/KV groups and hidden
channels by activation importance; optionally fewer layers by block influence), ``fresh`` (a
smaller config of the same architecture, its weights sliced from the teacher or random).
``trim_vocab`` then keeps only the tokens some data, the chat template and the tokenizer's special and
byte tokens use (kdforge.models.vocab_trim): the embedding and head lose the other rows, the tokenizer
their tokens and merges, and ``kdforge_vocab_map.json`` maps student ids to teacher ids. Or ``tokenizer``
(a folder) / ``train_tokenizer`` (a size, trained on ``tokenizer_data``) give the student another tokenizer,
its embedding rows built from the teacher's for each new token's text (kdforge.models.transplant); such a
student is distilled with the cross-tokenizer losses (docs/cross-tokenizer.md).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field, model_validator

from kdforge.artifacts import atomic_dir, check_writable, write_config, write_meta
from kdforge.config import ConfigError, StageConfig, dump
from kdforge.stages import Stage


class StudentConfig(StageConfig):
    """`kdforge student`: build a student from the teacher."""

    teacher: str = Field(description="the model to cut the student from: HF folder, GGUF file or embedded:NAME")
    out: str = Field("artifacts/student", description="output folder (an HF model folder)")
    method: Literal["layers", "depth", "width", "fresh"] = Field(
        "layers", description="layers: uniform subset; depth: by block influence; width: prune by activation "
        "importance; fresh: a smaller config, sliced or random")
    num_layers: int | None = Field(None, gt=0, description="layers to keep (layers/depth: 8; width/fresh: all)")
    layers: list[int] | None = Field(None, description="explicit teacher layer indices to keep (method=layers)")
    hidden_size: int | None = Field(None, gt=0, description="width/fresh: hidden channels kept")
    intermediate_size: int | None = Field(None, gt=0, description="width/fresh: FFN neurons kept per layer")
    num_attention_heads: int | None = Field(None, gt=0, description="width/fresh: query heads kept per layer")
    num_key_value_heads: int | None = Field(None, gt=0, description="width/fresh: KV heads (groups) kept per "
                                            "layer")
    init: Literal["slice", "random"] = Field("slice", description="fresh: slice teacher weights or random init")
    calibration: str = Field("bundled", description="prompts or conversations to measure importance on")
    calibration_samples: int = Field(64, gt=0)
    calibration_max_length: int = Field(256, gt=8)
    trim_vocab: str | None = Field(None, description="keep only the tokens this data uses (a `kdforge generate` "
                                   "folder, conversations JSONL or 'bundled'), plus the chat template's, special "
                                   "and byte tokens: the embedding and head shrink to them")
    trim_split: Literal["all", "train"] = Field("all", description="trim_vocab: the conversations of this split "
                                                "only ('train': a held-out validation split stays unseen)")
    tokenizer: str | None = Field(None, description="give the student this tokenizer (a folder) instead of the "
                                  "teacher's: its embeddings start from the teacher's rows for each token's text")
    train_tokenizer: int | None = Field(None, gt=0, description="give the student a new tokenizer of at most this "
                                        "many tokens, trained (same kind as the teacher's) on tokenizer_data")
    tokenizer_data: str | None = Field(None, description="train_tokenizer: the conversations to train it on (a "
                                       "generate folder or JSONL)")
    seed: int = 0
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_vocabulary_change(self) -> StudentConfig:
        changes = [n for n in ("trim_vocab", "tokenizer", "train_tokenizer") if getattr(self, n) is not None]
        if len(changes) > 1:
            raise ValueError(f"{' and '.join(changes)}: choose one way to change the student's vocabulary")
        if self.train_tokenizer is not None and self.tokenizer_data is None:
            raise ValueError("train_tokenizer needs tokenizer_data: the conversations to train the tokenizer on")
        return self


DEFAULT_LAYERS = 8


def run(cfg: StudentConfig, overwrite: bool = False) -> dict[str, Any]:
    import torch

    from kdforge.data.calibration import calibration_batches
    from kdforge.models.loading import count_parameters, load_model
    from kdforge.models.model_card import complete_model_folder, write_model_card
    from kdforge.models.pruning import build_width_student, measure_importance, plan_width, top_sorted
    from kdforge.models.student import build_layer_student, check_layers, random_student, uniform_layers
    from kdforge.models.vocab_trim import VocabTrimError, check_trimmable
    from kdforge.softlabels.format import tokenizer_fingerprint

    check_writable(cfg.out)  # before the teacher loads: a read-only --out fails in a second
    t0 = time.time()
    teacher, tok = load_model(cfg.teacher, device="cpu", dtype="float32", trust_remote_code=cfg.trust_remote_code)
    tc = teacher.config
    n_teacher = tc.num_hidden_layers
    trim_data = None
    if cfg.trim_vocab:  # a tokenizer that cannot be trimmed, or unreadable data, fails before any heavy work
        try:
            check_trimmable(tok)
        except VocabTrimError as e:
            raise ConfigError(f"student: {e}") from None
        trim_data = _trim_data(cfg.trim_vocab, cfg.trim_split)
    new_tok = _new_tokenizer(cfg, tok)  # checked and trained before pruning: a bad tokenizer fails early
    imp = None
    if cfg.method in ("depth", "width"):
        imp = measure_importance(teacher, calibration_batches(tok, cfg.calibration, cfg.calibration_samples,
                                                              cfg.calibration_max_length))
    try:
        if cfg.method == "layers":
            keep = (check_layers(cfg.layers, n_teacher) if cfg.layers
                    else uniform_layers(n_teacher, cfg.num_layers or min(DEFAULT_LAYERS, n_teacher)))
        elif cfg.method == "depth" or (cfg.method == "width" and cfg.num_layers):
            n_keep = cfg.num_layers or min(DEFAULT_LAYERS, n_teacher)
            if not 1 <= n_keep <= n_teacher:
                raise ValueError(f"num_layers must be 1..{n_teacher}")
            keep = top_sorted(torch.tensor(imp.block_influence), n_keep)
        elif cfg.method == "width":
            keep = list(range(n_teacher))
        else:
            keep = uniform_layers(n_teacher, cfg.num_layers or n_teacher)

        if cfg.method in ("layers", "depth"):
            student = build_layer_student(teacher, keep)
        else:
            hidden = cfg.hidden_size or tc.hidden_size
            inter = cfg.intermediate_size or tc.intermediate_size
            heads = cfg.num_attention_heads or tc.num_attention_heads
            kv = cfg.num_key_value_heads or max(1, heads * tc.num_key_value_heads // tc.num_attention_heads)
            if cfg.method == "fresh" and cfg.init == "random":
                student = random_student(teacher, len(keep), hidden, inter, heads, kv, cfg.seed)
            else:
                plan = plan_width(tc, imp if cfg.method == "width" else None, keep, hidden, inter, heads, kv)
                student = build_width_student(teacher, plan)
    except ValueError as e:
        raise ConfigError(f"student: {e}") from None
    trim_metrics, kept_ids, transplanted = {}, None, None
    teacher_vocab = tokenizer_fingerprint(tok)["vocab_sha256"]  # a label cache of this teacher names it too
    if trim_data is not None:
        tok, kept_ids, trim_metrics = _trim(student, tok, trim_data[0])
    elif new_tok is not None:
        tok, trim_metrics, transplanted = _transplant(student, tok, new_tok)
    metrics = {"teacher_layers": n_teacher, "student_layers": student.config.num_hidden_layers,
               "teacher_params": count_parameters(teacher), "student_params": count_parameters(student),
               "hidden_size": student.config.hidden_size, "intermediate_size": student.config.intermediate_size,
               "num_attention_heads": student.config.num_attention_heads,
               "num_key_value_heads": student.config.num_key_value_heads, **trim_metrics}
    with atomic_dir(cfg.out, overwrite=overwrite) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        complete_model_folder(tmp, tok, student)  # chat template in both places, every end-of-turn id
        write_config(tmp, dump(cfg))
        files, extra = None, {}
        if kept_ids is not None:
            from kdforge.models.vocab_trim import VOCAB_MAP_NAME, write_vocab_map

            write_vocab_map(tmp, kept_ids, tc.vocab_size, teacher_vocab_sha256=teacher_vocab)
            files = {"vocab_map": VOCAB_MAP_NAME}  # distill finds the map through this declaration
            extra = {"trim_vocab": trim_data[1]}  # the data's path and sha256
        if transplanted is not None:
            extra = {"tokenizer": {"source": cfg.tokenizer or f"trained on {cfg.tokenizer_data}",
                                   "transplant": transplanted}}
        meta = write_meta(tmp, "student", {"teacher": cfg.teacher}, metrics, time.time() - t0, files=files, extra={
            "method": cfg.method, "kept_teacher_layers": keep,
            # student layer i <-> teacher layer layer_map[i]: the default map for alignment losses
            "layer_map": {str(i): t for i, t in enumerate(keep)},
            "importance": imp.summary() if imp is not None else None, **extra,
        })
        write_model_card(tmp, "student", dump(cfg), meta, params=metrics["student_params"])  # README.md
    return metrics


def _new_tokenizer(cfg: StudentConfig, teacher_tok):
    """The tokenizer a transplant gives the student (``tokenizer`` or ``train_tokenizer``), else None."""
    from kdforge.models.transplant import TransplantError, conversation_texts, train_tokenizer

    if cfg.tokenizer is not None:
        from kdforge.models.loading import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
        if not tok.chat_template:
            raise ConfigError(f"student: the tokenizer {cfg.tokenizer} has no chat template; the student must read "
                              "conversations: add one to its tokenizer_config.json (chat_template)")
        return tok
    if cfg.train_tokenizer is None:
        return None
    from kdforge.data.formats import load_training_data

    try:
        texts = conversation_texts(teacher_tok, load_training_data(cfg.tokenizer_data))
        return train_tokenizer(teacher_tok, texts, cfg.train_tokenizer)
    except (TransplantError, ValueError) as e:
        raise ConfigError(f"student: train_tokenizer: {e}") from None


def _transplant(student, tok, new_tok):
    """Give ``student`` the tokenizer ``new_tok`` in place: (new_tok, metrics, transplant counts)."""
    from kdforge.models.transplant import TransplantError, transplant_vocabulary
    from kdforge.models.vocab_trim import embedding_parameters

    before = (student.config.vocab_size, embedding_parameters(student))
    try:
        stats = transplant_vocabulary(student, tok, new_tok)
    except TransplantError as e:
        raise ConfigError(f"student: {e}") from None
    return new_tok, {"vocab_size_before": before[0], "vocab_size_after": len(new_tok),
                     "embedding_params_before": before[1],
                     "embedding_params_after": embedding_parameters(student)}, stats


def _trim_data(spec: str, split: str = "all") -> tuple[list, dict[str, Any]]:
    """The conversations whose tokens a trimmed student keeps, and how meta.json records them."""
    from kdforge.artifacts import parent_entry
    from kdforge.data.formats import data_file, load_training_data, select_split
    from kdforge.data.prompts import BUNDLED, bundled_prompts_path, load_prompt_set

    if spec == BUNDLED:
        convs, entry = load_prompt_set(spec), parent_entry(bundled_prompts_path())
    else:
        convs, entry = load_training_data(spec), parent_entry(data_file(spec))
    if split == "all":
        return convs, entry
    chosen = select_split(convs, split)
    if not chosen:
        raise ConfigError(f"student: trim_split={split!r}: {spec} has no {split} conversations (records without "
                          "a split count as train); use trim_split: all")
    return chosen, entry | {"split": split, "conversations": len(chosen)}


def _trim(student, tok, conversations: list):
    """Trim ``student`` in place to the tokens of ``conversations``: (trimmed tokenizer, kept teacher ids,
    metrics). The config's bos/eos/pad ids are kept too: generation stops on them."""
    from kdforge.models.vocab_trim import (
        embedding_parameters,
        model_token_ids,
        trim_model,
        trim_tokenizer,
        used_token_ids,
    )

    before = (student.config.vocab_size, embedding_parameters(student))
    try:
        new_tok, kept = trim_tokenizer(tok, used_token_ids(tok, conversations) | model_token_ids(student))
        trim_model(student, kept)
    except ValueError as e:  # VocabTrimError, or a conversation the chat template cannot render
        raise ConfigError(f"student: {e}") from None
    return new_tok, kept, {"vocab_size_before": before[0], "vocab_size_after": len(kept),
                           "embedding_params_before": before[1],
                           "embedding_params_after": embedding_parameters(student)}


STAGES = (Stage("student", "build a student from the teacher", StudentConfig, run, positional="teacher",
                flags=("out", "num_layers", "layers", "method", "hidden_size", "intermediate_size",
                       "num_attention_heads", "num_key_value_heads", "init", "trim_vocab", "tokenizer",
                       "train_tokenizer", "tokenizer_data")),)
