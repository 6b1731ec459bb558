"""One typed config per stage, read from YAML, overridable with ``--set key=value``.

A YAML file may hold one stage's fields at the top level, or several stages under their names
(``generate:``, ``student:``, ``distill:``, ``eval:``, ``demo:``) as ``kdforge run`` uses. Every
config is validated before any heavy work starts; an unknown or ill-typed field is an error that
names the file, the field and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdforge.distill.schedules import Schedule, as_schedule
from kdforge.errors import UserError

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(UserError):
    """A config could not be read or failed validation; the message says where and how to fix it."""


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class GenerateConfig(StageConfig):
    """`kdforge generate`: the teacher answers a prompt set (sequence-level KD data)."""

    model: str = Field(description="teacher: HF folder, GGUF file, or embedded:smollm2-135m-instruct")
    prompts: str = Field("bundled", description="'bundled' or a JSONL file (prompt/messages/alpaca/sharegpt)")
    split: Literal["train", "validation", "all"] = "all"
    limit: int | None = Field(None, gt=0, description="use only the first N prompts of each split")
    val_limit: int | None = Field(None, gt=0, description="with split=all: cap for validation (default: limit)")
    out: str = "artifacts/generate"
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(128, gt=0)
    preset: Literal["greedy", "recipe"] | None = Field(
        None, description="greedy, or the common recipe: sampling at temperature 0.7, top-p 0.9"
    )
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_samples: int = Field(1, gt=0, description="answers per prompt (needs sampling when > 1)")
    seed: int = 0
    dtype: Dtype = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _apply_preset(self) -> GenerateConfig:
        if self.preset == "recipe":
            object.__setattr__(self, "do_sample", True)
            object.__setattr__(self, "temperature", 0.7)
            object.__setattr__(self, "top_p", 0.9)
        elif self.preset == "greedy":
            object.__setattr__(self, "do_sample", False)
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError("num_samples > 1 needs sampling: set do_sample=true or preset=recipe")
        return self


class StudentConfig(StageConfig):
    """`kdforge student`: build a student from the teacher."""

    teacher: str
    out: str = "artifacts/student"
    method: Literal["layers", "depth", "width", "fresh"] = Field(
        "layers", description="layers: uniform subset; depth: by block influence; width: prune by activation "
        "importance; fresh: a smaller config, sliced or random")
    num_layers: int | None = Field(None, gt=0, description="layers to keep (layers/depth: 8; width/fresh: all)")
    layers: list[int] | None = Field(None, description="explicit teacher layer indices to keep (method=layers)")
    hidden_size: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)
    init: Literal["slice", "random"] = Field("slice", description="fresh: slice teacher weights or random init")
    calibration: str = Field("bundled", description="prompts or conversations to measure importance on")
    calibration_samples: int = Field(64, gt=0)
    calibration_max_length: int = Field(256, gt=8)
    seed: int = 0
    trust_remote_code: bool = False


class LabelConfig(StageConfig):
    """`kdforge label`: the teacher's top-k soft labels cached on disk (offline distillation)."""

    teacher: str
    data: str = Field(description="a generate artifact folder or a JSONL file of conversations")
    out: str = "artifacts/labels"
    split: Literal["train", "validation", "all"] = "all"
    limit: int | None = Field(None, gt=0)
    top_k: int = Field(64, gt=1, le=1024)
    temperature: float = Field(1.0, gt=0, description="capture temperature")
    max_length: int = Field(256, gt=8, description="must equal distill.max_length when training from the cache")
    hidden_layers: list[int] = Field(default_factory=list, description="teacher layers whose hidden states to keep")
    batch_size: int = Field(8, gt=0)
    shard_size: int = Field(256, gt=0, description="conversations per shard")
    dtype: Dtype = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


ScheduleLike = float | Schedule | str  # a number, a schedule mapping, or a preset name


class LoraSettings(StageConfig):
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class DistillConfig(StageConfig):
    """`kdforge distill`: train the student on teacher answers with an online teacher."""

    teacher: str | None = Field(None, description="the live teacher (not needed with labels)")
    student: str
    data: str = Field(description="a generate artifact folder or a JSONL file of conversations")
    labels: str | None = Field(None, description="a `kdforge label` cache: train from it, never load the teacher")
    out: str = "artifacts/distill"
    split: Literal["train", "validation", "all"] = "train"
    # objective: kd_weight * (alpha*CE + (1-alpha)*T^2*D) + hidden_weight*H + attention_weight*A
    loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"] = "forward_kl"
    alpha: ScheduleLike = Field(0.5, description="weight of hard-label CE; 1-alpha weighs T^2*D")
    temperature: ScheduleLike = Field(2.0, description="T, or a schedule / preset (t6to1, t5to2, t2then1)")
    jsd_beta: float = Field(0.5, ge=0, le=1)
    skew: float = Field(0.1, ge=0, le=1, description="DistiLLM skew for skew_kl / skew_reverse_kl")
    kd_weight: ScheduleLike = 1.0
    hidden_loss: Literal["none", "mse", "cosine", "nmse"] = "none"
    hidden_weight: ScheduleLike = 1.0
    attention_loss: Literal["none", "kl", "mse"] = "none"
    attention_weight: ScheduleLike = 1.0
    layer_map: dict[int, int] | None = Field(None, description="student layer -> teacher layer")
    preset: Literal["two_stage"] | None = None
    chunk_size: int | None = Field(256, gt=0, description="target positions per projection/loss/backward chunk")
    # optimisation
    method: Literal["full", "lora"] = "full"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    freeze: list[str] = Field(default_factory=list, description="regexes of parameter names to freeze")
    max_steps: int = Field(200, gt=0, description="optimizer steps")
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-4, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="decay ends at lr*min_lr_ratio")
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(256, gt=8)
    gradient_checkpointing: bool = False
    pack: bool = Field(True, description="lay a micro-batch's conversations end to end (block-diagonal attention) "
                       "instead of padding them; off while hidden/attention alignment is on")
    pack_length: int = Field(256, gt=8, description="tokens per packed row (a longer conversation gets its own row)")
    release_memory: bool | None = Field(None, description="return freed buffers to the OS (lower peak RSS, ~10% "
                                        "slower on CPU); None: on when training from a label cache")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    category_weights: dict[str, float] = Field(default_factory=dict)
    # bookkeeping
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0)
    val_limit: int = Field(64, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    tensorboard: bool = False
    seed: int = 0
    device: str = "auto"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.teacher is None and self.labels is None:
            raise ValueError("set teacher (online distillation) or labels (a `kdforge label` cache)")
        for name in ("alpha", "temperature", "kd_weight", "hidden_weight", "attention_weight"):
            try:
                object.__setattr__(self, name, as_schedule(getattr(self, name)))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        bad = [w for w in self.category_weights.values() if w < 0]
        if bad:
            raise ValueError(f"category_weights must be >= 0, got {bad}")
        if self.labels and (self.attention_loss != "none" or self.preset == "two_stage"):
            raise ValueError("attention-map alignment needs a live teacher; the soft-label cache holds no attention")
        if self.preset == "two_stage":
            # Stage 1 (first half): hidden states only. Stage 2: KL (+ CE) and attention maps.
            half = Schedule(kind="step", values=[1.0, 0.0], boundaries=[0.5])
            object.__setattr__(self, "hidden_weight", half)
            object.__setattr__(self, "kd_weight", Schedule(kind="step", values=[0.0, 1.0], boundaries=[0.5]))
            object.__setattr__(self, "attention_weight", Schedule(kind="step", values=[0.0, 1.0], boundaries=[0.5]))
            if self.hidden_loss == "none":
                object.__setattr__(self, "hidden_loss", "cosine")
            if self.attention_loss == "none":
                object.__setattr__(self, "attention_loss", "kl")
        return self


class EvalConfig(StageConfig):
    """`kdforge eval`: teacher vs students on held-out teacher answers."""

    teacher: str
    students: list[str] = Field(default_factory=list)
    names: list[str] | None = Field(None, description="display names, one per student")
    data: str
    out: str = "artifacts/eval"
    split: Literal["train", "validation", "all"] = "validation"
    limit: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(256, gt=8)
    decode_tokens: int = Field(64, gt=0, description="greedy tokens generated to time decoding")
    device: str = "auto"
    trust_remote_code: bool = False
    backend: Literal["auto", "transformers", "llama.cpp"] = Field(
        "auto", description="runtime of GGUF students: llama.cpp (auto: when llama-cpp-python is installed) or "
        "transformers' GGUF loader (dequantised to fp32); HF folders and the teacher always run in transformers")
    # the task set: short answers (normalised exact match) and code (run against tests)
    tasks: bool = Field(True, description="score every model on the task set")
    task_file: str = Field("bundled", description="'bundled' (src/kdforge/eval/tasks.jsonl) or a JSONL task file")
    task_limit: int | None = Field(None, gt=0, description="at most N items of each type (short, code)")
    task_batch_size: int = Field(16, gt=0, description="prompts per generate call (tasks and lm_eval alike)")
    task_max_new_tokens: int = Field(32, gt=0, description="answer length cap for short-answer items")
    code_max_new_tokens: int = Field(128, gt=0, description="answer length cap for code items")
    code_timeout_s: float = Field(5.0, gt=0, description="wall-clock and CPU limit per code run")
    code_memory_mb: int = Field(512, ge=64, description="address-space limit per code run")
    # stability: sampled answers to fixed prompts
    stability_prompts: int = Field(8, ge=0, description="prompts to sample (0: off)")
    stability_samples: int = Field(4, ge=2, description="sampled answers per prompt")
    stability_max_new_tokens: int = Field(48, gt=0)
    stability_temperature: float = Field(0.7, gt=0, le=2, description="as the serve stage's sampler: (0, 2]")
    stability_top_p: float = Field(0.9, gt=0, le=1)
    seed: int = 0
    # speed and size
    speed: bool = Field(True, description="time decoding and measure peak memory, one process per model")
    speed_batch: int = Field(8, gt=1, description="the second batch size timed (the first is 1)")
    threads: int | None = Field(None, gt=0, description="torch threads for the speed measurement (default: torch's)")
    # plots and lm-evaluation-harness
    plots: bool = True
    distill_logs: list[str] | None = Field(None, description="train_log.jsonl files or distill folders to plot "
                                           "(default: every student folder that has one)")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-eval task names; kdforge_qa and "
                                     "kdforge_code are the task set as local tasks")
    lm_eval_models: list[str] | None = Field(None, description="display names of the models to run lm-eval on "
                                             "(default: all)")
    lm_eval_limit: int | None = Field(None, gt=0, description="lm-eval's limit: first N documents per task")

    @model_validator(mode="after")
    def _names_match(self) -> EvalConfig:
        if self.names is not None and len(self.names) != len(self.students):
            raise ValueError(f"names has {len(self.names)} entries but students has {len(self.students)}")
        shown = ["teacher", *(self.names or [Path(s).name for s in self.students])]
        if len(set(shown)) != len(shown):
            raise ValueError(f"model names must be unique, got {shown}; set names")
        unknown = [m for m in self.lm_eval_models or [] if m not in shown]
        if unknown:
            raise ValueError(f"lm_eval_models {unknown} are not among the models {shown}")
        return self


class DemoConfig(StageConfig):
    """`kdforge demo`: generate -> label -> student -> distill -> export -> eval on the embedded teacher."""

    teacher: str = "embedded:smollm2-135m-instruct"
    out: str = "demo_out"
    train_prompts: int | None = Field(None, gt=0, description="None: the whole train split")
    val_prompts: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(96, gt=0)
    gen_batch_size: int = Field(16, gt=0)
    student_layers: int = Field(20, gt=0, description="teacher layers the student keeps (of 30)")
    student_method: Literal["depth", "layers"] = Field(
        "depth", description="depth: the most important layers by block influence; layers: evenly spaced")
    distill_steps: int = Field(160, gt=0)
    distill_batch_size: int = Field(4, gt=0)
    distill_lr: float = Field(3e-4, gt=0)
    max_length: int = Field(256, gt=8)
    offline: bool = Field(True, description="distil from a soft-label cache (label stage) instead of online")
    top_k: int = Field(64, gt=1)
    eval_task_limit: int | None = Field(None, gt=0, description="at most N task items of each type in the eval "
                                        "stage (None: the whole task set)")
    export_quant: list[str] = Field(default_factory=lambda: ["q8_0"], description="GGUF files of the distilled "
                                    "student, each round-tripped and compared in the eval stage ([]: no export)")
    export_calibration_samples: int = Field(128, gt=0, description="calibration answers for the export's rounding")
    export_check_prompts: int = Field(16, gt=0, description="validation prompts in the export's round-trip check")

    @field_validator("export_quant", mode="before")
    @classmethod
    def _split_types(cls, v):
        return [x for x in v.replace(",", " ").split() if x] if isinstance(v, str) else v  # --set export_quant=q8_0

    @field_validator("export_quant")
    @classmethod
    def _export_types(cls, v: list[str]) -> list[str]:
        from kdforge.export.gguf_writer import QUANT_NAMES  # here: kdforge.export imports this module

        bad = [x for x in v if x.lower() not in QUANT_NAMES]
        if bad:
            raise ValueError(f"unknown GGUF type(s) {bad}; the gguf package writes: {', '.join(QUANT_NAMES)}")
        return list(dict.fromkeys(x.lower() for x in v))


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


def build_config(
    cls: type[T],
    stage: str,
    files: list[str] | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> T:
    """Merge YAML files < command-line flags < ``--set`` overrides into one validated ``cls``."""
    values: dict[str, Any] = {}
    sources = ["command line"]
    for f in files or []:
        data = read_yaml(f)
        section = data.get(stage, data if not any(k in data for k in _STAGE_NAMES) else {})
        if not isinstance(section, dict):
            raise ConfigError(f"{f}: section '{stage}' must be a mapping")
        values.update(section)
        sources.append(str(f))
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    for item in overrides or []:
        key, value = parse_override(item)
        if "." in key:
            prefix, key = key.split(".", 1)
            if prefix != stage:
                continue  # an override for another stage of `kdforge run`
        values[key] = value
    try:
        return cls(**values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, stage, sources)) from None


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


_STAGE_NAMES = ("generate", "label", "student", "distill", "eval", "demo")


def dump(config: StageConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")
