"""`kdforge <stage>`: one subcommand per stage, built from `kdforge.stages.all_stages()`, plus `run`.

Every stage takes ``--config FILE`` (YAML, repeatable), its flags, and ``--set key=value``
overrides (applied last), validates the result before any heavy work, and runs. A stage's flags are
the config fields it names (kdforge/stages/<stage>.py): the flag's type, choices and help come from
the field, so each option is declared once. `kdforge run FILE` runs a file's stage sections in the
stages' order.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import types
import typing
from typing import Any, Literal

from kdforge import __version__, distributed
from kdforge.config import build_config
from kdforge.errors import UserError


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def field_argument(config: type, field: str, with_default: bool = True) -> dict[str, Any]:
    """argparse keyword arguments for one config field: type, choices, nargs, help and default from its
    declaration (``with_default=False``: None, so that an absent flag can be told from a given one)."""
    info = config.model_fields[field]
    ann = _unwrap(info.annotation)
    default = info.get_default(call_default_factory=True) if with_default and not info.is_required() else None
    kw: dict[str, Any] = {"help": info.description, "default": default}
    origin = typing.get_origin(ann)
    if ann is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        # Shown, not enforced here: the config rejects a wrong value with the same message as in a YAML file.
        kw["metavar"] = "{" + ",".join(str(a) for a in typing.get_args(ann)) + "}"
    elif origin is list:
        (item,) = typing.get_args(ann) or (str,)
        if item is int:
            kw["type"] = _csv_ints
            kw["metavar"] = "N,N,..."
        else:
            kw["nargs"] = "+"
    elif ann in (int, float):
        kw["type"] = ann
    return kw


def _common(p: argparse.ArgumentParser, stage) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config field, e.g. --set distill.temperature=2 (applied last)")
    if stage.pipeline or stage.name == "demo":
        p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The whole command line. ``defaults=False``: every stage flag defaults to None (main() uses that
    parse to see which flags were given, so that YAML values are only overridden by given flags)."""
    from kdforge.stages import all_stages

    parser = argparse.ArgumentParser(prog="kdforge", description="Distil a large chat model into a small, fast one.")
    parser.add_argument("--version", action="version", version=f"kdforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in all_stages():
        p = sub.add_parser(stage.name, help=stage.help, description=stage.config.__doc__)
        if stage.positional:
            p.add_argument(stage.positional, nargs="?", **field_argument(stage.config, stage.positional, False))
        for name in stage.flags:
            flag = "--" + stage.aliases.get(name, name).replace("_", "-")
            p.add_argument(flag, dest=name, **field_argument(stage.config, name, defaults))
        for name, text in stage.options.items():
            p.add_argument("--" + name.replace("_", "-"), action="store_true", dest=name, help=text)
        _common(p, stage)
        p.set_defaults(stage=stage)

    r = sub.add_parser("run", help="run the stages of one YAML file in order")
    r.add_argument("config_file", metavar="CONFIG")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    r.add_argument("--overwrite", action="store_true")
    return parser


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM (``kill``, a scheduler's timeout) ends a stage like Ctrl-C does: as an exception, so that
    the stage's clean-up runs (atomic folders remove their temporary copy) instead of dying mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser(defaults=False).parse_args(argv)
    stage = getattr(args, "stage", None)
    if stage is not None and not stage.pipeline and stage.name != "demo":
        return _run(args)  # servers handle their own signals (graceful shutdown)
    with _terminate_as_exit():
        try:
            return _run(args)
        finally:
            distributed.leave()  # under torchrun: this rank's process group, once its stages are done


def _run(args: argparse.Namespace) -> int:
    from kdforge.stages import all_stages, plan_file, run_plan, run_stage

    try:
        if args.command == "run":
            plan = plan_file(args.config_file, args.overrides)  # every stage validated before the first runs
            run_plan(plan, overwrite=args.overwrite)
            return 0
        stage = args.stage
        names = [s.name for s in all_stages()]
        flags = {name: getattr(args, name) for name in ((stage.positional,) if stage.positional else ()) + stage.flags}
        files = [str(f()) for f in stage.config_files] + args.config
        cfg = build_config(stage.config, stage.name, files, args.overrides, flags, sections=names)
        from kdforge.quiet import quiet_transformers

        quiet_transformers()
        kwargs = {name: getattr(args, name) for name in stage.options}
        if stage.takes_overrides:
            kwargs["overrides"] = args.overrides
        if stage.pipeline or stage.name == "demo":
            kwargs["overwrite"] = args.overwrite
        result = run_stage(stage, cfg, **kwargs)
        if stage.pipeline and stage.name != "eval" and distributed.is_main():  # one line per job, not per rank
            print(f"[kdforge] {stage.name} done -> {cfg.out}: {result}", flush=True)
        return result if isinstance(result, int) and not stage.pipeline else 0
    except (UserError, FileExistsError) as e:
        print(f"kdforge: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed mid-stage (disk full, read-only): one line, not a traceback
        from kdforge.artifacts import describe_write_error

        message = describe_write_error(e)
        if message is None:
            raise
        print(f"kdforge: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
