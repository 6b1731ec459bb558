"""Every stage x strategy x precision on the given devices: the memory per device, what fits, the recommendation.

Teacher stages (generate, label) place the teacher whole on each device (replicated, data-parallel
by whole shards) or mapped by layers across a group of devices (``device_map``), one copy per group.
Distillation trains the student in full with AdamW: single device, DDP, FSDP (full shard), ZeRO-3
and ZeRO-3 with the optimizer offloaded to host memory, each with and without activation
checkpointing; from the label cache, or online with the teacher in the same processes (replicated
at a precision, or sharded in bf16 like the student).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kdforge.planning import memory as mem
from kdforge.planning.architecture import Architecture, billions


@dataclass(frozen=True)
class Workload:
    conversations: int
    max_length: int        # tokens per conversation (prompt + answer), at most
    answer_tokens: int     # assistant (target) tokens per conversation
    batch_size: int        # distill: conversations per micro-batch per device
    global_batch: int      # distill: conversations per optimizer step, all devices
    teacher_batch: int     # generate/label: sequences per forward
    top_k: int
    chunk_size: int
    hidden_layers: int = 0  # teacher layers whose hidden states the cache keeps

    @property
    def prompt_tokens(self) -> int:
        return max(1, self.max_length - self.answer_tokens)

    @property
    def targets(self) -> int:
        return self.conversations * self.answer_tokens

    @property
    def tokens(self) -> int:
        return self.conversations * self.max_length


@dataclass(frozen=True)
class Row:
    stage: str                    # generate | label | distill | distill-online
    strategy: str                 # replicated | mapped | single | ddp | fsdp | zero3 | zero3-offload
    devices: int                  # devices one teacher copy spans (teacher stages) or the world size (distill)
    precision: str                # the teacher's (teacher stages, online teacher) or the student's compute
    batch: int
    parts: dict[str, int]         # bytes per device, by component
    usable: int
    max_batch: int                # the largest batch (micro-batch for distill) that fits
    replicas: int = 1             # teacher copies working in parallel (teacher stages)
    checkpointing: bool | None = None
    teacher: str | None = None    # distill-online: the teacher's placement
    host: int = 0                 # host memory the plan needs besides (ZeRO-Offload's optimizer)
    host_usable: int | None = None

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        host_ok = self.host_usable is None or self.host <= self.host_usable
        return self.total <= self.usable and host_ok

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "strategy": self.strategy, "devices": self.devices,
                "precision": self.precision, "batch": self.batch, "replicas": self.replicas,
                "checkpointing": self.checkpointing, "teacher": self.teacher, "parts": self.parts,
                "per_device": self.total, "host": self.host, "fits": self.fits, "max_batch": self.max_batch}


def group_sizes(count: int) -> list[int]:
    """Devices per teacher copy: the divisors of the device count (a group size that leaves devices idle
    is never better than the divisor below it)."""
    return [n for n in range(1, count + 1) if count % n == 0]


def _elem(precision: str) -> int:
    """Bytes of an activation at a teacher precision (int8/4-bit compute in bf16)."""
    return 4 if precision == "fp32" else 2


def generate_parts(t: Architecture, wl: Workload, precision: str, n: int, batch: int) -> dict[str, int]:
    e = _elem(precision)
    return {"weights": mem.mapped_weight_bytes(t, precision, n),
            "kv_cache": mem.kv_cache_bytes(t, wl.max_length, batch, e, mem.mapped_layers(t, n)),
            "working": mem.forward_working_bytes(t, batch * wl.prompt_tokens, e) + mem.sampling_logits_bytes(t, batch)}


def label_parts(t: Architecture, wl: Workload, precision: str, n: int, batch: int) -> dict[str, int]:
    e = _elem(precision)
    parts = {"weights": mem.mapped_weight_bytes(t, precision, n),
             "working": mem.forward_working_bytes(t, batch * wl.max_length, e),
             "logits": mem.label_logits_bytes(t, batch * wl.answer_tokens, e)}
    if wl.hidden_layers:
        parts["hidden"] = wl.hidden_layers * batch * wl.max_length * t.hidden_size * e
    return parts


def teacher_rows(t: Architecture, hw: mem.Hardware, wl: Workload, stage: str) -> list[Row]:
    fn = generate_parts if stage == "generate" else label_parts
    rows = []
    for precision in mem.TEACHER_PRECISIONS[hw.kind]:
        for n in group_sizes(hw.count):
            def need(b, p=precision, n=n):
                return sum(fn(t, wl, p, n, b).values())
            rows.append(Row(stage, "replicated" if n == 1 else "mapped", n, precision, wl.teacher_batch,
                            fn(t, wl, precision, n, wl.teacher_batch), hw.usable, mem.max_batch(need, hw.usable),
                            replicas=hw.count // n))
    return rows


def strategies(hw: mem.Hardware) -> list[str]:
    if hw.kind == "cpu":
        return ["single"]
    if hw.count == 1:
        return ["single", "zero3-offload"]
    return ["single", "ddp", "fsdp", "zero3", "zero3-offload"]


def compute_mode(hw: mem.Hardware, strategy: str) -> str:
    """How the student computes (kdforge.planning.memory): fp32 on a CPU; on a GPU bf16 autocast over fp32
    weights on one device and under DDP, bf16 gathered weights under FSDP2's bf16 policy and DeepSpeed."""
    if hw.kind == "cpu":
        return mem.FP32
    return mem.AUTOCAST if strategy in ("single", "ddp") else mem.BF16


PRECISION_NAMES = {mem.FP32: "fp32", mem.AUTOCAST: "bf16 mixed", mem.BF16: "bf16 params, fp32 master"}


def student_parts(s: Architecture, hw: mem.Hardware, wl: Workload, strategy: str, checkpointing: bool,
                  batch: int) -> tuple[dict[str, int], int]:
    """(bytes per device by component, host bytes) of training the student in full."""
    w = 1 if strategy == "single" else hw.count
    p = s.params
    compute = compute_mode(hw, strategy)
    host = 0
    # autocast's bf16 casts of the layers' weights; a CPU trains in fp32 and bf16 weights need no cast
    copy = mem.compute_copy_bytes(s) if compute == mem.AUTOCAST else 0
    if strategy in ("single", "ddp"):
        parts = mem.training_state(p) | {"compute_copy": copy}
        if strategy == "ddp":
            parts |= {"buckets": p * mem.DDP_BUCKETS, "head_grad": mem.head_grad_bytes(s)}
    elif strategy == "fsdp":
        parts = mem.training_state(p, w) | {"compute_copy": copy, "gathered": mem.fsdp_gathered(s),
                                            "head_grad": mem.head_grad_bytes(s)}
    elif strategy == "zero3":
        parts = mem.training_state(p, w) | {"gathered": mem.zero3_gathered(s), "head_grad": mem.head_grad_bytes(s)}
    else:  # zero3-offload: bf16 weight and gradient shards stay on the device, the optimizer on the host
        parts = {"weights": math.ceil(2 * p / w), "gradients": math.ceil(2 * p / w), "adam": 0,
                 "gathered": mem.zero3_gathered(s), "head_grad": mem.head_grad_bytes(s)}
        host = sum(mem.training_state(p).values())  # fp32 master, fp32 gradients, moments: every rank's shard
    parts["activations"] = mem.activation_bytes(s, batch * wl.max_length, checkpointing, compute)
    parts["logits"] = mem.logits_chunk_bytes(s, batch * wl.answer_tokens, wl.chunk_size)
    return parts, host


def student_rows(s: Architecture, hw: mem.Hardware, wl: Workload) -> list[Row]:
    rows = []
    for strategy in strategies(hw):
        for ckpt in (False, True):
            parts, host = student_parts(s, hw, wl, strategy, ckpt, wl.batch_size)

            def need(b, st=strategy, c=ckpt):
                return sum(student_parts(s, hw, wl, st, c, b)[0].values())
            rows.append(Row("distill", strategy, 1 if strategy == "single" else hw.count,
                            PRECISION_NAMES[compute_mode(hw, strategy)], wl.batch_size, parts, hw.usable,
                            mem.max_batch(need, hw.usable), checkpointing=ckpt, host=host, host_usable=hw.host_usable))
    return rows


def teacher_placements(hw: mem.Hardware, strategy: str) -> list[tuple[str, str]]:
    """(placement, precision) of a live teacher next to the student."""
    out = [("replicated", p) for p in mem.TEACHER_PRECISIONS[hw.kind]]
    if strategy != "single" and hw.count > 1:
        out.append(("sharded", "bf16"))  # FSDP forward-only / ZeRO-3 inference over the same ranks
    return out


def online_teacher_parts(t: Architecture, hw: mem.Hardware, wl: Workload, placement: str, precision: str,
                         batch: int) -> dict[str, int]:
    e = _elem(precision)
    if placement == "sharded":
        # FSDP2, forward only: 1/N of the layers, two layers gathered, and the root (embeddings, head),
        # which FSDP2 keeps gathered after the forward of a root unit
        layer = mem.layer_weight_bytes(t, precision)
        root = sum(mem.edge_weight_bytes(t, precision))
        weights = math.ceil(t.num_hidden_layers * layer / hw.count) + 2 * layer + root
    else:
        weights = mem.weight_bytes(t, precision)
    # The dense teacher signal at the micro-batch's targets stays alive for the whole loss.
    working = (mem.forward_working_bytes(t, batch * wl.max_length, e)
               + batch * wl.answer_tokens * t.vocab_size * e)
    return {"teacher": weights, "teacher_working": working}


def online_rows(t: Architecture, s: Architecture, hw: mem.Hardware, wl: Workload) -> list[Row]:
    rows = []
    for strategy in strategies(hw):
        for placement, precision in teacher_placements(hw, strategy):
            for ckpt in (False, True):
                def need(b, st=strategy, c=ckpt, pl=placement, pr=precision):
                    return (sum(student_parts(s, hw, wl, st, c, b)[0].values())
                            + sum(online_teacher_parts(t, hw, wl, pl, pr, b).values()))
                parts, host = student_parts(s, hw, wl, strategy, ckpt, wl.batch_size)
                parts |= online_teacher_parts(t, hw, wl, placement, precision, wl.batch_size)
                rows.append(Row("distill-online", strategy, 1 if strategy == "single" else hw.count,
                                PRECISION_NAMES[compute_mode(hw, strategy)], wl.batch_size, parts, hw.usable,
                                mem.max_batch(need, hw.usable), checkpointing=ckpt,
                                teacher=f"{precision} {placement}", host=host, host_usable=hw.host_usable))
    return rows


# --- the recommendation --------------------------------------------------------------------------------

@dataclass
class Recommendation:
    text: str
    teacher: dict[str, Any] | None = None
    distill: dict[str, Any] | None = None
    online: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def choose_teacher(rows: list[Row], wl: Workload, hw: mem.Hardware) -> tuple[Row, Row] | None:
    """(generate row, label row) of one placement: the first precision (bf16 on GPU, fp32 on CPU: exact
    labels) where both stages fit; among its group sizes the one with the most sequences in flight
    (copies x batch), then the fewest devices per copy."""
    by = {(r.stage, r.precision, r.devices): r for r in rows}
    for precision in mem.TEACHER_PRECISIONS[hw.kind]:
        best, score = None, -1
        for n in group_sizes(hw.count):
            g, lab = by[("generate", precision, n)], by[("label", precision, n)]
            if g.max_batch < 1 or lab.max_batch < 1:
                continue
            s = (hw.count // n) * min(wl.teacher_batch, g.max_batch, lab.max_batch)
            if s > score:
                best, score = (g, lab), s
        if best:
            return best
    return None


DISTILL_ORDER = [("ddp", False), ("fsdp", False), ("ddp", True), ("fsdp", True), ("zero3", False),
                 ("zero3", True), ("zero3-offload", False), ("zero3-offload", True)]


# A plan without activation checkpointing is chosen only with this share of the usable memory left over:
# its activations are the largest term, and kernels' transient buffers come on top of them.
NO_CKPT_HEADROOM = 0.10


def _acceptable(r: Row) -> bool:
    return r.fits and (r.checkpointing or r.total <= (1 - NO_CKPT_HEADROOM) * r.usable)


def choose_distill(rows: list[Row], hw: mem.Hardware) -> Row | None:
    """The first plan that fits, fastest first: no sharding over sharding, no recomputation over
    recomputation (with 10% to spare), FSDP (native) before ZeRO-3, offloading last. One device of several
    is never chosen."""
    order = [("single", False), ("single", True)] if hw.count == 1 or hw.kind == "cpu" else []
    order += DISTILL_ORDER
    by = {(r.strategy, r.checkpointing): r for r in rows}
    for key in order:
        r = by.get(key)
        if r is not None and _acceptable(r):
            return r
    return None


def choose_online(rows: list[Row], hw: mem.Hardware) -> Row | None:
    placements = ["bf16 replicated", "bf16 sharded", "fp32 replicated", "int8 replicated", "nf4 replicated"]
    if hw.kind == "cpu":
        placements = ["fp32 replicated", "bf16 replicated"]
    order = ([("single", False), ("single", True)] if hw.count == 1 or hw.kind == "cpu" else []) + DISTILL_ORDER
    by = {(r.strategy, r.checkpointing, r.teacher): r for r in rows}
    for teacher in placements:
        for strategy, ckpt in order:
            r = by.get((strategy, ckpt, teacher))
            if r is not None and _acceptable(r):
                return r
    return None


STRATEGY_NAMES = {"single": "on one GPU", "ddp": "with DDP on {n} {units}", "fsdp": "with FSDP on {n} {units}",
                  "zero3": "with DeepSpeed ZeRO-3 on {n} {units}",
                  "zero3-offload": "with DeepSpeed ZeRO-3, the optimizer offloaded to host memory, on {n} {units}"}


def strategy_phrase(r: Row, hw: mem.Hardware) -> str:
    if hw.kind == "cpu":
        return "on the CPU"
    return STRATEGY_NAMES[r.strategy].format(n=r.devices, units="GPUs" if r.devices > 1 else "GPU")


def placement_phrase(g: Row, hw: mem.Hardware, t: Architecture) -> str:
    total = mem.fmt(mem.weight_bytes(t, g.precision))
    if hw.kind == "cpu":
        return f"the teacher in {g.precision} on the CPU ({total})"
    if g.devices == 1:
        copies = f"on each of the {hw.count} GPUs" if hw.count > 1 else "on the GPU"
        return f"the teacher in {g.precision} {copies} ({total})"
    copies = f"; {g.replicas} copies" if g.replicas > 1 else ""
    return f"the teacher in {g.precision} across {g.devices} GPUs ({total}{copies})"


def count(n: int) -> str:
    """A token count: 20.5M, or 153,600 under a million."""
    return f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n:,}"


def teacher_phrase(r: Row, hw: mem.Hardware) -> str:
    """An online teacher's placement in words."""
    precision, placement = (r.teacher or " ").split(" ", 1)
    if hw.kind == "cpu":
        return f"in {precision}"
    if placement == "sharded":
        return f"sharded in {precision} over the {r.devices} GPUs"
    return f"in {precision} on every GPU" if r.devices > 1 else f"in {precision}"


def accumulation(wl: Workload, batch: int, world: int) -> tuple[int, int]:
    """(accumulation steps, the global batch they give) for the asked global batch."""
    per_step = batch * world
    acc = max(1, round(wl.global_batch / per_step))
    return acc, acc * per_step


def recommend(t: Architecture, s: Architecture, hw: mem.Hardware, wl: Workload, rows: list[Row]) -> Recommendation:
    rec = Recommendation(text="")
    parts = []
    per = "of RAM" if hw.kind == "cpu" else f"per {hw.unit}"
    teacher = choose_teacher([r for r in rows if r.stage in ("generate", "label")], wl, hw)
    cache = mem.label_cache_bytes(t, wl.targets, wl.tokens, wl.conversations, wl.top_k, wl.hidden_layers)
    if teacher is None:
        worst = min((r for r in rows if r.stage == "label"), key=lambda r: r.total)
        parts.append(f"the teacher does not fit on these devices in any precision (label needs at least "
                     f"{mem.fmt(worst.total)} {per} in {worst.precision} across {worst.devices}); add "
                     "devices or serve the teacher elsewhere")
    else:
        g, lab = teacher
        gb, lb = min(wl.teacher_batch, g.max_batch), min(wl.teacher_batch, lab.max_batch)
        batches = f"generate at batch {gb}, label at batch {lb}" if gb != lb else f"at batch {gb}"
        parts.append(f"label first: generate and label with {placement_phrase(g, hw, t)} {batches}; the cache "
                     f"holds {count(wl.targets)} target tokens at k={wl.top_k} in {mem.fmt(cache)}")
        rec.teacher = {"precision": g.precision, "devices_per_copy": g.devices, "copies": g.replicas,
                       "generate_batch": gb, "label_batch": lb, "generate_per_device": g.total,
                       "label_per_device": lab.total, "label_cache_bytes": cache}
    distill = choose_distill([r for r in rows if r.stage == "distill"], hw)
    if distill is None:
        least = min((r for r in rows if r.stage == "distill"), key=lambda r: r.total)
        parts.append(f"the {billions(s.params)} student does not fit for full training even at micro-batch "
                     f"{wl.batch_size} ({strategy_phrase(least, hw)} and activation checkpointing it needs "
                     f"{mem.fmt(least.total)} {per}); a smaller student or more devices")
    else:
        world = 1 if distill.strategy == "single" else distill.devices
        acc, got = accumulation(wl, distill.batch, world)
        ckpt = "no activation checkpointing needed"
        if distill.checkpointing:
            without = next(r for r in rows if r.stage == "distill" and r.strategy == distill.strategy
                           and not r.checkpointing)
            ckpt = f"with activation checkpointing; {mem.fmt(without.total)} without"
        host = f", {mem.fmt(distill.host)} host memory" if distill.host else ""
        parts.append(f"train the {billions(s.params)} student from it {strategy_phrase(distill, hw)}, micro-batch "
                     f"{distill.batch}, accumulation {acc} ({mem.fmt(distill.total)} {per}{host}, {ckpt}; "
                     f"micro-batch up to {distill.max_batch} fits)")
        rec.distill = {"strategy": distill.strategy, "devices": distill.devices, "micro_batch": distill.batch,
                       "accumulation": acc, "global_batch": got, "checkpointing": distill.checkpointing,
                       "per_device": distill.total, "host": distill.host, "max_micro_batch": distill.max_batch}
        if got != wl.global_batch:
            rec.notes.append(f"global batch {got} (micro-batch {distill.batch} x {world} x {acc}), the nearest to "
                             f"the {wl.global_batch} asked")
    online = choose_online([r for r in rows if r.stage == "distill-online"], hw)
    if online is not None:
        ckpt = "with" if online.checkpointing else "no"
        rec.online = {"strategy": online.strategy, "teacher": online.teacher, "checkpointing": online.checkpointing,
                      "per_device": online.total}
        rec.notes.append(f"distilling online instead fits {strategy_phrase(online, hw)} with the teacher "
                         f"{teacher_phrase(online, hw)} ({mem.fmt(online.total)} {per}, {ckpt} activation "
                         "checkpointing); the cache is cheaper: the teacher runs once, not every epoch")
    else:
        rec.notes.append("distilling online (the teacher in the training processes) fits no strategy here")
    rec.text = "; ".join(parts) + "."
    return rec


@dataclass
class Plan:
    teacher: Architecture
    student: Architecture
    hardware: mem.Hardware
    workload: Workload
    rows: list[Row]
    recommendation: Recommendation
    label_cache: int
    notes: list[str] = field(default_factory=list)


def make_plan(teacher: Architecture, student: Architecture, hw: mem.Hardware, wl: Workload) -> Plan:
    from kdforge.planning.architecture import layout_note

    rows = (teacher_rows(teacher, hw, wl, "generate") + teacher_rows(teacher, hw, wl, "label")
            + student_rows(student, hw, wl) + online_rows(teacher, student, hw, wl))
    notes = [n for n in (layout_note(teacher), layout_note(student)) if n]
    if abs(teacher.vocab_size - student.vocab_size) > 1024:  # more than padding (Qwen2.5: 152064 vs 151936)
        notes.append(f"vocabularies of {teacher.vocab_size} and {student.vocab_size} tokens: distillation needs the "
                     "teacher's tokenizer to be the student's")
    cache = mem.label_cache_bytes(teacher, wl.targets, wl.tokens, wl.conversations, wl.top_k, wl.hidden_layers)
    return Plan(teacher, student, hw, wl, rows, recommend(teacher, student, hw, wl, rows), cache, notes)
