"""Teacher and student with different tokenizers: aligning their tokens of the same text.

Both models are trained and scored on the same conversations, but each cuts the answer into its own
tokens. The only thing they share is the bytes. Each side's target tokens (assistant content and the
end-of-turn token) are spelled out as bytes (kdforge.models.token_bytes; a control token such as
``<|im_end|>`` or ``<end_of_turn>`` spells one SENTINEL byte, so the two ends of a turn meet), and the two
byte strings are matched (difflib: the same text normally matches in one block; a template that adds or
trims characters on one side leaves only those bytes unmatched). A **span** is a run of matched bytes
between two positions where *both* sides have a token boundary: the smallest pieces of text on which the
two tokenisations agree. Example (docs/cross-tokenizer.md has the full sentence):

    text      " 北京"  = 20 e5 8c 97 e4 ba ac
    student   [20 e5 8c] [97] [e4 ba ac]       (byte-level BPE splits 北 inside its UTF-8 bytes)
    teacher   [20] [e5 8c 97] [e4 ba ac]       (SentencePiece: ▁, then one piece per character)
    spans     [20 e5 8c 97] = student tokens 0-1, teacher tokens 0-1;  [e4 ba ac] = token 2 on each side

A span's probability on each side is the product of its tokens' probabilities (kdforge.distill.cross_losses
turns the first token's distribution into a distribution over "the span starts with v and continues as
written"). Tokens outside every span (unmatched bytes, or past the shorter side's truncation) get no soft
loss; the student's hard-label CE covers all of its targets as usual.
"""

from __future__ import annotations

import difflib
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import torch

SENTINEL = b"\xff"  # what a control token spells: never part of UTF-8 text


@dataclass(frozen=True)
class Span:
    """Student target tokens [s0, s1) and teacher target tokens [t0, t1) spell the same bytes."""

    s0: int
    s1: int
    t0: int
    t1: int


def spelled(table: list[bytes | None], ids: list[int]) -> list[bytes]:
    """Each token's bytes, a control token as SENTINEL."""
    return [SENTINEL if table[i] is None else table[i] for i in ids]


def _ends(pieces: list[bytes]) -> list[int]:
    out, pos = [], 0
    for p in pieces:
        pos += len(p)
        out.append(pos)
    return out


def align(s_pieces: list[bytes], t_pieces: list[bytes]) -> list[Span]:
    """The spans of two tokenisations (lists of each token's bytes) of (mostly) the same text, in order."""
    s_text, t_text = b"".join(s_pieces), b"".join(t_pieces)
    s_ends, t_ends = _ends(s_pieces), _ends(t_pieces)
    if s_text == t_text:
        blocks = [(0, 0, len(s_text))]
    else:
        blocks = [(m.a, m.b, m.size) for m in difflib.SequenceMatcher(None, s_text, t_text, autojunk=False)
                  .get_matching_blocks() if m.size]
    s_bounds, t_bounds = [0, *s_ends], {0, *t_ends}  # byte positions where a token starts or ends
    spans: list[Span] = []
    for a, b, n in blocks:
        # Positions inside the block (ends included) where both sides have a token boundary.
        lo, hi = bisect_left(s_bounds, a), bisect_right(s_bounds, a + n)
        common = sorted({p for p in s_bounds[lo:hi] if p - a + b in t_bounds})
        for x, y in zip(common, common[1:]):
            spans.append(Span(bisect_right(s_ends, x), bisect_right(s_ends, y),
                              bisect_right(t_ends, x - a + b), bisect_right(t_ends, y - a + b)))
    return spans


@dataclass
class SpanIndex:
    """One micro-batch's spans as flat index tensors over its target rows (student: N_s, teacher: N_t).

    Row r of a side is its r-th target token in the trainer's order (batch row by batch row).
    """

    s_first: torch.Tensor      # (M,) student row of each span's first token
    t_first: torch.Tensor      # (M,) teacher row of each span's first token
    s_later: torch.Tensor      # (Ls,) student rows that continue a span
    s_later_span: torch.Tensor  # (Ls,) the span each continues
    t_later: torch.Tensor      # (Lt,)
    t_later_span: torch.Tensor  # (Lt,)
    s_end: torch.Tensor        # (M,) one past each span's last student row (chunks cut only there)

    def __len__(self) -> int:
        return self.s_first.numel()

    @property
    def aligned_tokens(self) -> int:
        return int(self.s_first.numel() + self.s_later.numel())

    def to(self, device) -> SpanIndex:
        return SpanIndex(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def spans_in(self, r0: int, r1: int) -> tuple[int, int]:
        """The spans [m0, m1) whose first student row lies in rows [r0, r1)."""
        return (int(torch.searchsorted(self.s_first, r0)), int(torch.searchsorted(self.s_first, r1)))

    def cuts(self, n_rows: int, size: int) -> list[int]:
        """Row boundaries about ``size`` apart that never fall inside a span (chunked losses need whole spans)."""
        inside = torch.zeros(n_rows + 1, dtype=torch.bool)
        for f, e in zip(self.s_first.tolist(), self.s_end.tolist()):
            inside[f + 1:e] = True  # a cut at these rows would split the span
        cuts, pos = [0], 0
        while pos < n_rows:
            nxt = min(pos + max(size, 1), n_rows)
            while nxt < n_rows and inside[nxt]:
                nxt += 1
            cuts.append(nxt)
            pos = nxt
        return cuts


def span_index(per_example: list[list[Span]], s_counts: list[int], t_counts: list[int]) -> SpanIndex:
    """Flat index tensors for a micro-batch from each example's spans and its target counts per side."""
    sf, tf, sl, sls, tl, tls, se = [], [], [], [], [], [], []
    s_off = t_off = 0
    for spans, ns, nt in zip(per_example, s_counts, t_counts):
        for sp in spans:
            if sp.s1 > ns or sp.t1 > nt:
                continue  # past this side's truncation
            m = len(sf)
            sf.append(s_off + sp.s0)
            tf.append(t_off + sp.t0)
            se.append(s_off + sp.s1)
            sl += range(s_off + sp.s0 + 1, s_off + sp.s1)
            sls += [m] * (sp.s1 - sp.s0 - 1)
            tl += range(t_off + sp.t0 + 1, t_off + sp.t1)
            tls += [m] * (sp.t1 - sp.t0 - 1)
        s_off += ns
        t_off += nt
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return SpanIndex(t(sf), t(tf), t(sl), t(sls), t(tl), t(tls), t(se))


@dataclass(frozen=True)
class SharedVocab:
    """Vocabulary entries that spell identical bytes in both tokenizers (GOLD's idea): teacher id -> student id."""

    t2s: torch.Tensor        # (V_t,) the student id spelling the same bytes, -1 where none does
    s_unmapped: torch.Tensor  # (V_s,) bool: student ids no teacher id maps to
    prefix: torch.Tensor | None = None  # (V_t,) t2s where shared, else the longest student prefix (or -1)

    @property
    def size(self) -> int:
        return int((self.t2s >= 0).sum())

    def mapping(self, unshared: str = "uld") -> tuple[torch.Tensor, torch.Tensor]:
        """(t2s, s_unmapped) of the hybrid's ``unshared`` mode: map_prefix maps unshared teacher ids to their
        longest student prefix (several teacher ids may then share a student id), the others the shared ids."""
        if unshared != "map_prefix":
            return self.t2s, self.s_unmapped
        if self.prefix is None:
            raise ValueError("this SharedVocab has no prefix map (build it with shared_vocab)")
        s_unmapped = torch.ones_like(self.s_unmapped)
        s_unmapped[self.prefix[self.prefix >= 0]] = False
        return self.prefix, s_unmapped


def shared_vocab(t_table: list[bytes | None], s_table: list[bytes | None], t_end: list[int],
                 s_end: list[int], t_control: dict[str, int] | None = None,
                 s_control: dict[str, int] | None = None) -> SharedVocab:
    """Map teacher ids to student ids with the same bytes, one to one (the lowest teacher id wins); the first
    end-of-turn id of each side (``t_end``, ``s_end``) map to each other, and control tokens of the same name
    (``t_control``/``s_control``: name -> id, e.g. both have ``<|im_start|>``) too. Other control tokens map to
    nothing."""
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(s_table):
        if b is not None and b not in by_bytes:
            by_bytes[b] = i
    t2s = torch.full((len(t_table),), -1, dtype=torch.long)
    taken: set[int] = set()  # one teacher id per student id: a bin's student probability is counted once
    if t_end and s_end:
        t2s[t_end[0]] = s_end[0]
        taken.add(s_end[0])
    for name, i in (t_control or {}).items():
        j = (s_control or {}).get(name)
        if j is not None and j not in taken and t2s[i] < 0:
            t2s[i] = j
            taken.add(j)
    for i, b in enumerate(t_table):
        j = by_bytes.get(b) if b is not None else None
        if j is not None and j not in taken and t2s[i] < 0:
            t2s[i] = j
            taken.add(j)
    s_unmapped = torch.ones(len(s_table), dtype=torch.bool)
    s_unmapped[t2s[t2s >= 0]] = False
    return SharedVocab(t2s, s_unmapped, prefix_map(t_table, by_bytes, t2s))


def prefix_map(t_table: list[bytes | None], by_bytes: dict[bytes, int], t2s: torch.Tensor) -> torch.Tensor:
    """Each teacher id -> its shared student id, or for an unshared one the student id spelling the longest
    prefix of its bytes (the teacher token " Paris" -> " Par" when the student has no " Paris": the student
    starts that text with it); -1 for a control token or text no student token begins. ``by_bytes``: a student
    token's bytes -> its (lowest) id."""
    out = t2s.clone()
    for i in (t2s < 0).nonzero()[:, 0].tolist():
        b = t_table[i]
        for n in range(len(b) if b else 0, 0, -1):
            j = by_bytes.get(b[:n])
            if j is not None:
                out[i] = j
                break
    return out
