"""`kdforge plan`: memory per device for every stage and strategy, before any hardware is rented.

Given a teacher and a student (an HF folder, its ``config.json`` or a known name: no weights are
read), the devices and the data, it prints the memory per device of generate, label and distill
under each placement and strategy, the label cache's size on disk, which plans fit and a recommended
one. The arithmetic is `kdforge.planning`'s (no torch); docs/distributed.md states the formulas.
Not a step of `kdforge run`: it writes nothing.
"""

from __future__ import annotations

import json
import sys

from pydantic import Field

from kdforge.config import StageConfig
from kdforge.errors import UserError
from kdforge.stages import Stage


class PlanConfig(StageConfig):
    """`kdforge plan`: memory per device for every stage and strategy (reads config.json only)."""

    teacher: str = Field(description="the teacher: an HF folder, its config.json, or a known name (qwen2.5-72b, "
                         "qwen2.5-7b, qwen2.5-3b, qwen2.5-1.5b, qwen2.5-0.5b, smollm2-135m)")
    student: str | None = Field(None, description="the student, as --teacher (default: the teacher cut to "
                                "--student-layers)")
    student_layers: int | None = Field(None, gt=0, description="keep this many of the student's layers (a "
                                       "`kdforge student --num-layers` cut)")
    devices: str = Field("1", description="GPUs (a number), or 'cpu' for host memory only")
    device_memory: str | None = Field(None, description="memory per device, e.g. 80GB, 24GiB (with --devices "
                                      "cpu: the RAM)")
    host_memory: str | None = Field(None, description="host RAM, e.g. 512GB: checks ZeRO-Offload's optimizer "
                                    "state against it")
    conversations: int = Field(10_000, gt=0, description="conversations in the data")
    max_length: int = Field(4096, gt=8, description="tokens per conversation, at most (prompt + answer): the "
                            "generation context and the label/distill max_length")
    answer_tokens: int | None = Field(None, gt=0, description="assistant (target) tokens per conversation: "
                                      "generate's max_new_tokens (default: half of max_length)")
    batch_size: int = Field(1, gt=0, description="distill: conversations per micro-batch per device")
    global_batch_size: int = Field(128, gt=0, description="distill: conversations per optimizer step over all "
                                   "devices (micro-batch x accumulation x world size)")
    teacher_batch_size: int = Field(8, gt=0, description="generate/label: sequences per teacher forward")
    top_k: int = Field(64, gt=1, le=1024, description="label cache: teacher log-probs kept per target token")
    hidden_layers: list[int] = Field(default_factory=list, description="label cache: teacher layers whose hidden "
                                     "states it keeps")
    chunk_size: int = Field(256, gt=0, description="distill: target positions per projection/loss chunk")
    as_json: bool = Field(False, description="print the plan as JSON (every component in bytes)")


def run(cfg: PlanConfig) -> int:
    from kdforge.planning.architecture import resolve
    from kdforge.planning.memory import Hardware, parse_devices, parse_memory
    from kdforge.planning.plans import Workload, make_plan
    from kdforge.planning.report import as_json, render

    kind, count = parse_devices(cfg.devices)
    if cfg.device_memory is None:
        raise UserError("plan: --device-memory is required: the memory of one GPU (e.g. 80GB), or the RAM "
                        "with --devices cpu")
    hw = Hardware(kind, count, parse_memory(cfg.device_memory),
                  parse_memory(cfg.host_memory, "--host-memory") if cfg.host_memory else None)
    teacher = resolve(cfg.teacher, "teacher")
    if cfg.student is None and cfg.student_layers is None:
        raise UserError("plan: give --student (a folder, a config.json or a known name) or --student-layers "
                        "(the teacher cut to that many layers)")
    student = resolve(cfg.student, "student") if cfg.student else teacher
    if cfg.student_layers:
        student = student.with_layers(cfg.student_layers)
    bad = [x for x in cfg.hidden_layers if not 0 <= x < teacher.num_hidden_layers]
    if bad:
        n = teacher.num_hidden_layers
        raise UserError(f"plan: --hidden-layers {bad} out of range: the teacher has {n} layers (0..{n - 1})")
    answer = cfg.answer_tokens or cfg.max_length // 2
    if answer >= cfg.max_length:
        raise UserError(f"plan: --answer-tokens {answer} leaves no room for a prompt in --max-length "
                        f"{cfg.max_length}")
    workload = Workload(cfg.conversations, cfg.max_length, answer, cfg.batch_size, cfg.global_batch_size,
                        cfg.teacher_batch_size, cfg.top_k, cfg.chunk_size, len(cfg.hidden_layers))
    plan = make_plan(teacher, student, hw, workload)
    text = json.dumps(as_json(plan), indent=2) if cfg.as_json else render(plan)
    sys.stdout.write(text + "\n")
    return 0


STAGES = (Stage("plan", "memory per device for every stage and strategy, and a recommended plan (no weights read)",
                PlanConfig, run,
                flags=("teacher", "student", "student_layers", "devices", "device_memory", "host_memory",
                       "conversations", "max_length", "answer_tokens", "batch_size", "global_batch_size",
                       "teacher_batch_size", "top_k", "hidden_layers", "chunk_size", "as_json"),
                aliases={"as_json": "json"}, pipeline=False),)
