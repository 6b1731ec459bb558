"""Schedules for the temperature and the loss weights over training.

A schedule maps training progress to a value. ``unit`` says what progress is measured in:
``step`` (optimizer steps), ``epoch`` (fractional epochs over the training data) or ``progress``
(0 at the first step, 1 at the last). Kinds:
    constant  value
    linear    start -> end
    cosine    start -> end along half a cosine
    step      values[i] from boundaries[i-1] on (``values`` has one more entry than ``boundaries``)
Presets: ``t6to1`` (temperature 6 -> 1, linear over training), ``t5to2`` (5 -> 2), ``t2then1``
(2 in the first epoch, then 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["constant", "linear", "cosine", "step"] = "constant"
    value: float | None = None
    start: float | None = None
    end: float | None = None
    values: list[float] | None = None
    boundaries: list[float] | None = None
    unit: Literal["step", "epoch", "progress"] = "progress"

    @model_validator(mode="after")
    def _complete(self) -> Schedule:
        need = {"constant": ("value",), "linear": ("start", "end"), "cosine": ("start", "end"),
                "step": ("values", "boundaries")}[self.kind]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.kind} schedule needs {', '.join(missing)}")
        if self.kind == "step":
            if len(self.values) != len(self.boundaries) + 1:
                raise ValueError("a step schedule needs one more value than boundaries")
            if sorted(self.boundaries) != list(self.boundaries):
                raise ValueError("step boundaries must be increasing")
        return self

    def at(self, p: Progress) -> float:
        """The value at a point of training."""
        if self.kind == "constant":
            return float(self.value)
        x = {"step": float(p.step), "epoch": p.epoch, "progress": p.fraction}[self.unit]
        if self.kind == "step":
            return float(self.values[sum(1 for b in self.boundaries if x >= b)])
        span = {"step": max(1, p.total_steps - 1), "epoch": max(p.total_epochs, 1e-9), "progress": 1.0}[self.unit]
        frac = min(1.0, max(0.0, x / span))
        if self.kind == "cosine":
            frac = 0.5 * (1 - math.cos(math.pi * frac))
        return float(self.start + (self.end - self.start) * frac)


@dataclass(frozen=True)
class Progress:
    """Where training is: optimizer ``step`` (0-based) of ``total_steps``; epochs as fractions."""

    step: int
    total_steps: int
    steps_per_epoch: float

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps - 1)

    @property
    def epoch(self) -> float:
        return self.step / max(self.steps_per_epoch, 1e-9)

    @property
    def total_epochs(self) -> float:
        return self.total_steps / max(self.steps_per_epoch, 1e-9)


PRESETS: dict[str, Schedule] = {
    "t6to1": Schedule(kind="linear", start=6.0, end=1.0),
    "t5to2": Schedule(kind="linear", start=5.0, end=2.0),
    "t2then1": Schedule(kind="step", values=[2.0, 1.0], boundaries=[1.0], unit="epoch"),
}


def as_schedule(value: float | Schedule | str) -> Schedule:
    """A number is a constant schedule; a string names a preset."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, str):
        if value not in PRESETS:
            raise ValueError(f"unknown schedule preset {value!r}; known: {', '.join(PRESETS)}")
        return PRESETS[value]
    return Schedule(kind="constant", value=float(value))
