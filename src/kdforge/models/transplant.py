"""Vocabulary transplant: give a student a new (usually smaller) tokenizer, its embeddings initialised
from the teacher's.

1. :func:`train_tokenizer` trains a tokenizer of the same kind as the base one (same normalizer,
   pre-tokenizer, decoder, post-processor, special tokens and chat template) on texts such as the
   training conversations rendered with the chat template (:func:`conversation_texts`), so the
   template's own text is learned too.
2. :func:`transplant_vocabulary` swaps the model's embedding (and an untied output head) for rows
   built from the old ones. Two tokenizers agree only on bytes (:mod:`kdforge.models.token_bytes`), so
   each new token is matched through its bytes: an old token with exactly those bytes gives its row;
   otherwise the old tokenizer's tokens for that text give the mean of their rows. Control tokens
   (no bytes) are matched by string or role (bos, eos, pad, unk, end of turn).

The student is then trained with the cross-tokenizer losses (kdforge.distill.cross_tokenizer), which
need no shared vocabulary; the transplant only makes its start better than random rows.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from kdforge.data.chat import END_OF_TURN_MARKERS, render
from kdforge.errors import UserError
from kdforge.models.token_bytes import (
    SPIECE_SPACE,
    TokenBytesError,
    backend_spec,
    byte_level_alphabet,
    encoding_kind,
    text_of,
    token_bytes,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Reserved placeholder tokens that stand for nothing yet (Gemma's 6,242 <unusedN>, Llama 3's
# <|reserved_special_token_N|>, BERT's [unusedN]). A new small vocabulary has no room to waste on them.
PLACEHOLDER = re.compile(r"^(<unused\d+>|<\|reserved_special_token_\d+\|>|\[unused\d+\])$")
_NAMED = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TransplantError(UserError):
    """A tokenizer or request the transplant cannot handle; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# Training a tokenizer


def conversation_texts(tok: PreTrainedTokenizerBase, conversations: Iterable[Any]) -> list[str]:
    """Each conversation (a Conversation with ``.messages`` or a message list) rendered with ``tok``'s
    chat template: the texts to train a tokenizer on, template tokens included."""
    return [render(tok, list(getattr(conv, "messages", conv))) for conv in conversations]


def _kept_specials(base_tok, spec: dict, keep_placeholders: bool) -> list[dict]:
    """The base's special added tokens, in id order, without unreferenced placeholders."""
    named = {str(v) for name in _NAMED if (v := getattr(base_tok, name, None))}
    named |= {str(t) for t in getattr(base_tok, "extra_special_tokens", None) or []}
    template = base_tok.chat_template if isinstance(base_tok.chat_template, str) else json.dumps(base_tok.chat_template)
    kept = []
    for added in sorted(spec.get("added_tokens") or [], key=lambda a: a["id"]):
        content = added["content"]
        if not added.get("special"):
            continue  # a non-special added token (Gemma's "\n\n") is ordinary text: learned if frequent
        if (not keep_placeholders and PLACEHOLDER.match(content) and content not in named
                and content not in (template or "")):
            continue
        kept.append({k: added[k] for k in ("content", "single_word", "lstrip", "rstrip", "normalized") if k in added})
    unk = spec["model"].get("unk_token")
    if unk and unk not in {a["content"] for a in kept}:
        kept.append({"content": unk, "normalized": False})  # the BPE model emits it: it must have an id
    return kept


def _remap_post_processor(proc: dict | None, id_of: dict[str, int]) -> None:
    """Point the special tokens a post-processor inserts (TemplateProcessing, Bert/Roberta, Sequence) at
    their ids in the new vocabulary (the tokens are named by string, the ids are stale)."""
    if not proc:
        return
    for sub in proc.get("processors") or []:
        _remap_post_processor(sub, id_of)
    try:
        for entry in (proc.get("special_tokens") or {}).values():
            entry["ids"] = [id_of[t] for t in entry.get("tokens", [])]
        for key in ("sep", "cls"):
            if isinstance(proc.get(key), list) and len(proc[key]) == 2:
                proc[key][1] = id_of[proc[key][0]]
    except KeyError as e:
        raise TransplantError(f"the tokenizer's post-processor inserts {e}, which the new tokenizer lacks "
                              "(a dropped placeholder? pass keep_placeholders=True)") from None


def _train(spec: dict, texts: list[str], specials: list[dict], kind: str, vocab_size: int,
           limit_alphabet: int | None):
    from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers, trainers

    train = copy.deepcopy(spec)
    train.update(added_tokens=[], post_processor=None, padding=None, truncation=None)
    train["model"].update(vocab={}, merges=[])
    tok = Tokenizer.from_str(json.dumps(train))
    if kind == "sentencepiece" and SPIECE_SPACE in json.dumps(spec.get("normalizer"), ensure_ascii=False):
        # The normalizer turns spaces into ▁ before the pre-tokenizer (Gemma's Split(" ") then never
        # splits): without a split each text would be one word and merges would learn whole phrases.
        # SentencePiece pieces do not cross a word start, so split before each ▁-run for training only.
        split = pre_tokenizers.Split(Regex(f"{SPIECE_SPACE}*[^{SPIECE_SPACE}]+|{SPIECE_SPACE}+"), "isolated")
        tok.pre_tokenizer = split if tok.pre_tokenizer is None else pre_tokenizers.Sequence([tok.pre_tokenizer, split])
    added = [AddedToken(s["content"], single_word=s.get("single_word", False), lstrip=s.get("lstrip", False),
                        rstrip=s.get("rstrip", False), normalized=s.get("normalized", False), special=True)
             for s in specials]
    model = spec["model"]
    kwargs: dict[str, Any] = {}
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key) is not None:
            kwargs[key] = model[key]
    if kind == "byte_level":
        kwargs["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()  # every byte, seen or not
    if limit_alphabet is not None:
        kwargs["limit_alphabet"] = limit_alphabet
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=added, show_progress=False, **kwargs)
    # Training does not cut added tokens out of the texts (encoding does): cut them here, or the template's
    # markers would be learned as merges (<|im_, <|im_sta) that encoding never produces.
    if specials:
        cut = re.compile("|".join(re.escape(s["content"]) for s in sorted(specials, key=lambda s: -len(s["content"]))))
        texts = [part for text in texts for part in cut.split(text) if part]
    tok.train_from_iterator(texts, trainer)
    return json.loads(tok.to_str())


def train_tokenizer(base_tok: PreTrainedTokenizerFast, texts: Iterable[str], vocab_size: int, *,
                    keep_placeholders: bool = False) -> PreTrainedTokenizerFast:
    """A new BPE tokenizer of at most ``vocab_size`` tokens trained on ``texts``, of the same kind as
    ``base_tok``: its normalizer, pre-tokenizer, decoder and post-processor, its special tokens (ids
    0..k-1, in the base's order; reserved placeholders such as Gemma's ``<unusedN>`` dropped unless
    ``keep_placeholders`` or named by the template), its chat template and special-token names.

    Why not ``train_new_from_iterator`` alone: it drops the ``<0xXX>`` pieces of a byte-fallback BPE
    (unseen characters then become ``<unk>``), keeps every placeholder, and learns template markers in
    the texts as merges. Here a byte-level BPE starts from all 256 bytes and a byte-fallback one holds
    all 256 byte pieces (ids k..k+255), so any text encodes without an unknown id.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        spec = backend_spec(base_tok)
        kind = encoding_kind(base_tok)
    except TokenBytesError as e:
        raise TransplantError(f"training a tokenizer: {e}") from None
    if spec["model"].get("type") != "BPE":
        raise TransplantError(f"training a tokenizer supports BPE models (byte-level or SentencePiece-style); the base "
                              f"tokenizer is {spec['model'].get('type')}: give a trained tokenizer instead")
    texts = list(texts)  # iterated more than once when the alphabet must be limited
    if not texts:
        raise TransplantError("training a tokenizer needs texts (the rendered training conversations); got none")
    specials = _kept_specials(base_tok, spec, keep_placeholders)
    byte_fallback = kind == "sentencepiece" and bool(spec["model"].get("byte_fallback"))
    reserved = 256 if byte_fallback else 0
    target = vocab_size - reserved
    byte_tokens = 256 if kind == "byte_level" or byte_fallback else 0
    if vocab_size < len(specials) + byte_tokens + 1:
        raise TransplantError(f"vocab_size {vocab_size} is too small: the {len(specials)} special tokens and "
                              f"{byte_tokens} byte tokens leave no room for learned ones")
    trained = _train(spec, texts, specials, kind, target, None)
    if len(trained["model"]["vocab"]) > target:
        # The trainer keeps every character seen even past vocab_size; keep the most frequent ones (the
        # others fall back to byte pieces or unk, as SentencePiece's character coverage does).
        trained = _train(spec, texts, specials, kind, target, max(1, target - len(specials)))
    model = trained["model"]
    if byte_fallback:
        # Specials keep ids 0..k-1, the 256 byte pieces follow, then the learned pieces; merges name pieces
        # by string, so renumbering leaves them valid.
        order = sorted(model["vocab"], key=model["vocab"].get)
        special_set = {s["content"] for s in specials}
        byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
        taken = special_set | set(byte_pieces)
        pieces = [p for p in order if p in special_set] + byte_pieces + [p for p in order if p not in taken]
        model["vocab"] = {p: i for i, p in enumerate(pieces)}
    id_of = model["vocab"]
    for added in trained["added_tokens"]:
        added["id"] = id_of[added["content"]]
    trained["pre_tokenizer"] = spec.get("pre_tokenizer")  # the training-only ▁ split is not the base's
    trained["post_processor"] = copy.deepcopy(spec.get("post_processor"))
    _remap_post_processor(trained["post_processor"], id_of)

    kept = {s["content"] for s in specials}
    settings: dict[str, Any] = {name: str(v) for name in _NAMED
                                if (v := getattr(base_tok, name, None)) and str(v) in kept}
    settings.update({k: base_tok.init_kwargs[k] for k in ("add_bos_token", "add_eos_token",
                                                           "clean_up_tokenization_spaces", "split_special_tokens")
                     if k in base_tok.init_kwargs})
    new = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(trained)), chat_template=base_tok.chat_template,
        extra_special_tokens=[str(t) for t in getattr(base_tok, "extra_special_tokens", None) or [] if str(t) in kept],
        model_max_length=base_tok.model_max_length, padding_side=base_tok.padding_side,
        truncation_side=base_tok.truncation_side, **settings)
    if len(new) > vocab_size:  # the contract callers size the model by; cheap to check, costly to miss
        raise TransplantError(f"the trained tokenizer has {len(new)} tokens, more than vocab_size {vocab_size}")
    return new


# --------------------------------------------------------------------------------------------------
# Transplanting the embedding


def _roles(tok) -> dict[str, int]:
    """Role -> id in ``tok``: end_of_turn (the first chat end-of-turn marker it has), eos, bos, pad, unk,
    in that order of precedence (SmolLM2's <|im_end|> is eos, pad and end of turn: it is matched as the
    end of turn)."""
    vocab = tok.get_vocab()
    roles = {}
    for marker in END_OF_TURN_MARKERS:
        if marker in vocab:
            roles["end_of_turn"] = vocab[marker]
            break
    for role in ("eos", "bos", "pad", "unk"):
        tid = getattr(tok, f"{role}_token_id", None)
        if isinstance(tid, int):
            roles[role] = tid
    return roles


def _end_of_turn_ids(tok) -> list[int]:
    vocab = tok.get_vocab()
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return ids + [vocab[m] for m in END_OF_TURN_MARKERS if m in vocab and vocab[m] not in ids]


class _OldTokens:
    """The old tokenizer's token ids for a byte string (exactly those bytes, or None)."""

    def __init__(self, tok, table: list[bytes | None]):
        self.tok, self.table = tok, table
        self.kind = encoding_kind(tok)
        self.backend = tok.backend_tokenizer
        self.vocab = tok.get_vocab()
        # A token per single byte: byte-level BPE has all 256, a byte-fallback BPE its <0xAB> pieces.
        self.byte_id: dict[int, int] = {}
        if self.kind == "byte_level":
            for ch, b in byte_level_alphabet().items():
                if ch in self.vocab:
                    self.byte_id[b] = self.vocab[ch]
        for b in range(256):
            if (tid := self.vocab.get(f"<0x{b:02X}>")) is not None and self.table[tid] == bytes([b]):
                self.byte_id.setdefault(b, tid)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _model_level(self, text: str) -> list[int] | None:
        """Tokens of ``text`` from the BPE model alone, skipping normalizer and pre-tokenizer (a normalizer
        that adds a dummy prefix or rewrites text would change the bytes)."""
        if self.kind == "byte_level":
            alphabet = {b: c for c, b in byte_level_alphabet().items()}
            piece = "".join(alphabet[b] for b in text.encode("utf-8"))
        else:
            piece = text.replace(" ", SPIECE_SPACE)
        ids = [t.id for t in self.backend.model.tokenize(piece)]
        return ids if text_of(self.table, ids) == text.encode("utf-8") else None

    def ids_for(self, data: bytes, encoded: list[int] | None) -> list[int] | None:
        """``encoded`` (the tokenizer's encoding of ``data`` as text, when it is valid UTF-8) if it spells
        exactly ``data``; else the data piecewise: its valid UTF-8 runs as text, stray bytes (part of a
        character: a byte-level piece) as the old single-byte tokens."""
        if encoded is not None and text_of(self.table, encoded) == data:
            return encoded
        out: list[int] = []
        # surrogateescape keeps each invalid byte as one lone surrogate U+DC80..U+DCFF
        run = ""
        for ch in data.decode("utf-8", errors="surrogateescape") + "\0":
            if "\udc80" <= ch <= "\udcff" or ch == "\0":
                if run:
                    enc = self.encode_many([run])[0]
                    if text_of(self.table, enc) != run.encode("utf-8"):
                        enc = self._model_level(run)
                    if enc is None:
                        return None
                    out += enc
                    run = ""
                if ch != "\0":
                    if (tid := self.byte_id.get(ord(ch) - 0xDC00)) is None:
                        return None
                    out.append(tid)
            else:
                run += ch
        return out or None


def _source_rows(old_tok, new_tok) -> tuple[list[list[int]], dict[str, Any]]:
    """Per new id: the old ids whose rows it takes (one: a copy; several: their mean; none: the mean of
    all rows), and the counts."""
    old_table, new_table = token_bytes(old_tok), token_bytes(new_tok)
    old = _OldTokens(old_tok, old_table)
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(old_table):
        if b:
            by_bytes.setdefault(b, i)  # the lowest id when several spell the same bytes
    old_vocab, old_roles = old.vocab, _roles(old_tok)
    new_roles: dict[int, str] = {}
    for role, tid in _roles(new_tok).items():
        new_roles.setdefault(tid, role)  # the first (strongest) role of a token with several
    new_pieces = new_tok.convert_ids_to_tokens(list(range(len(new_tok))))

    # One batched call for every new token that spells valid UTF-8 text.
    texts: dict[int, str] = {}
    for j, b in enumerate(new_table):
        if b:
            try:
                texts[j] = b.decode("utf-8")
            except UnicodeDecodeError:
                pass
    encoded = dict(zip(texts, old.encode_many(list(texts.values()))))

    sources: list[list[int]] = []
    stats: dict[str, Any] = {"exact": 0, "mean": 0, "control_by_role": 0, "fallback": 0, "fallback_tokens": []}

    def fallback(j: int) -> None:
        sources.append([])
        stats["fallback"] += 1
        if len(stats["fallback_tokens"]) < 10:
            stats["fallback_tokens"].append(new_pieces[j])

    for j, b in enumerate(new_table):
        if b is None:  # a control token: the same string, else the same role
            piece = new_pieces[j]
            if piece in old_vocab:
                sources.append([old_vocab[piece]])
                stats["exact"] += 1
            elif (role := new_roles.get(j) or ("end_of_turn" if piece in END_OF_TURN_MARKERS else None)) \
                    and role in old_roles:
                sources.append([old_roles[role]])
                stats["control_by_role"] += 1
            else:
                fallback(j)
            continue
        if not b:
            fallback(j)
            continue
        enc = encoded.get(j)
        same = old_vocab.get(new_pieces[j])
        if same is not None and old_table[same] == b:
            sources.append([same])  # the same piece: first, so that the same tokenizer maps each id to itself
            stats["exact"] += 1
        elif enc is not None and len(enc) == 1 and old_table[enc[0]] == b:
            sources.append(enc)  # the token the old tokenizer itself uses for this text
            stats["exact"] += 1
        elif b in by_bytes:
            sources.append([by_bytes[b]])
            stats["exact"] += 1
        elif ids := old.ids_for(b, enc):
            sources.append(ids)
            stats["exact" if len(ids) == 1 else "mean"] += 1
        else:
            fallback(j)
    return sources, stats


def _combine(weight: torch.Tensor, sources: list[list[int]], n_old: int) -> torch.Tensor:
    """New rows from ``weight`` (rows, ...): a copy (exact), the mean of several, or of all ``n_old`` rows."""
    w = weight.detach()[:n_old]
    out = torch.empty((len(sources), *w.shape[1:]), dtype=w.dtype, device=w.device)
    single = [(j, s[0]) for j, s in enumerate(sources) if len(s) == 1]
    if single:
        js, ids = zip(*single)
        out[list(js)] = w[list(ids)]  # bit-exact copies (the same-tokenizer transplant is the identity)
    multi = [(j, s) for j, s in enumerate(sources) if len(s) > 1]
    if multi:
        wf = w.float()
        seg = torch.tensor([k for k, (_, s) in enumerate(multi) for _ in s], device=w.device)
        flat = torch.tensor([i for _, s in multi for i in s], device=w.device)
        sums = torch.zeros((len(multi), *w.shape[1:]), dtype=torch.float32, device=w.device)
        sums.index_add_(0, seg, wf[flat])
        counts = torch.tensor([len(s) for _, s in multi], dtype=torch.float32, device=w.device)
        out[[j for j, _ in multi]] = (sums / counts.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    empty = [j for j, s in enumerate(sources) if not s]
    if empty:
        out[empty] = w.float().mean(0).to(w.dtype)
    return out


def _set_token_ids(config, new_tok, eos_list: list[int], every_end: bool) -> None:
    """bos/pad from the new tokenizer; eos: every end-of-turn id where ``every_end`` (generation_config,
    which stops on any of them, or a config that already held a list), else the tokenizer's eos."""
    if config is None:
        return
    config.bos_token_id = new_tok.bos_token_id
    config.pad_token_id = new_tok.pad_token_id
    if every_end or isinstance(getattr(config, "eos_token_id", None), list):
        config.eos_token_id = eos_list if len(eos_list) > 1 else (eos_list[0] if eos_list else None)
    else:
        config.eos_token_id = new_tok.eos_token_id


@torch.no_grad()
def transplant_vocabulary(model: PreTrainedModel, old_tok: PreTrainedTokenizerFast,
                          new_tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Replace ``model``'s input embedding (and output head, unless tied: tied weights stay tied) with
    rows for ``new_tok``'s tokens built from ``old_tok``'s rows (see the module doc); update
    ``config.vocab_size`` and the bos/eos/pad ids in config and generation_config. In place; returns
    counts: ``exact`` copies, ``mean`` rows, ``control_by_role``, ``fallback`` (mean of all rows) with
    up to 10 ``fallback_tokens``, ``old_vocab``, ``new_vocab``, ``tied``."""
    try:
        sources, stats = _source_rows(old_tok, new_tok)
    except TokenBytesError as e:
        raise TransplantError(f"vocabulary transplant: {e}") from None
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    n_old = min(len(old_tok), emb.weight.shape[0])  # rows past the tokenizer (padding to a multiple) are no token's
    n_new = len(new_tok)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    old_size = text_config.vocab_size

    emb.weight = torch.nn.Parameter(_combine(emb.weight, sources, n_old), requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = n_new
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = new_tok.pad_token_id
    if head is not None:
        if tied:
            head.weight = emb.weight
        else:
            head.weight = torch.nn.Parameter(_combine(head.weight, sources, n_old),
                                             requires_grad=head.weight.requires_grad)
            if getattr(head, "bias", None) is not None:
                head.bias = torch.nn.Parameter(_combine(head.bias, sources, n_old),
                                               requires_grad=head.bias.requires_grad)
        if hasattr(head, "out_features"):
            head.out_features = n_new
    # Models keep their own copy of the size (Gemma 3's loss reads it).
    for module in model.modules():
        if getattr(module, "vocab_size", None) == old_size and isinstance(module.vocab_size, int):
            module.vocab_size = n_new
    text_config.vocab_size = n_new
    if text_config is not model.config and hasattr(model.config, "vocab_size"):
        model.config.vocab_size = n_new
    eos_list = _end_of_turn_ids(new_tok)
    _set_token_ids(model.config, new_tok, eos_list, every_end=False)
    if text_config is not model.config:
        _set_token_ids(text_config, new_tok, eos_list, every_end=False)
    _set_token_ids(getattr(model, "generation_config", None), new_tok, eos_list, every_end=True)
    stats.update(old_vocab=n_old, new_vocab=n_new, tied=tied)
    return stats
