"""A plan as text (a table per stage, then the recommendation) or as JSON (every row's parts in bytes)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from kdforge.planning import memory as mem
from kdforge.planning.architecture import Architecture, billions
from kdforge.planning.plans import Plan, Row, count, group_sizes

STATE = ("weights", "gradients", "adam")


def table(headers: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Aligned columns: the first ``left`` to the left, numbers to the right."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = []
    for r in [headers, *rows]:
        cells = [str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def describe(arch: Architecture) -> str:
    tied = "tied" if arch.tie_word_embeddings else "untied"
    return (f"{arch.name}: {billions(arch.params)} parameters ({arch.num_hidden_layers} layers, hidden "
            f"{arch.hidden_size}, {arch.num_attention_heads} heads / {arch.num_key_value_heads} KV, FFN "
            f"{arch.intermediate_size}, vocab {arch.vocab_size}, {tied} embeddings)")


def _yes(r: Row) -> str:
    return "yes" if r.fits else "no"


def _dash(n: int) -> str:
    return mem.fmt(n) if n else "-"


def render(plan: Plan) -> str:
    t, s, hw, wl = plan.teacher, plan.student, plan.hardware, plan.workload
    cpu = hw.kind == "cpu"
    unit = hw.unit
    per = "RAM" if cpu else f"per {unit}"
    out = ["kdforge plan",
           f"  teacher  {describe(t)}",
           f"  student  {describe(s)}",
           f"  devices  {hw.describe()}",
           f"  data     {wl.conversations:,} conversations of up to {wl.max_length} tokens, {wl.answer_tokens} of them "
           f"answer: {count(wl.targets)} target tokens", ""]

    sizes = group_sizes(hw.count)
    precisions = mem.TEACHER_PRECISIONS[hw.kind]
    if cpu:
        out.append("teacher weights")
        out += table(["precision", "total"], [[p, mem.fmt(mem.weight_bytes(t, p))] for p in precisions])
    else:
        out.append(f"teacher weights ({per}, mapped across n GPUs by layers)")
        out += table(["precision", "total"] + [f"n={n}" for n in sizes],
                     [[p, mem.fmt(mem.weight_bytes(t, p))] + [mem.fmt(mem.mapped_weight_bytes(t, p, n)) for n in sizes]
                      for p in precisions])
    out.append("")
    # Where the teacher goes: one copy per device, or mapped across a group of GPUs (not on a CPU).
    place_heads = [] if cpu else ["GPUs/copy", "copies"]

    def place(r: Row) -> list:
        return [] if cpu else [r.devices, r.replicas]

    out.append(f"generate: batch {wl.teacher_batch}, {wl.max_length} tokens; KV cache = 2 x layers x "
               f"{t.num_key_value_heads} KV heads x {t.head_dim} x bytes (2 in 16 bits, 4 in fp32) x tokens x batch")
    rows = [r for r in plan.rows if r.stage == "generate"]
    out += table(["precision", *place_heads, "weights", "KV cache", "working", per, "fits", "max batch"],
                 [[r.precision, *place(r), mem.fmt(r.parts["weights"]), mem.fmt(r.parts["kv_cache"]),
                   mem.fmt(r.parts["working"]), mem.fmt(r.total), _yes(r), r.max_batch] for r in rows])
    out.append("")

    out.append(f"label: batch {wl.teacher_batch}, {wl.teacher_batch * wl.answer_tokens:,} target tokens per forward; "
               "logits = targets x vocab x (2 or 4 + 4 + 4) B")
    rows = [r for r in plan.rows if r.stage == "label"]
    hidden = ["hidden"] if wl.hidden_layers else []
    out += table(["precision", *place_heads, "weights", "working", "logits", *hidden, per, "fits", "max batch"],
                 [[r.precision, *place(r), mem.fmt(r.parts["weights"]), mem.fmt(r.parts["working"]),
                   mem.fmt(r.parts["logits"]), *([mem.fmt(r.parts["hidden"])] if hidden else []), mem.fmt(r.total),
                   _yes(r), r.max_batch] for r in rows])
    out.append("")

    ids = "uint16" if mem.id_bytes(t.vocab_size) == 2 else "int32"
    layers = f"{wl.hidden_layers} teacher layer{'s' if wl.hidden_layers > 1 else ''}"
    extra = f", plus fp16 hidden states of {layers} at all {count(wl.tokens)} tokens" if wl.hidden_layers else ""
    out.append(f"label cache on disk: k={wl.top_k}, {ids} ids: {mem.bytes_per_target(wl.top_k, t.vocab_size)} B per "
               f"target token x {count(wl.targets)}{extra} = {mem.fmt(plan.label_cache)}")
    out.append("")

    compute = ("fp32 throughout" if cpu else
               "single/DDP bf16 autocast over fp32 weights, FSDP/ZeRO-3 bf16 gathered weights over fp32 shards")
    out.append(f"distill from the cache: full AdamW, 16 B/param (fp32 weights 4, gradients 4, moments 8); micro-batch "
               f"{wl.batch_size} = {wl.batch_size * wl.max_length} tokens, {compute}, loss chunk {wl.chunk_size}")
    rows = [r for r in plan.rows if r.stage == "distill"]
    # A CPU has no world size, no gathered units, no buckets and nowhere to offload to: those columns go.
    heads = ["strategy", "ckpt", "w+g+adam", "activations", "logits", per, "fits", "max micro-batch"]
    if not cpu:
        heads[1:1] = [unit + "s"]
        heads[4:4] = ["bf16 copy", "gathered", "buffers"]
        heads.insert(-2, "host")

    def cols(r: Row) -> list:
        c = [r.strategy, "yes" if r.checkpointing else "no", mem.fmt(sum(r.parts[k] for k in STATE)),
             mem.fmt(r.parts["activations"]), mem.fmt(r.parts["logits"]), mem.fmt(r.total), _yes(r), r.max_batch]
        if not cpu:
            c[1:1] = [r.devices]
            c[4:4] = [_dash(r.parts.get("compute_copy", 0)), _dash(r.parts.get("gathered", 0)),
                      _dash(r.parts.get("buckets", 0) + r.parts.get("head_grad", 0))]
            c.insert(-2, _dash(r.host))
        return c
    out += table(heads, [cols(r) for r in rows])
    out.append("")

    out.append(f"distill online: the teacher in every training process ({per}, with activation checkpointing)")
    rows = [r for r in plan.rows if r.stage == "distill-online" and r.checkpointing]
    placements = list(dict.fromkeys(r.teacher for r in rows))
    cells: dict[str, dict[str, str]] = {}
    for r in rows:
        name = r.strategy if cpu or r.strategy == "single" else f"{r.strategy} x{r.devices}"
        cells.setdefault(name, {})[r.teacher] = f"{mem.fmt(r.total)} {_yes(r)}"
    heads = [f"teacher {p.removesuffix(' replicated') if cpu else p}" for p in placements]
    out += table(["strategy", *heads], [[k, *[v.get(p, "-") for p in placements]] for k, v in cells.items()])
    out.append("")

    out.append("recommended: " + plan.recommendation.text)
    for n in plan.recommendation.notes + plan.notes:
        out.append(f"  note: {n}")
    return "\n".join(out)


def as_json(plan: Plan) -> dict[str, Any]:
    rec = plan.recommendation
    t = plan.teacher
    return {
        "teacher": plan.teacher.summary(), "student": plan.student.summary(),
        "hardware": asdict(plan.hardware) | {"usable": plan.hardware.usable},
        "workload": asdict(plan.workload) | {"targets": plan.workload.targets},
        "teacher_weights": {p: {"total": mem.weight_bytes(t, p),
                                "per_device": {n: mem.mapped_weight_bytes(t, p, n)
                                               for n in group_sizes(plan.hardware.count)}}
                            for p in mem.TEACHER_PRECISIONS[plan.hardware.kind]},
        "label_cache": {"bytes": plan.label_cache,
                        "bytes_per_target": mem.bytes_per_target(plan.workload.top_k, t.vocab_size)},
        "assumptions": {"state_bytes_per_param": mem.STATE_BYTES, "compute_copy": mem.COMPUTE_COPY,
                        "ddp_buckets": mem.DDP_BUCKETS, "head_grad": mem.HEAD_GRAD,
                        "fsdp_unit": {"gathered": mem.FSDP_GATHER, "gradient": mem.FSDP_GRAD,
                                      "reduce_scatter": mem.FSDP_REDUCE}, "linear_bytes": mem.LINEAR_BYTES,
                        "logit_chunk_bytes": mem.LOGIT_CHUNK_BYTES, "reserve": plan.hardware.reserve},
        "rows": [r.as_dict() for r in plan.rows],
        "recommendation": {"text": rec.text, "teacher": rec.teacher, "distill": rec.distill, "online": rec.online,
                           "notes": rec.notes + plan.notes},
    }
