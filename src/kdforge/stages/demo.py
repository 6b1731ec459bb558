"""`kdforge demo`: the whole path on the embedded teacher, each stage's folder under one directory.

The demo is one run file shipped in the package, ``stages/demo.yaml`` (``configs/demo.yaml`` links to
it): generate -> label -> student -> distill -> export -> eval, as ``kdforge run`` runs it. This stage
only chooses the folder (``--out``: the file's ``${out}``), applies the file's ``demo.quick``
overrides with ``--quick`` (``--set`` items win over them) and rebuilds the stages the file lists in
``demo.rebuild`` on every run, so that a second ``make demo`` reuses the teacher's answers.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import Field

from kdforge.artifacts import product
from kdforge.config import VARS, StageConfig
from kdforge.stages import Stage, plan_file, run_plan


def demo_file() -> Path:
    """The shipped demo run file."""
    return Path(str(resources.files("kdforge.stages") / "demo.yaml"))


class DemoConfig(StageConfig):
    """`kdforge demo`: the shipped run file (stages/demo.yaml) on the embedded teacher."""

    out: str | None = Field(None, description="the folder every stage's folder goes under (the file's ${out}; "
                            "default: its vars.out, demo_out)")
    quick: dict[str, Any] = Field(default_factory=dict, description="what --quick sets: stage.field -> value "
                                  "(a small slice that finishes in a few minutes)")
    rebuild: list[str] = Field(default_factory=list, description="stages rebuilt on every run; the others resume "
                               "(generate) or refuse an existing folder unless --overwrite")


def plan(cfg: DemoConfig, quick: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> list:
    """The demo's stages with their validated configs (every stage checked before the first runs)."""
    items = [f"{k}={json.dumps(v)}" for k, v in cfg.quick.items()] if quick else []
    if cfg.out is not None:
        items.append(f"{VARS}.out={json.dumps(cfg.out)}")
    return plan_file(str(demo_file()), [*items, *overrides])


def run(cfg: DemoConfig, overwrite: bool = False, quick: bool = False,
        overrides: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    stages = plan(cfg, quick, overrides)
    timings = run_plan(stages, overwrite, always_overwrite=tuple(cfg.rebuild), tag="demo")
    print("[demo] stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), flush=True)
    report = product(stages[-1][1].out, "markdown")
    if report is not None:
        print(f"[demo] report: {report}", flush=True)
    student = next((c.model for s, c in stages if s.name == "export"), None)
    if student is not None:
        onnx = Path(student).parent / "onnx"
        print(f"[demo] the fast CPU runtime (ONNX Runtime GenAI int8, ~8x PyTorch decode speed here): kdforge export "
              f"{student} --to onnx --quant int8 --out {onnx} && kdforge serve {onnx / 'onnx-int8'}", flush=True)
    return timings


STAGES = (Stage("demo", "the whole path on the embedded teacher: generate -> label -> student -> distill -> "
                "export -> eval (stages/demo.yaml)", DemoConfig, run, flags=("out",),
                options={"quick": "a small slice that finishes in a few minutes (the file's demo.quick)"},
                pipeline=False, config_files=(demo_file,), takes_overrides=True),)
