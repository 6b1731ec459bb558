"""Vocabulary trimming: keep the tokens a student needs, slice its embedding and head to them.

SmolLM2-135M spends 28M of its parameters on a 49,152-token embedding; a student trained on one
domain uses a fraction of those tokens. The trimmed student keeps
  - every token of the training data as the tokenizer encodes it: each conversation through the chat
    template, and each prompt with the generation prompt (what a served student is sent);
  - the chat template's own text for every role (probe conversations), and any extra texts;
  - every special and added token, and the ids the model config names (bos/eos/pad);
  - the base tokens every text starts from: the 256 single-byte tokens of a byte-level BPE, or the
    ``<0xXX>`` byte-fallback pieces and the unk token of a SentencePiece-style BPE;
  - the merge closure: for every kept token and every merge (a, b) producing it, a and b, recursively.
New ids are the kept old ids in increasing order, renumbered 0..K-1; a merge is kept iff its two inputs
and its result are kept.

Why the kept data tokenises exactly as before. The normalizer, the added-token split and the
pre-tokenizer do not depend on the vocabulary, so the text falls into the same words; BPE derives each
word alone: from its characters s_0 it applies, step after step, the lowest-ranked merge among adjacent
pairs (leftmost on a tie), s_0 -> s_1 -> ... -> s_n. The output s_n is kept. Backwards: a token of s_i
either survives into s_{i+1} or is an input of the merge (a, b) that made a token of s_{i+1}; the
closure keeps a and b of every merge producing a kept token, so by induction every token of every s_i is
kept, and so is every merge applied (inputs and result kept). The trimmed merges are a subset of the
original ones in the same order, so at each step the applicable merges are a subset of those applicable
before that still holds the one chosen before: it is still the lowest ranked at the same position, and
the derivation is the same step for step. Merges that were not applicable stay not applicable (fewer
tokens, fewer merges, never new ones). With ``ignore_merges`` (Llama 3: a word that is a token is emitted
whole), a kept word that was a token still is one, and one that was not is not in the smaller vocabulary.

Why no text ever gives a missing id: a word starts from base tokens (kept; a SentencePiece character
outside the vocabulary falls back to kept byte pieces or the unk token), a merge is kept only with its
result, and added tokens are all kept. Text outside the kept data still tokenises to the same bytes, in
more, shorter tokens.

The teacher signal: the student cannot emit a dropped id, so its best target is the teacher's
distribution conditioned on the kept ids: distill takes ``teacher_logits[..., kept]``, whose
log-softmax renormalises the teacher's mass over the kept ids. The map travels in the student folder
(:data:`VOCAB_MAP_NAME`): student id i is teacher id ``kept_teacher_ids[i]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kdforge.artifacts import atomic_write_json, product
from kdforge.errors import UserError
from kdforge.models.token_bytes import TokenBytesError, backend_spec, byte_level_alphabet, encoding_kind, special_ids

VOCAB_MAP_NAME = "kdforge_vocab_map.json"
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id",
                  "decoder_start_token_id")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# Probe turns, so that the template's text around every role is kept even when the data has no such turn.
_PROBES = ([{"role": "system", "content": "x"}, {"role": "user", "content": "x"},
            {"role": "assistant", "content": "x"}], [{"role": "user", "content": "x"},
                                                     {"role": "assistant", "content": "x"}])


class VocabTrimError(UserError):
    """A tokenizer or model whose vocabulary kdforge cannot trim (the message says why and what to do)."""


def check_trimmable(tok) -> str:
    """The tokenizer's encoding kind (``byte_level`` or ``sentencepiece``) if kdforge can trim it."""
    try:
        spec = backend_spec(tok)
        model_type = spec["model"].get("type")
        if model_type != "BPE":
            raise VocabTrimError(f"vocabulary trimming supports BPE tokenizers only (byte-level like SmolLM2, Qwen2, "
                                 f"Llama 3; SentencePiece-style BPE like Gemma, Llama 2); this one is {model_type}: "
                                 "build the student without --trim-vocab")
        kind = encoding_kind(tok)
    except TokenBytesError as e:
        raise VocabTrimError(f"vocabulary trimming: {e}; build the student without --trim-vocab") from None
    if kind == "sentencepiece" and not spec["model"].get("byte_fallback") and not spec["model"].get("unk_token"):
        raise VocabTrimError("vocabulary trimming: this SentencePiece-style BPE has neither byte fallback nor an unk "
                             "token, so a dropped character would have no token; build without --trim-vocab")
    return kind


def required_ids(tok) -> set[int]:
    """Ids every trimmed tokenizer keeps: special and added tokens, and the base tokens any text starts from."""
    kind = check_trimmable(tok)
    model = backend_spec(tok)["model"]
    vocab = model["vocab"]
    if kind == "byte_level":
        pieces = list(byte_level_alphabet())  # the printable character standing for each of the 256 bytes
    else:
        pieces = [f"<0x{b:02X}>" for b in range(256)] + [model.get("unk_token") or ""]
    return ({vocab[p] for p in pieces if p in vocab} | special_ids(tok)
            | {int(i) for i in (getattr(tok, "added_tokens_decoder", None) or {})})


def used_token_ids(tok, conversations: Iterable[Any], extra_texts: Iterable[str] = ()) -> set[int]:
    """The ids to keep for ``conversations`` (Conversation objects or message lists): their tokens with
    the chat template and with the generation prompt before each answer, the template's own tokens,
    ``extra_texts``' tokens and :func:`required_ids`."""
    from kdforge.data.chat import encode_conversation, encode_prompt

    ids = required_ids(tok)
    for conv in conversations:
        msgs = list(getattr(conv, "messages", conv))
        ids.update(encode_conversation(tok, msgs).input_ids)
        # A prompt ending in the generation prompt may split differently from the same text mid-conversation.
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and i:
                ids.update(encode_prompt(tok, msgs[:i]))
        if msgs and msgs[-1]["role"] != "assistant":
            ids.update(encode_prompt(tok, msgs))
    for probe in _PROBES:
        try:
            ids.update(encode_conversation(tok, probe).input_ids)
            ids.update(encode_prompt(tok, probe[:-1]))
        except Exception:  # noqa: BLE001 - a template may refuse a role (Gemma has no system turn)
            continue
    for text in extra_texts:
        ids.update(tok(text, add_special_tokens=False)["input_ids"])
    return ids


def _pairs(model: dict) -> list[tuple[str, str]]:
    # tokenizers >= 0.20 writes merges as [left, right], older versions as "left right".
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _result(model: dict, a: str, b: str) -> str:
    # As tokenizers' BPE builds a merge's token: the right part loses the continuing-subword prefix.
    return a + b[len(model.get("continuing_subword_prefix") or ""):]


def merge_closure(spec: dict, keep: Iterable[int]) -> set[int]:
    """``keep`` with both inputs of every merge producing a kept token, recursively (see the module doc)."""
    model = spec["model"]
    vocab = model["vocab"]
    producers: dict[int, list[tuple[int, int]]] = {}
    for a, b in _pairs(model):
        ia, ib, r = vocab.get(a), vocab.get(b), vocab.get(_result(model, a, b))
        if ia is not None and ib is not None and r is not None:
            producers.setdefault(r, []).append((ia, ib))
    kept = set(keep)
    stack = list(kept)
    while stack:
        for pair in producers.get(stack.pop(), ()):
            for x in pair:
                if x not in kept:
                    kept.add(x)
                    stack.append(x)
    return kept


def _remap_post_processor(proc: dict | None, new_id: dict[int, int]) -> None:
    """Rewrite the special-token ids a post-processor adds (TemplateProcessing, Bert/Roberta, Sequence)."""
    if not proc:
        return
    for sub in proc.get("processors") or []:
        _remap_post_processor(sub, new_id)
    for entry in (proc.get("special_tokens") or {}).values():
        entry["ids"] = [new_id[i] for i in entry.get("ids", [])]
    for key in ("sep", "cls"):
        if isinstance(proc.get(key), list) and len(proc[key]) == 2:
            proc[key][1] = new_id[proc[key][1]]


def trim_tokenizer(tok, keep: Iterable[int]):
    """``(new_tok, kept_old_ids)``: a fast tokenizer holding ``keep``, :func:`required_ids` and their merge
    closure, renumbered in increasing old-id order (new id j is old id ``kept_old_ids[j]``), with the same
    special tokens, chat template and settings."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    keep = set(keep) | required_ids(tok)
    n = len(tok)
    if bad := sorted(i for i in keep if not 0 <= i < n):
        raise VocabTrimError(f"token ids {bad[:5]} are outside the tokenizer's {n} tokens")
    spec = backend_spec(tok)
    kept = sorted(merge_closure(spec, keep))
    new_id = {old: new for new, old in enumerate(kept)}
    model = spec["model"]
    pairs = _pairs(model)
    model["vocab"] = {p: new_id[i] for p, i in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if i in new_id}
    pieces = model["vocab"]
    model["merges"] = [m for m, (a, b) in zip(model.get("merges", []), pairs)
                       if a in pieces and b in pieces and _result(model, a, b) in pieces]
    spec["added_tokens"] = [{**t, "id": new_id[t["id"]]} for t in spec.get("added_tokens") or []]
    _remap_post_processor(spec.get("post_processor"), new_id)
    if spec.get("padding") and "pad_id" in spec["padding"]:
        spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_id"]]
    settings: dict[str, Any] = {name: str(v) for name in _SPECIAL_NAMES if (v := getattr(tok, name, None))}
    settings.update({k: tok.init_kwargs[k] for k in ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces",
                                                      "split_special_tokens") if k in tok.init_kwargs})
    new = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), chat_template=tok.chat_template,
        extra_special_tokens=[str(t) for t in getattr(tok, "extra_special_tokens", None) or []],
        model_max_length=tok.model_max_length, padding_side=tok.padding_side, truncation_side=tok.truncation_side,
        **settings)
    # The guarantee rests on this: every kept id has the same piece, the special tokens follow their ids.
    if len(new) != len(kept) or new.convert_ids_to_tokens(list(range(len(kept)))) != tok.convert_ids_to_tokens(kept):
        raise VocabTrimError("vocabulary trimming: the rebuilt tokenizer does not number the kept tokens in order "
                             "(an added token between vocabulary ids?); build without --trim-vocab")
    for name in _SPECIAL_NAMES:
        old = getattr(tok, f"{name}_id", None)
        if old is not None and getattr(new, f"{name}_id", None) != new_id[old]:
            raise VocabTrimError(f"vocabulary trimming: {name} moved to another id")
    return new, kept


def model_token_ids(model) -> set[int]:
    """The token ids the model's config and generation config name (bos, eos (a list too), pad, ...)."""
    out: set[int] = set()
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for key in _TOKEN_ID_KEYS:
            v = getattr(cfg, key, None) if cfg is not None else None
            out.update(x for x in (v if isinstance(v, list) else [v]) if isinstance(x, int))
    return out


def embedding_parameters(model) -> int:
    """Parameters in the input embedding and the output head (counted once when tied)."""
    params = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
              for p in m.parameters()}
    return sum(p.numel() for p in params.values())


def trim_model(model, kept_old_ids: list[int]):
    """Keep the embedding rows and head rows of ``kept_old_ids`` (in that order), in place; tied weights stay
    tied; config.vocab_size and the config's token ids follow. Returns the model."""
    import torch

    new_id = {old: new for new, old in enumerate(kept_old_ids)}
    rows = torch.tensor(kept_old_ids, dtype=torch.long)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if rows.numel() == 0 or int(rows.max()) >= emb.weight.shape[0]:
        raise VocabTrimError(f"kept token ids reach beyond the embedding's {emb.weight.shape[0]} rows")
    if missing := sorted(model_token_ids(model) - set(new_id)):
        raise VocabTrimError(f"the model config names token ids {missing} that the trimmed vocabulary drops")
    tied = head is not None and head.weight is emb.weight
    with torch.no_grad():
        # The modules stay (a Gemma-style scaled embedding keeps its scale); only the rows change.
        emb.weight = torch.nn.Parameter(emb.weight[rows].clone(), requires_grad=emb.weight.requires_grad)
        emb.num_embeddings = len(kept_old_ids)
        if getattr(emb, "padding_idx", None) is not None:
            emb.padding_idx = new_id.get(emb.padding_idx)
        if head is not None:
            head.weight = emb.weight if tied else torch.nn.Parameter(head.weight[rows].clone(),
                                                                     requires_grad=head.weight.requires_grad)
            if getattr(head, "bias", None) is not None:
                head.bias = torch.nn.Parameter(head.bias[rows].clone(), requires_grad=head.bias.requires_grad)
            head.out_features = len(kept_old_ids)
    for m in {id(m): m for m in (model, model.base_model)}.values():
        if isinstance(getattr(m, "vocab_size", None), int):
            m.vocab_size = len(kept_old_ids)
    model.config.vocab_size = len(kept_old_ids)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for key in _TOKEN_ID_KEYS:
            v = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(v, int):
                setattr(cfg, key, new_id[v])
            elif isinstance(v, list):
                setattr(cfg, key, [new_id[x] for x in v])
    return model


def write_vocab_map(folder: str | Path, kept_teacher_ids: list[int], teacher_vocab_size: int,
                    **extra: Any) -> Path:
    """Write the student -> teacher id map (student id i is teacher id ``kept_teacher_ids[i]``)."""
    path = Path(folder) / VOCAB_MAP_NAME
    atomic_write_json(path, {"format": 1, "teacher_vocab_size": int(teacher_vocab_size),
                             "kept_teacher_ids": [int(i) for i in kept_teacher_ids], **extra})
    return path


def vocab_map_file(folder: str | Path) -> Path | None:
    """A trimmed student folder's vocabulary map file (the one its meta.json declares, else the default name), or
    None when there is none."""
    path = product(folder, "vocab_map") or Path(folder) / VOCAB_MAP_NAME
    return path if path.is_file() else None


def read_vocab_map(folder: str | Path) -> list[int] | None:
    """The kept teacher ids of a trimmed student folder, or None when its vocabulary is the teacher's."""
    path = vocab_map_file(folder)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        kept, size = data["kept_teacher_ids"], data["teacher_vocab_size"]
        ok = data.get("format") == 1 and all(isinstance(i, int) for i in kept) and \
            all(0 <= a < b for a, b in zip(kept, kept[1:])) and (not kept or kept[-1] < size)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise VocabTrimError(f"{path}: unreadable vocabulary map ({e}); rebuild the student") from None
    if not ok:
        raise VocabTrimError(f"{path}: not a format-1 vocabulary map with increasing teacher ids; rebuild the student")
    return kept


def trimmed_from(student_path: str, teacher_tok, student_tok):
    """The kept teacher ids (K,) of a student trimmed from this teacher's vocabulary (its folder's vocabulary map,
    or for a GGUF file the map beside it, names them, and their strings are the student's tokens), else None."""
    import torch

    path = Path(student_path)
    # A GGUF file exported from a trimmed folder has the map beside it (the export stage copies it there).
    folder = path if path.is_dir() else path.parent if path.suffix.lower() == ".gguf" and path.is_file() else None
    kept = read_vocab_map(folder) if folder is not None else None
    if kept is None or len(kept) != len(student_tok) or max(kept, default=0) >= len(teacher_tok):
        return None
    if teacher_tok.convert_ids_to_tokens(kept) != student_tok.convert_ids_to_tokens(list(range(len(kept)))):
        return None  # trimmed from another teacher: the general cross-tokenizer path applies
    return torch.tensor(kept, dtype=torch.long)


def same_vocabulary(teacher_tok, student_tok) -> bool:
    """Whether two tokenizers have the same vocabulary (token -> id)."""
    return teacher_tok.get_vocab() == student_tok.get_vocab()


def vocab_map_teacher_vocab(folder: str | Path) -> str | None:
    """The hash of the teacher vocabulary a trimmed student was cut from (``teacher_vocab_sha256`` in its map,
    softlabels.format.tokenizer_fingerprint's), or None (no map, or one written before it was recorded)."""
    path = vocab_map_file(folder)
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("teacher_vocab_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def trimmed_from_cache(student_path: str, cache, student_tok):
    """The kept teacher ids (K,) of a student trimmed from the teacher whose soft-label ``cache`` this is: its map
    names the cache's vocabulary (size and hash) and the student's tokens; else None."""
    import torch

    if not Path(student_path).is_dir():
        return None
    kept = read_vocab_map(student_path)
    m = cache.manifest
    if kept is None or len(kept) != len(student_tok) or max(kept, default=0) >= m.vocab_size:
        return None
    if vocab_map_teacher_vocab(student_path) != m.tokenizer.vocab_sha256:
        return None
    return torch.tensor(kept, dtype=torch.long)
