"""The pipeline's stages, one module each, in flow order: the folder list is the pipeline.

    generate -> label -> student -> (prefs) -> distill -> export (+ quantize) -> eval -> serve (+ app, chat)
    prefs: candidate answers ranked by the teacher, for `distill --objective dpo|kto|distillm2`; it comes before
    distill so that one run file can rank a trained student's answers and train it on them (configs/kd-then-dpo.yaml)
    plan: the memory every stage needs per device, from config.json files alone (not a step of a run)
    demo: the whole path on the embedded teacher, as one shipped run file (stages/demo.yaml)

Each module declares its config type(s), a ``run(cfg, ...)`` and a :class:`Stage` per subcommand;
`kdforge.cli` builds every subcommand from :func:`all_stages`, and `kdforge run` runs a file's
sections in the same order. A stage module imports torch and the heavy components inside ``run``,
so that building the command line (which reads every stage's config fields) stays fast.
Stages talk to each other only through artifact folders; nothing below this package imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kdforge.config import ConfigError, StageConfig, build_config, read_run_file

# Stage modules in flow order; a module may declare several subcommands (export: export, quantize).
MODULES = ("generate", "label", "student", "prefs", "distill", "export", "eval", "serve", "plan", "demo")


@dataclass(frozen=True)
class Stage:
    """One subcommand: its config type, its run function and which config fields are command-line flags.

    Every flag is declared once, by naming a config field: its type, choices and help text come from
    the field (see `kdforge.cli`). ``aliases`` renames a field's flag (``max_steps`` -> ``--steps``);
    ``options`` are switches of the run itself, not of the config (``--resume``), passed to ``run``
    as keyword arguments.
    """

    name: str
    help: str
    config: type[StageConfig]
    run: Callable[..., Any]
    positional: str | None = None
    flags: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    pipeline: bool = True  # a step of `kdforge run` (writes one artifact folder); False: serve, app, chat, plan, demo
    config_files: tuple[Callable[[], Any], ...] = ()  # YAML files read before --config ones (demo: its run file)
    takes_overrides: bool = False  # run() receives the --set items (demo hands them to its stages)
    parallel: bool = False  # run() shares its work between torchrun's processes; else rank 0 alone runs it


def run_stage(stage: Stage, cfg: StageConfig, **kwargs: Any) -> Any:
    """``stage.run(cfg, **kwargs)``; under torchrun / accelerate launch a stage that does not share its work
    between processes runs on rank 0 while the others wait, and its result (or error) reaches every rank."""
    from kdforge import distributed

    if stage.parallel or not distributed.launched():
        return stage.run(cfg, **kwargs)
    distributed.init()
    return distributed.on_main(stage.run, cfg, **kwargs)


def all_stages() -> list[Stage]:
    """Every subcommand's stage, in flow order."""
    out: list[Stage] = []
    for name in MODULES:
        out.extend(importlib.import_module(f"kdforge.stages.{name}").STAGES)
    return out


def pipeline_stages() -> list[Stage]:
    return [s for s in all_stages() if s.pipeline]


def plan_file(path: str, overrides: list[str] | None = None) -> list[tuple[Stage, StageConfig]]:
    """The stages a run file holds, in flow order, each config validated (a typo in ``eval:`` must not
    cost a training run)."""
    stages = pipeline_stages()
    names = [s.name for s in stages]
    sections = read_run_file(path, overrides)
    unknown = [k for k in sections if k not in names and k != "demo"]
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; a run file holds {', '.join(names)} (and vars)")
    chosen = [s for s in stages if s.name in sections]
    if not chosen:
        raise ConfigError(f"{path}: no stage sections ({', '.join(names)})")
    return [(s, build_config(s.config, s.name, [path], overrides, sections=names)) for s in chosen]


def run_plan(plan: list[tuple[Stage, StageConfig]], overwrite: bool = False,
             always_overwrite: tuple[str, ...] = (), tag: str = "kdforge") -> dict[str, float]:
    """Run validated stages in order; returns each stage's wall time in seconds."""
    import time

    from kdforge.quiet import quiet_transformers

    quiet_transformers()
    timings: dict[str, float] = {}
    for i, (stage, cfg) in enumerate(plan, 1):
        print(f"[{tag}] {i}/{len(plan)} {stage.name} -> {cfg.out}", flush=True)
        t = time.time()
        run_stage(stage, cfg, overwrite=overwrite or stage.name in always_overwrite)
        timings[stage.name] = time.time() - t
    return timings
