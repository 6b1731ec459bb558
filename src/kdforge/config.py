"""The base of every stage's typed config: YAML files, ``--set key=value`` overrides, validation.

Each stage declares its own config type next to its code (``kdforge/stages/<stage>.py``). A YAML
file may hold one stage's fields at the top level, or several stages under their names
(``generate:``, ``distill:``, ...) as ``kdforge run`` uses; a top-level ``vars:`` mapping names
values that ``${name}`` stands for in any string of the file (``--set vars.name=value`` overrides
them). Every config is validated before any heavy work starts; an unknown or ill-typed field is an
error that names the file, the field and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from kdforge.errors import UserError

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(UserError):
    """A config could not be read or failed validation; the message says where and how to fix it."""


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Dtype = Literal["auto", "float32", "bfloat16", "float16"]


T = TypeVar("T", bound=StageConfig)


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` -> (key, YAML-parsed value). ``distill.lr=1e-4`` keeps its dotted key."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set distill.temperature=2")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from e
    # YAML reads 1e-4 as a string; numbers are what users mean here.
    if isinstance(value, str) and _FLOAT_RE.fullmatch(value):
        value = float(value)
    return key.strip(), value


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: invalid YAML: {getattr(e, 'problem', e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config fields at the top level")
    return data


VARS = "vars"  # the top-level section of ${name} values
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def split_overrides(overrides: Iterable[str] | None) -> tuple[list[str], dict[str, Any]]:
    """``--set`` items -> (the stage overrides, the ``vars.NAME=value`` ones as a mapping)."""
    rest, variables = [], {}
    for item in overrides or []:
        key, value = parse_override(item)
        if key.startswith(VARS + "."):
            variables[key[len(VARS) + 1:]] = value
        else:
            rest.append(item)
    return rest, variables


def expand_vars(value: Any, variables: dict[str, Any], where: str) -> Any:
    """Replace ``${name}`` in every string of ``value`` (nested lists and mappings included)."""
    if isinstance(value, dict):
        return {k: expand_vars(v, variables, where) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_vars(v, variables, where) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1) not in variables:
            raise ConfigError(f"{where}: ${{{m.group(1)}}} is not defined; add it under '{VARS}:' or pass "
                              f"--set {VARS}.{m.group(1)}=...")
        return str(variables[m.group(1)])

    return _VAR_RE.sub(sub, value)


def read_run_file(path: str | Path, overrides: Iterable[str] | None = None) -> dict[str, Any]:
    """A YAML file with its ``${name}`` references replaced (``vars:`` < ``--set vars.NAME=``)."""
    data = read_yaml(path)
    variables = data.pop(VARS, None) or {}
    if not isinstance(variables, dict):
        raise ConfigError(f"{path}: '{VARS}' must be a mapping of names to values")
    variables = {**variables, **split_overrides(overrides)[1]}
    return expand_vars(data, variables, str(path))


def build_config(
    cls: type[T],
    stage: str,
    files: list[str] | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    sections: Iterable[str] = (),
) -> T:
    """Merge YAML files < command-line flags < ``--set`` overrides into one validated ``cls``.

    A file holds either this stage's fields at the top level, or sections named after stages
    (``sections``: the names that mark a file as sectioned; any mapping that is not a field of
    ``cls`` does too), of which only ``stage``'s is read.
    """
    sections = tuple(sections)
    values: dict[str, Any] = {}
    sources = ["command line"]
    stage_overrides, _ = split_overrides(overrides)
    for f in files or []:
        data = read_run_file(f, overrides)
        sectioned = stage in data or any(k in data for k in sections) or any(
            isinstance(v, dict) and k not in cls.model_fields for k, v in data.items())
        section = data.get(stage, {}) if sectioned else data
        if not isinstance(section, dict):
            raise ConfigError(f"{f}: section '{stage}' must be a mapping")
        values.update(section)
        sources.append(str(f))
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    for item in stage_overrides:
        key, value = parse_override(item)
        prefix = key.split(".", 1)[0]
        if "." in key and prefix == stage:
            key = key.split(".", 1)[1]
        elif "." in key and (prefix in sections or prefix not in cls.model_fields):
            continue  # an override for another stage of `kdforge run` (`student.x` is the student stage's)
        _set_nested(values, key.split("."), value)
    try:
        return cls(**values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, stage, sources)) from None


def _set_nested(values: dict[str, Any], path: list[str], value: Any) -> None:
    """``values[a][b] = value`` for the path ``a.b`` of a nested config field (``distributed.strategy``,
    ``lora.r``), merged into what the YAML files gave that field."""
    for part in path[:-1]:
        inner = values.get(part)
        values[part] = inner = dict(inner) if isinstance(inner, dict) else {}
        values = inner
    values[path[-1]] = value


def format_validation_error(e: ValidationError, stage: str, sources: list[str]) -> str:
    lines = [f"invalid {stage} config (from {', '.join(sources)}):"]
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"]) or "(config)"
        got = err.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {stage}.{field}: unknown field; check its spelling (see docs/configs.md)")
        elif err["type"] == "missing":
            lines.append(f"  {stage}.{field}: required; set it in the YAML or with --set {stage}.{field}=...")
        else:
            lines.append(f"  {stage}.{field}: {err['msg']}{got_s}")
    return "\n".join(lines)


def dump(config: StageConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")
