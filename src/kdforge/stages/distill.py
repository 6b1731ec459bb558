"""`kdforge distill`: train a student on teacher answers, from a live teacher or a soft-label cache.

setup (data, output folder, models, teacher signal, optimizer, resume) -> loop (one `Distiller.step`
per optimizer step, logging, validation, checkpoints) -> finish (the student as an HF folder).
Output folder: checkpoints/, train_log.jsonl, optional tb/, and at the end the student as an HF
folder plus meta.json (written last: its presence marks a finished run). The objective and its
normalisation are described in kdforge/distill/trainer.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from kdforge.artifacts import (
    CONFIG_NAME,
    META_NAME,
    append_lines,
    atomic_files,
    atomic_write_text,
    check_resume,
    check_writable,
    file_sha256,
    read_lines,
    removed_if_unstarted,
    write_config,
    write_meta,
)
from kdforge.config import ConfigError, StageConfig, dump, read_yaml
from kdforge.distill.schedules import Schedule, as_schedule
from kdforge.models.placement import QUANTIZED, TeacherPlacement, is_url
from kdforge.models.placement import ServedTeacher as ServedSettings
from kdforge.stages import Stage

ScheduleLike = float | Schedule | str  # a number, a schedule mapping, or a preset name


class LoraSettings(StageConfig):
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class DistributedSettings(StageConfig):
    """How `kdforge distill` uses the processes of `torchrun` / `accelerate launch` (docs/distributed.md)."""

    strategy: Literal["auto", "none", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="ddp: every rank holds the whole student; fsdp: FSDP2, each rank 1/N of its weights, "
        "gradients and optimizer state; auto: fsdp when an accelerate config asks for it, else ddp; one process "
        "never wraps")
    teacher: Literal["auto", "shard", "replicate"] = Field(
        "auto", description="a live teacher: shard (FSDP2 forward-only, 1/N per rank) or replicate (a whole copy "
        "per rank); auto: shard under fsdp and ZeRO-3, replicate under ddp and ZeRO-2")
    zero_stage: Literal[2, 3] = Field(3, description="deepspeed: 2 partitions gradients and optimizer state, 3 the "
                                      "weights too (an accelerate DeepSpeed config's zero_stage wins)")


class CrossTokenizerSettings(StageConfig):
    """A student whose tokenizer is not the teacher's (docs/cross-tokenizer.md): spans, not tokens, are compared."""

    loss: Literal["hybrid", "uld"] = Field(
        "hybrid", description="hybrid: `loss` on the tokens both vocabularies spell alike plus ULD on the rest "
        "(GOLD); uld: ULD alone (sorted-probability Wasserstein-1, no vocabulary correspondence)")
    uld_weight: float | None = Field(None, ge=0, description="hybrid: weight of ULD on the unshared tokens "
                                     "(default: 1 with unshared uld, 0 with renormalise and map_prefix)")
    uld_top_k: int = Field(64, gt=0, description="ranks ULD compares one by one (the rest as one bin)")
    multi_token: Literal["first_token", "binary"] = Field(
        "first_token", description="hybrid, spans either side writes with several tokens: first_token compares the "
        "first tokens' distributions over the shared vocabulary; binary compares P(the span as written) vs not")
    unshared: Literal["uld", "renormalise", "map_prefix"] = Field(
        "uld", description="hybrid, the teacher's first-token mass on ids the student has no counterpart for: uld "
        "keeps it in the rest bin and compares it by rank (ULD); renormalise compares both sides over the shared ids "
        "only, each renormalised over them; map_prefix moves it to the student id spelling the longest prefix of "
        "the teacher token's bytes")


class RolloutSettings(StageConfig):
    """How the student samples its answers on on-policy steps (TRL GKDConfig: temperature, max_new_tokens)."""

    temperature: float = Field(1.0, ge=0, le=2, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    max_new_tokens: int = Field(128, gt=0, description="tokens per sampled answer at most")
    batch_size: int = Field(16, gt=0, description="prompts decoded together")


class ConsistencySettings(StageConfig):
    """weight * D(q(x) || q(perturbed x)) per target token: the student's predictions on an input and on a
    perturbed copy should agree (kdforge.distill.consistency; the clean prediction is the detached target)."""

    weight: ScheduleLike = Field(0.0, description="weight of the consistency term (0: off); a number or a schedule")
    perturb: Literal["token_dropout", "hidden_noise"] = Field(
        "token_dropout", description="token_dropout: zero a token's input vector with probability p; hidden_noise: "
        "add Gaussian noise of sigma x each token's RMS to the input hidden states")
    p: float = Field(0.1, ge=0, lt=1, description="token_dropout probability")
    sigma: float = Field(0.1, ge=0, description="hidden_noise standard deviation, relative to each token's RMS")
    loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"] = Field(
        "forward_kl", description="the divergence D, at T=1")


class TaidSettings(StageConfig):
    """TAID (kdforge.distill.taid): the target is softmax((1-t)·student (detached) + t·teacher), t rising over
    training from t_start to t_end, linearly or by TAID's adaptive rule (the linear schedule as its floor)."""

    schedule: Literal["off", "linear", "adaptive"] = Field("off", description="off: the teacher is the target")
    t_start: float = Field(0.4, ge=0, lt=1, description="t at the first step")
    t_end: float = Field(1.0, gt=0, le=1, description="t at the last step (at most)")
    alpha: float = Field(5e-4, ge=0, le=1, description="adaptive: step size of t")
    beta: float = Field(0.99, ge=0, le=1, description="adaptive: momentum of the loss's relative change")


class PreferenceSettings(StageConfig):
    """objective dpo / kto (kdforge.distill.preference; docs/losses.md): TRL's names where TRL has them."""

    beta: float = Field(0.1, gt=0, description="beta: how far the policy may move from the reference (DPO, KTO)")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="dpo: sigmoid (DPO), ipo, hinge")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo sigmoid: conservative DPO's epsilon")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of desirable answers")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable answers")
    sft_weight: float = Field(0.0, ge=0, description="weight of CE on the chosen (desirable) answers, per token "
                              "(TRL's rpo_alpha; 0: off)")


class DistillConfig(StageConfig):
    """`kdforge distill`: train the student on teacher answers, from a live teacher or a soft-label cache."""

    objective: Literal["kd", "dpo", "kto", "distillm2"] = Field(
        "kd", description="kd: distillation on conversations (data); dpo / kto: preference optimisation on a "
        "`kdforge prefs` artifact or a JSONL of pairs (data; no teacher); distillm2: DistiLLM-2's contrastive KD on "
        "pairs (skew KL on chosen, skew reverse KL on rejected answers; needs the teacher)")
    preference: PreferenceSettings = Field(default_factory=PreferenceSettings, description="dpo / kto settings")
    teacher: str | None = Field(None, description="the live teacher (not needed with labels)")
    teacher_placement: TeacherPlacement = Field(
        default_factory=TeacherPlacement, description="where the live teacher's weights go and in what precision: "
        "device_map (auto: across the GPUs, then CPU memory), max_memory, precision bf16/fp16/fp32/int8/4bit")
    teacher_server: ServedSettings = Field(
        default_factory=ServedSettings, description="a teacher behind a vLLM-compatible server (teacher: "
        "http(s)://host:port/v1): its local tokenizer folder and how requests are sent")
    teacher_top_k: int = Field(64, gt=1, le=1024, description="a served teacher: log-probs per target token "
                               "asked each step (at most the server's --max-logprobs)")
    student: str = Field(description="the student to train: an HF folder (e.g. a `kdforge student` artifact)")
    data: str = Field(description="a generate artifact folder or a JSONL file of conversations")
    labels: str | None = Field(None, description="a `kdforge label` cache: train from it, never load the teacher")
    out: str = Field("artifacts/distill", description="output folder: checkpoints, log, the trained student")
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
    cross_tokenizer: CrossTokenizerSettings = Field(
        default_factory=CrossTokenizerSettings, description="used when the student's tokenizer is not the "
        "teacher's (found automatically)")
    on_policy: ScheduleLike = Field(0.0, description="lambda: the share of steps that train on the student's own "
                                    "samples, scored by the teacher (GKD; a number or a schedule); 0: off-policy")
    rollout: RolloutSettings = Field(default_factory=RolloutSettings,
                                     description="sampling of the on-policy steps' answers")
    taid: TaidSettings = Field(default_factory=TaidSettings, description="an interpolated target that moves from "
                               "the student to the teacher over training (TAID)")
    self_distill: bool = Field(False, description="self-distillation: the teacher is a frozen copy of the starting "
                               "student (no teacher or labels); train chosen layers (freeze) or LoRA")
    consistency: ConsistencySettings = Field(default_factory=ConsistencySettings,
                                             description="consistency of predictions under perturbed inputs")
    preset: Literal["two_stage"] | None = None
    quant_aware: Literal["q4_0", "q8_0", "int4"] | None = Field(
        None, description="quantisation-aware distillation: train with every 2-D weight (decoder Linears, the "
        "embedding, an untied head) fake-quantised on this grid, gradients straight through, and save them on it; "
        "`kdforge export --quant q4_0|q8_0` then writes exactly the trained values")
    quant_aware_keep: list[str] = Field(default_factory=list, description="quant_aware: regexes of weight names "
                                        "left in full precision (the export keeps them f16), e.g. embed_tokens")
    quant_aware_pure: bool = Field(False, description="quant_aware: every weight on the base grid, the output "
                                   "projection (a tied embedding) too, for `kdforge export --pure`; by default it "
                                   "trains on q8_0 in a q4_0 run, as llama.cpp's Q4_0 files keep it")
    quant_aware_scales: Literal["reference", "learned"] = Field(
        "reference", description="quant_aware: each block's scale recomputed from the weights as llama.cpp's "
        "reference quantiser picks it, or learned (a trainable fp16 scale per block, LSQ; q4_0/q8_0 only)")
    quant_aware_scale_lr: float = Field(1e-3, gt=0, description="quant_aware_scales learned: peak learning rate of "
                                        "the log-scales (a relative change per step), on the same schedule as lr")
    chunk_size: int | None = Field(256, gt=0, description="target positions per projection/loss/backward chunk")
    # optimisation
    method: Literal["full", "lora"] = "full"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    freeze: list[str] = Field(default_factory=list, description="regexes of parameter names to freeze")
    max_steps: int = Field(200, gt=0, description="optimizer steps")
    max_minutes: float | None = Field(None, gt=0, description="a wall-clock budget: stop after the first step that "
                                      "ends this many minutes after the stage started (model loading counted; "
                                      "validation and snapshots not); the schedule still runs over max_steps")
    snapshot_minutes: list[float] = Field(default_factory=list, description="save the student's weights (an HF "
                                          "folder, snapshots/<m>min) after the first step ending past each of "
                                          "these minutes of the same clock: one run read at several budgets")
    batch_size: int = Field(4, gt=0, description="conversations per micro-batch")
    grad_accum: int = Field(1, gt=0)
    global_batch_size: int | None = Field(None, gt=0, description="conversations per optimizer step over all "
                                          "processes (batch_size x grad_accum x world size): sets grad_accum "
                                          "for the world size the run has, so a resume at another one is exact")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW)")
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
    release_memory: bool | None = Field(False, description="return freed buffers to the OS (lowest peak RSS, ~20% "
                                        "slower on CPU); off (or null): freed buffers are reused (kdforge.memory)")
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
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        for name in ("alpha", "temperature", "kd_weight", "hidden_weight", "attention_weight", "on_policy"):
            try:
                object.__setattr__(self, name, as_schedule(getattr(self, name)))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        try:
            object.__setattr__(self.consistency, "weight", as_schedule(self.consistency.weight))
        except ValueError as e:
            raise ValueError(f"consistency.weight: {e}") from None
        if self.self_distill:
            if self.teacher is not None or self.labels is not None:
                raise ValueError("self_distill: the teacher is the starting student itself; leave teacher and labels "
                                 "unset")
            object.__setattr__(self, "teacher", self.student)
        if self.objective in ("dpo", "kto"):
            if self.teacher is not None or self.labels is not None:
                raise ValueError(f"objective {self.objective} trains on ranked answers (data: a `kdforge prefs` folder "
                                 "or a JSONL of pairs) against the starting student as reference: leave teacher and "
                                 "labels unset")
            if self.on_policy_used or _varies(self.consistency.weight) or self.taid.schedule != "off" \
                    or self.hidden_loss != "none" or self.attention_loss != "none" or self.preset:
                raise ValueError(f"objective {self.objective} takes none of on_policy, consistency, taid, hidden or "
                                 "attention alignment, presets")
        if self.snapshot_minutes:
            if sorted(set(self.snapshot_minutes)) != self.snapshot_minutes or min(self.snapshot_minutes) < 0:
                raise ValueError("snapshot_minutes: distinct minutes, at least 0, in increasing order "
                                 f"(got {self.snapshot_minutes})")
            if self.method == "lora" or self.quant_aware is not None:
                raise ValueError("snapshot_minutes saves the trained weights as they are: not built for method "
                                 "lora or quant_aware (their weights become the model only when training ends)")
        if self.quant_aware is not None and (self.method == "lora" or self.objective != "kd"):
            raise ValueError("quant_aware trains the weights themselves on the grid: use method full (a LoRA adapter "
                             "merged afterwards would leave it) and objective kd")
        if self.quant_aware is None and (self.quant_aware_keep or self.quant_aware_pure
                                         or self.quant_aware_scales != "reference"):
            raise ValueError("quant_aware_keep/pure/scales are set but quant_aware is not: set quant_aware "
                             "(q4_0, q8_0, int4)")
        if self.quant_aware == "int4" and self.quant_aware_scales == "learned":
            raise ValueError("quant_aware_scales learned is for q4_0/q8_0 (a GGUF block stores its scale); the ONNX "
                             "int4 builder derives scales from the weights again: use quant_aware_scales reference")
        for pattern in self.quant_aware_keep:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"quant_aware_keep: {pattern!r} is not a regular expression ({e})") from None
        if self.objective == "distillm2" and (self.labels is not None or self.on_policy_used):
            raise ValueError("objective distillm2 needs the teacher to score both answers of each pair: set teacher "
                             "(not labels), and on_policy 0")
        if self.teacher is None and self.labels is None and self.objective not in ("dpo", "kto"):
            raise ValueError("set teacher (online distillation) or labels (a `kdforge label` cache)")
        if self.teacher is not None and self.labels is not None:
            # Training from the cache never loads the teacher: both would silently ignore one of them.
            raise ValueError("set teacher (online distillation) or labels (train from the cache), not both")
        sch = self.on_policy
        if any(not 0 <= v <= 1 for v in [sch.value, sch.start, sch.end, *(sch.values or [])] if v is not None):
            raise ValueError("on_policy: the share of on-policy steps must lie in [0, 1]")
        bad = [w for w in self.category_weights.values() if w < 0]
        if bad:
            raise ValueError(f"category_weights must be >= 0, got {bad}")
        if self.teacher is not None and is_url(self.teacher):
            if self.teacher_server.tokenizer is None:
                raise ValueError("a served teacher needs its tokenizer locally: set teacher_server.tokenizer "
                                 "to the teacher's tokenizer folder")
            if self.hidden_loss != "none" or self.attention_loss != "none" or self.preset == "two_stage":
                raise ValueError("a served teacher returns log-probabilities only: hidden-state and attention "
                                 "alignment need a local teacher (or a cache labelled with --hidden-layers)")
        if self.labels and (self.attention_loss != "none" or self.preset == "two_stage"):
            raise ValueError("attention-map alignment needs a live teacher; the soft-label cache holds no attention")
        if self.labels and self.on_policy_used:
            raise ValueError("on_policy trains on the student's own samples, which a soft-label cache has never seen: "
                             "it needs the teacher (teacher: a model or a server URL) instead of labels")
        if self.on_policy_used and (self.hidden_loss != "none" or self.attention_loss != "none"):
            raise ValueError("on_policy and hidden/attention alignment: the sampled batches are packed and scored on "
                             "logits only; set hidden_loss and attention_loss to none")
        if self.global_batch_size is not None and self.global_batch_size % self.batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of batch_size "
                             f"{self.batch_size}")
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

    @property
    def on_policy_used(self) -> bool:
        """True when some step may train on the student's samples (lambda above 0 anywhere)."""
        return _varies(self.on_policy)

    def trainer_objective(self):
        """What the trainer optimises (kdforge.distill.trainer.Objective): the loss fields, nothing else."""
        from kdforge.distill.trainer import Objective

        return Objective(loss=self.loss, alpha=self.alpha, temperature=self.temperature, kd_weight=self.kd_weight,
                         jsd_beta=self.jsd_beta, skew=self.skew, hidden_loss=self.hidden_loss,
                         hidden_weight=self.hidden_weight, attention_loss=self.attention_loss,
                         attention_weight=self.attention_weight, chunk_size=self.chunk_size,
                         pack_length=self.pack_length if self.pack else None,
                         consistency_weight=self.consistency.weight, consistency_loss=self.consistency.loss,
                         perturb=self.consistency.perturb, perturb_p=self.consistency.p,
                         perturb_sigma=self.consistency.sigma, seed=self.seed)


def _varies(sch: Schedule) -> bool:
    """True when a schedule is above 0 somewhere in training."""
    values = {"constant": [sch.value], "linear": [sch.start, sch.end], "cosine": [sch.start, sch.end],
              "step": sch.values}[sch.kind]
    return any(v > 0 for v in values)


LOG_NAME = "train_log.jsonl"
TERMS = ("loss", "ce", "soft", "hidden", "attention", "consistency")  # each log row's per-token terms
FILES = {"log": LOG_NAME}  # this stage's layout (meta.json "files"); the HF model files sit beside them

# Resuming continues the optimisation from a checkpoint: only settings that change bookkeeping may
# differ (logging, validation, checkpointing, where it runs); any other, a new field included, must match.
MAY_CHANGE = frozenset({"log_every", "eval_every", "val_limit", "save_every", "keep_checkpoints", "tensorboard",
                        "out", "device", "distributed", "teacher_server", "max_minutes", "snapshot_minutes"})
SNAPSHOTS = "snapshots"


def _prepare_out(cfg: DistillConfig, overwrite: bool, resume: bool) -> Path | None:
    """Create or check the output folder; return the checkpoint to resume from, if any."""
    from kdforge.distill.checkpoint import list_checkpoints

    check_writable(cfg.out)  # before any model loads
    out = Path(cfg.out)
    if out.exists() and overwrite and not resume:
        shutil.rmtree(out)
    if resume:
        ckpts = list_checkpoints(out)
        if not ckpts:
            raise ConfigError(f"--resume: {out} has no checkpoint (set save_every to write them)")
        check_resume(out, read_yaml(out / CONFIG_NAME), dump(cfg), MAY_CHANGE, "a training run",
                     "--resume with the same settings, or start a new --out.", ConfigError)
        (out / META_NAME).unlink(missing_ok=True)
        return ckpts[-1]
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already exists; pass --resume to continue it, --overwrite to replace it, "
                          "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return None


@dataclass
class _Training:
    """What setup builds and the loop and finish use."""

    cfg: DistillConfig
    out: Path
    tok: Any
    module: Any                    # the student (or its LoRA wrapper): what is trained and checkpointed
    params: list                   # every trained parameter, the projection's included
    projection: Any                # student width -> teacher width for hidden alignment, or None
    opt: Any
    sched: Any
    distiller: Any
    stream: Any                    # (epoch, example indices) per micro-batch, resumable
    data: list                     # encoded training conversations
    rows: list[int] | None         # their rows in the soft-label cache (None with a live teacher)
    val_batches: list[dict]
    layer_map: dict[int, int]
    steps_per_epoch: float
    start_step: int
    consumed: int
    log_path: Path
    par: Any                       # kdforge.distill.parallel.Parallel: this rank's place in the run
    root: Any                      # the student as trained (TargetHidden, maybe DDP/FSDP2-wrapped)
    micro_per_step: int            # micro-batches per optimizer step over all ranks (accumulation x world)
    pairs: list | None = None      # the teacher's encoding and spans of each conversation (another tokenizer)
    teacher_pad_id: int | None = None
    convs: list | None = None      # the conversations behind ``data`` (on-policy steps answer their prompts)
    student_sampler: Any = None    # kdforge.distill.on_policy.StudentSampler when on_policy is above 0
    cross: Any = None              # the CrossSetup when the tokenizers differ
    batcher: Any = None            # preference objectives: example indices -> (micro-batches, divergence per batch)
    quant: Any = None              # kdforge.distill.quant_aware.QuantAware under quant_aware
    steps_done: int = 0            # the last optimizer step taken (max_steps unless max_minutes stopped it)


def run(cfg: DistillConfig, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    from kdforge import distributed

    t0 = time.time()
    with removed_if_unstarted(cfg.out) if distributed.is_main() else contextlib.nullcontext():
        t = _setup(cfg, overwrite, resume)
        total_targets = _loop(t, t0)
        return _finish(t, total_targets, t0)


def _parallel(cfg: DistillConfig):
    """This rank's Parallel, and micro-batches per optimizer step over all ranks."""
    from kdforge import distributed
    from kdforge.distill.parallel import current

    par = current(cfg.distributed.strategy, cfg.distributed.zero_stage)
    if par.strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("distributed.strategy deepspeed needs DeepSpeed: pip install 'kdforge[deepspeed]' "
                              "(or fsdp: FSDP2 shards weights, gradients and optimizer state like ZeRO-3)") from None
    if par.strategy in ("fsdp", "deepspeed") and cfg.method == "lora":
        raise ConfigError(f"method lora with distributed.strategy {par.strategy} is not supported: use ddp for "
                          "LoRA (the base weights are frozen, only the adapters are all-reduced)")
    world = distributed.world_size()
    if cfg.global_batch_size is None:
        accum = cfg.grad_accum
    else:
        per_step = cfg.global_batch_size // cfg.batch_size  # micro-batches per step, over all ranks
        if per_step % world:
            raise ConfigError(f"global_batch_size {cfg.global_batch_size} = {per_step} micro-batches of "
                              f"{cfg.batch_size}, which {world} processes cannot share evenly; choose a world size "
                              "that divides it, or another batch_size")
        accum = per_step // world
    return par, accum * world


def _setup(cfg: DistillConfig, overwrite: bool, resume: bool) -> _Training:
    import torch

    from kdforge import distributed
    from kdforge.data.formats import load_training_data, select_split
    from kdforge.distill.checkpoint import (
        is_deepspeed,
        is_sharded,
        load_checkpoint,
        load_deepspeed_checkpoint,
        load_sharded_checkpoint,
        set_rng_states,
    )
    from kdforge.distill.parallel import TargetHidden
    from kdforge.distill.sampler import MicroBatchSampler
    from kdforge.distill.trainer import (
        Distiller,
        encode_dataset,
        lr_multiplier,
        make_batch,
        prepare_trainable,
        resolve_layer_map,
    )
    from kdforge.memory import return_freed_memory_to_os, reuse_freed_memory
    from kdforge.models.loading import load_model
    from kdforge.softlabels.reader import SoftLabelCache

    # A step's large buffers reused from the heap (no page faults), or given back when memory is the point.
    (return_freed_memory_to_os if cfg.release_memory else reuse_freed_memory)()
    # Validate data before loading any model: a bad file must fail in seconds.
    prefs = _load_preferences(cfg) if cfg.objective != "kd" else None
    convs = load_training_data(cfg.data) if prefs is None else None
    par, micro_per_step = _parallel(cfg)
    device = distributed.init(cfg.device)  # joins the launcher's process group (several processes)
    resume_from = distributed.on_main(_prepare_out, cfg, overwrite, resume)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    cache = SoftLabelCache(cfg.labels) if cfg.labels else None  # checks every shard before any model loads
    student, tok = load_model(cfg.student, device, dtype="float32", trust_remote_code=cfg.trust_remote_code)
    if cfg.objective in ("dpo", "kto"):
        from kdforge.data.batching import shared_vocab_size

        teacher, vocab, row_of, cross = None, shared_vocab_size(tok, student), None, None
    else:
        teacher, vocab, row_of, cross = _teacher_signal(cfg, cache, student, tok, device, par)
        if cfg.objective == "distillm2" and cross is not None:
            raise ConfigError("objective distillm2 with a student of another tokenizer is not built: use a student "
                              "that shares the teacher's vocabulary")
    if cfg.attention_loss != "none":
        student.set_attn_implementation("eager")

    def rows_for(selected) -> list[int] | None:
        if row_of is None:
            return None
        missing = [c.id for c in selected if c.id not in row_of]
        if missing:
            raise ConfigError(f"{len(missing)} conversations (e.g. {missing[0]!r}) are not in the cache "
                              f"{cfg.labels}; label the same split of the same data")
        return [row_of[c.id] for c in selected]

    if prefs is not None:
        # Preference items: (chosen, rejected) or (own, mismatched) encodings; `kept` the items themselves.
        data, kept, val_data, val_kept = _encode_preferences(cfg, tok, prefs)
    else:
        data, kept = encode_dataset(tok, select_split(convs, cfg.split), cfg.max_length)
        val_data, val_kept = (encode_dataset(tok, select_split(convs, "validation", cfg.val_limit), cfg.max_length)
                              if cfg.eval_every else ([], []))
    if not data:
        raise ConfigError(f"{cfg.data}: no conversation in split '{cfg.split}' has assistant tokens to train on")
    rows = rows_for(kept)
    val_rows = rows_for(val_kept) if val_data else None
    if cache is not None and getattr(teacher, "student_id", None) is not None:
        val_data, val_kept, val_rows = _lined_up_with_cache(cfg, cache, data, kept, rows, val_data, val_kept, val_rows)
    pairs = val_pairs = None
    if cross is not None:
        from kdforge.distill.cross_teacher import encode_pairs

        pairs = encode_pairs(cross.toks, data, kept, cfg.max_length)
        val_pairs = encode_pairs(cross.toks, val_data, val_kept, cfg.max_length)
        if distributed.is_main():
            print(f"[kdforge] cross-tokenizer distillation ({cfg.cross_tokenizer.loss}): {coverage(pairs)}", flush=True)
    device = next(student.parameters()).device
    # A served teacher has no layers to align to (alignment is refused with it): no map. Under self_distill the
    # teacher is the student's own copy: layer i is layer i (a cut student's meta maps to the layers it was cut
    # from, which this teacher does not have).
    if cfg.self_distill and cfg.layer_map is None:
        layer_map = {i: i for i in range(student.config.num_hidden_layers)}
    else:
        layer_map = (resolve_layer_map(cfg.layer_map, cfg.student, student, teacher.num_layers)
                     if teacher is not None and teacher.num_layers else {})
    projection = None
    if cfg.hidden_loss != "none" and student.config.hidden_size != teacher.hidden_size:
        # Learned map from the student's width to the teacher's; trained with the student, not shipped.
        projection = torch.nn.Linear(student.config.hidden_size, teacher.hidden_size, bias=False).to(device)
    if cfg.gradient_checkpointing:
        getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
        student.config.use_cache = False
    module, params = prepare_trainable(student, cfg.lora if cfg.method == "lora" else None, cfg.freeze)
    module.train()
    quant = None
    if cfg.quant_aware is not None:
        if par.active:
            raise ConfigError("quant_aware with several processes is not built: run it in one process (a short "
                              "stage after the main distillation)")
        from kdforge.distill.quant_aware import quant_aware

        # After the trainable set is chosen: the parametrization renames parameters, requires_grad stays with them.
        try:
            quant = quant_aware(module, cfg.quant_aware, cfg.quant_aware_keep, cfg.quant_aware_pure,
                                cfg.quant_aware_scales)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if distributed.is_main():
            print(f"[kdforge] quant_aware {cfg.quant_aware}: {len(quant.tensors)} weights on the grid "
                  f"({', '.join(f'{n} on {g}' for n, g in quant.grids.items()) or 'all on it'}), "
                  f"{len(quant.kept)} kept in full precision, {cfg.quant_aware_scales} scales", flush=True)
    all_params = params + (list(projection.parameters()) if projection is not None else [])
    groups: list[dict] = [{"params": all_params}]
    if quant is not None and quant.scale_parameters():
        groups.append({"params": quant.scale_parameters(), "lr": cfg.quant_aware_scale_lr, "weight_decay": 0.0})
    root = TargetHidden(module, projection)
    if prefs is not None and par.active:
        raise ConfigError(f"objective {cfg.objective} with several processes is not built: run it in one process")
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if par.active:
        # DDP / FSDP2 wrap the module the trainer calls; FSDP2 swaps in sharded parameters, so the
        # optimizer is built on the wrapped module's. DDP has already made every rank's weights rank 0's.
        root = par.wrap_student(root, bf16=use_bf16)
        all_params = [p for p in root.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(groups if not par.active else all_params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95),
                            **({"foreach": True} if par.shards else {"fused": True}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(
        s, cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule, cfg.min_lr_ratio))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else None
    if par.strategy == "deepspeed":
        root = par.deepspeed_engine(root, opt, micro_per_step // par.world, cfg.batch_size, cfg.max_grad_norm,
                                    use_bf16)
    taid = None
    if cfg.taid.schedule != "off":
        if cross is not None:
            raise ConfigError("taid with a student of another tokenizer is not built: the interpolation needs both "
                              "distributions over one vocabulary; set taid.schedule off")
        from kdforge.distill.taid import TaidCoefficient

        x = cfg.taid
        taid = TaidCoefficient(x.t_start, x.t_end, x.schedule, x.alpha, x.beta)
    # DPO/KTO have no teacher: their PreferenceDistiller is built below (a Distiller would also make a tied
    # embedding's gradient sparse, which only its own step turns dense again).
    distiller = (None if cfg.objective in ("dpo", "kto") else
                 Distiller(cfg.trainer_objective(), teacher, module, vocab, layer_map, projection, autocast, par, root,
                           cross, taid))
    batcher = None
    if prefs is not None:
        distiller, batcher, val_batches = _preference_training(cfg, out, tok, module, root, vocab, autocast, distiller,
                                                               data, kept, val_data, val_kept, resume_from is not None)
        lengths = [len(a.input_ids) + len(b.input_ids) for a, b in data]
    else:
        lengths = [len(e.input_ids) for e in data]
    sampler = MicroBatchSampler(lengths, [c.category for c in kept], cfg.batch_size, cfg.seed, cfg.category_weights)

    start_step, consumed = 0, 0
    log_path = out / LOG_NAME
    if resume_from is not None:
        if is_deepspeed(resume_from) != (par.strategy == "deepspeed"):
            raise ConfigError(f"{resume_from} was {'' if is_deepspeed(resume_from) else 'not '}written by DeepSpeed: "
                              "resume it with the strategy and the number of processes that wrote it (DeepSpeed's "
                              "partitions are per world size; fsdp and ddp checkpoints resume at any)")
        if is_deepspeed(resume_from):
            state, extra = load_deepspeed_checkpoint(resume_from, root)
            if state.get("world_size") != par.world:
                raise ConfigError(f"{resume_from} is a DeepSpeed checkpoint of {state.get('world_size')} processes: "
                                  "resume it with as many (fsdp and ddp checkpoints resume at any world size)")
        elif is_sharded(resume_from):
            state, extra = load_sharded_checkpoint(resume_from, root, opt)
        elif par.active:
            raise ConfigError(f"{resume_from} was written by a one-process run: resume it in one process (the "
                              "checkpoints it writes from then on resume at any world size only when written "
                              "by a parallel run)")
        else:
            state, extra = load_checkpoint(resume_from, module)
            opt.load_state_dict(extra["optimizer"])
            if projection is not None:
                projection.load_state_dict(extra["projection"])
        sched.load_state_dict(extra["scheduler"])
        if taid is not None and state.get("taid") is not None:
            taid.load_state_dict(state["taid"])
        start_step, consumed = state["step"], state["consumed_micro_batches"]
        was = state.get("micro_batches_per_step", micro_per_step)
        if was != micro_per_step:
            raise ConfigError(f"{resume_from} trained {was} micro-batches per step, this run would train "
                              f"{micro_per_step} ({distributed.world_size()} processes): set global_batch_size "
                              f"to {was * cfg.batch_size} to resume at this world size")
        if distributed.is_main():
            _truncate_log(log_path, start_step)
            print(f"[kdforge] resuming {out} from step {start_step}", flush=True)
        set_rng_states(extra["rng"])
    elif distributed.is_main():
        write_config(out, dump(cfg))
    if par.active and distributed.is_main():
        print(f"[kdforge] {par.strategy} over {par.world} processes: global batch "
              f"{micro_per_step * cfg.batch_size} = batch_size {cfg.batch_size} x grad_accum "
              f"{micro_per_step // par.world} x world {par.world}", flush=True)
    t_pad = cross.toks.teacher.pad_token_id if cross is not None else None
    if par.active and _varies(cfg.consistency.weight):
        raise ConfigError("consistency with several processes is not built: its second pass would need its own "
                          "gradient synchronisation; run it in one process")
    student_sampler = None
    if cfg.on_policy_used:
        if par.shards:
            raise ConfigError(f"on_policy with distributed.strategy {par.strategy}: sampling runs a different number "
                              "of forward passes on each rank, and sharded weights are gathered by collectives that "
                              "every rank must join; use ddp (every rank holds the student)")
        from kdforge.distill.on_policy import Rollout, StudentSampler
        from kdforge.models.loading import end_of_turn_ids

        r = cfg.rollout
        student_sampler = StudentSampler(module, tok, Rollout(r.temperature, r.top_p, r.max_new_tokens, r.batch_size),
                                         cfg.max_length, cfg.seed, end_of_turn_ids(tok, student))
    if prefs is None:
        val_batches = [make_batch(val_data[i:i + cfg.batch_size], val_rows[i:i + cfg.batch_size] if val_rows else None,
                                  tok.pad_token_id, val_pairs[i:i + cfg.batch_size] if val_pairs else None, t_pad)
                       for i in range(0, len(val_data), cfg.batch_size)]
    clipped = all_params + [p for g in groups[1:] for p in g["params"]]  # learned QAT scales too
    return _Training(cfg, out, tok, module, clipped, projection, opt, sched, distiller,
                     sampler.stream(skip=consumed), data, rows, val_batches, layer_map,
                     sampler.batches_per_epoch() / micro_per_step, start_step, consumed, log_path,
                     par, root, micro_per_step, pairs, t_pad, kept, student_sampler, cross, batcher, quant)


REFERENCE_NAME = "reference_logps.json"  # the DPO/KTO reference's sequence log-probs, made once at set-up


def _load_preferences(cfg: DistillConfig) -> dict[str, list]:
    """The preference items of the train split and the validation split (DPO, DistiLLM-2: pairs; KTO: singles)."""
    from kdforge.distill.preference_data import load_pairs, load_singles

    load = load_singles if cfg.objective == "kto" else load_pairs
    rows = load(cfg.data, "all")
    train = rows if cfg.split == "all" else [r for r in rows if r.split == cfg.split]
    if not train:
        raise ConfigError(f"{cfg.data}: no preference {'single' if cfg.objective == 'kto' else 'pair'} in split "
                          f"'{cfg.split}'; run `kdforge prefs` on data with that split, or set split")
    val = [r for r in rows if r.split == "validation"][:cfg.val_limit] if cfg.eval_every else []
    return {"train": train, "validation": val}


def _encode_preferences(cfg: DistillConfig, tok, prefs: dict[str, list]):
    """(train items, their preference records, validation items, theirs); an item is two encodings: chosen and
    rejected (DPO, DistiLLM-2) or own and mismatched completion (KTO). Items with an answer that kept no token
    (cut by max_length) are dropped."""
    from kdforge.distill.preference_step import encode_pairs, encode_singles

    def encode(records: list) -> tuple[list, list]:
        if not records:
            return [], []
        if cfg.objective == "kto":
            own, shifted = encode_singles(tok, records, cfg.max_length)
            items = list(zip(own, shifted))
        else:
            items = encode_pairs(tok, records, cfg.max_length)
        keep = [i for i, (a, b) in enumerate(items) if a.num_targets > 0 and b.num_targets > 0]
        return [items[i] for i in keep], [records[i] for i in keep]

    data, kept = encode(prefs["train"])
    val_data, val_kept = encode(prefs["validation"])
    return data, kept, val_data, val_kept


def _preference_training(cfg: DistillConfig, out: Path, tok, module, root, vocab: int, autocast, distiller,
                         data: list, kept: list, val_data: list, val_kept: list, resumed: bool):
    """The distiller, batcher and validation batches of a preference objective. DPO/KTO: the reference (the
    student as training starts) scores every sequence once; the scores are kept in the output folder, so a resumed
    run (whose student has moved) uses the same ones."""
    from kdforge.artifacts import atomic_write_json
    from kdforge.distill.preference_step import PreferenceDistiller, PreferenceObjective, batch_for, reference_logps
    from kdforge.distill.trainer import make_batch

    pad = tok.pad_token_id
    if cfg.objective == "distillm2":
        # DistiLLM-2: the teacher scores the chosen answer with skew KL and the rejected one with skew reverse KL.
        def batcher(idx):
            chosen = make_batch([data[i][0] for i in idx], None, pad)
            return [chosen, make_batch([data[i][1] for i in idx], None, pad)], ["skew_kl", "skew_reverse_kl"]
        val = [make_batch([a for a, _ in val_data[i:i + cfg.batch_size]], None, pad)
               for i in range(0, len(val_data), cfg.batch_size)]
        return distiller, batcher, val
    chunk = cfg.chunk_size or 256
    pack = cfg.pack_length if cfg.pack else None
    path = out / REFERENCE_NAME
    if resumed and path.is_file():
        refs = json.loads(path.read_text())
        if len(refs["train"]) != len(data) or len(refs["validation"]) != len(val_data):
            raise ConfigError(f"{path} scores {len(refs['train'])} items, the data has {len(data)}: resume with the "
                              "same data, or start a new --out")
    else:
        def score(items):
            flat = [e for pair in items for e in pair]
            lp = reference_logps(root, module, flat, pad, vocab, chunk, pack, cfg.batch_size)
            return [[lp[2 * i], lp[2 * i + 1]] for i in range(len(items))]
        refs = {"train": score(data), "validation": score(val_data)}
        atomic_write_json(path, refs | {"objective": cfg.objective, "student": cfg.student})
    p = cfg.preference
    objective = PreferenceObjective(cfg.objective, p.beta, p.loss_type, p.label_smoothing, p.desirable_weight,
                                    p.undesirable_weight, p.sft_weight, chunk)
    kto = cfg.objective == "kto"

    def batch(items, ref_rows, records):
        return batch_for(cfg.objective, items, ref_rows, pad, [r.desirable for r in records] if kto else None)

    def batcher(idx):
        return [batch([data[i] for i in idx], [refs["train"][i] for i in idx], [kept[i] for i in idx])], [None]

    val = [batch(val_data[i:i + cfg.batch_size], refs["validation"][i:i + cfg.batch_size],
                 val_kept[i:i + cfg.batch_size]) for i in range(0, len(val_data), cfg.batch_size)]
    return PreferenceDistiller(objective, module, root, vocab, pack, autocast), batcher, val


def coverage(pairs: list) -> str:
    """How much of the student's targets the spans cover (what the soft loss sees), for the log."""
    s_targets = sum(p.s_targets for p in pairs)
    aligned = sum(sp.s1 - sp.s0 for p in pairs for sp in p.spans)
    spans = sum(len(p.spans) for p in pairs)
    return (f"{spans} spans cover {aligned} of {s_targets} student target tokens "
            f"({100 * aligned / max(s_targets, 1):.1f}%), {sum(p.t_targets for p in pairs)} teacher tokens")


def _lined_up_with_cache(cfg: DistillConfig, cache, data: list, kept: list, rows: list[int], val_data: list,
                         val_kept: list, val_rows: list[int] | None) -> tuple[list, list, list[int] | None]:
    """A student trimmed from the cache's teacher spells text outside its trimming data in more, shorter tokens,
    whose positions the cache (per teacher token) does not have. Training conversations must line up (else the
    trimming data was not this data: refused before any step); validation ones that do not are left out of the
    cached validation (`kdforge eval` scores them, the teacher reading the same shorter tokens)."""
    from kdforge import distributed

    bad = [c.id for c, e, r in zip(kept, data, rows) if e.num_targets != cache.num_targets(r)]
    if bad:
        raise ConfigError(f"{len(bad)} training conversations (e.g. {bad[0]!r}) tokenise differently under the "
                          f"trimmed student's vocabulary ({cfg.student}) than in the cache {cfg.labels}: trim the "
                          "student on this training data (`kdforge student --trim-vocab DATA`), or distil it from "
                          "the live teacher (--teacher), which reads the student's tokens")
    if not val_data:
        return val_data, val_kept, val_rows
    ok = [i for i, (e, r) in enumerate(zip(val_data, val_rows)) if e.num_targets == cache.num_targets(r)]
    if len(ok) < len(val_data) and distributed.is_main():
        print(f"[kdforge] validation from the cache: {len(val_data) - len(ok)} of {len(val_data)} conversations "
              "tokenise differently under the trimmed vocabulary (text outside its trimming data) and are left out"
              + ("" if ok else ", so there is no validation during training") + "; `kdforge eval` scores them all",
              flush=True)
    return [val_data[i] for i in ok], [val_kept[i] for i in ok], [val_rows[i] for i in ok]


def _teacher_signal(cfg: DistillConfig, cache, student, tok, device, par):
    """(teacher signal source, the student's vocabulary size in the loss, cache row of each conversation id or
    None, a CrossSetup when the tokenizers differ or None)."""
    from kdforge.data.batching import shared_vocab_size
    from kdforge.data.formats import data_file
    from kdforge.distill.cross_teacher import CrossTeacher
    from kdforge.distill.teacher_source import CachedTeacher, LiveTeacher
    from kdforge.distill.trainer import check_same_tokenizer
    from kdforge.models.loading import load_model
    from kdforge.models.vocab_trim import same_vocabulary, trimmed_from, trimmed_from_cache
    from kdforge.softlabels.format import tokenizer_fingerprint

    if cache is not None:
        # Offline distillation: the teacher is never loaded; its labels must match this data and tokenizer.
        if cache.manifest.max_length != cfg.max_length:
            raise ConfigError(f"the cache was labelled with max_length {cache.manifest.max_length}; "
                              f"set distill.max_length to the same (now {cfg.max_length})")
        t_tok = cache.teacher_tokenizer() if cache.manifest.cross_tokenizer else None
        if t_tok is not None and not same_vocabulary(t_tok, tok):
            # A student with another tokenizer: the cache holds the teacher's own tokens, its tokenizer beside them.
            cache.check_compatible(t_tok, file_sha256(data_file(cfg.data)), cfg.data)
            cross = _cross_setup(cfg, t_tok, tok, cache.manifest.vocab_size)
            return CrossTeacher(CachedTeacher(cache), cross.toks), shared_vocab_size(tok, student), cache.rows(), cross
        kept = trimmed_from_cache(cfg.student, cache, tok) if t_tok is None else None
        if kept is not None:
            # A student trimmed from the cache's teacher: the same tokens under new ids, the cache's ids mapped.
            cache.check_compatible(tok, file_sha256(data_file(cfg.data)), cfg.data, vocabulary=False)
            return CachedTeacher(cache, kept_ids=kept), shared_vocab_size(tok, student), cache.rows(), None
        if t_tok is None and cache.manifest.tokenizer.vocab_sha256 != tokenizer_fingerprint(tok)["vocab_sha256"]:
            raise ConfigError(f"the soft-label cache {cfg.labels} was labelled for the teacher's own tokenizer and "
                              "the student tokenizes differently: label again with `--set cross_tokenizer=true` "
                              "(the cache then keeps what cross-tokenizer training needs), or train with --teacher")
        cache.check_compatible(tok, file_sha256(data_file(cfg.data)), cfg.data)
        return CachedTeacher(cache), shared_vocab_size(tok, student), cache.rows(), None
    if is_url(cfg.teacher):
        # A teacher behind a server: the top-k signal of each micro-batch through /v1/completions (every rank
        # asks for its own micro-batches); nothing of it is loaded here, nothing to shard.
        from kdforge.distill.served_teacher import ServedTeacher
        from kdforge.runtime.served import ServedRuntime

        lm = ServedRuntime.load(cfg.teacher, trust_remote_code=cfg.trust_remote_code,
                                **cfg.teacher_server.served_options())
        if not same_vocabulary(lm.tokenizer, tok):
            # Another tokenizer: the server scores its own encoding of each conversation, the spans line them up.
            t_vocab = len(lm.tokenizer)
            cross = _cross_setup(cfg, lm.tokenizer, tok, t_vocab)
            served = ServedTeacher(lm, cfg.teacher_top_k, t_vocab, own=True)
            return CrossTeacher(served, cross.toks), shared_vocab_size(tok, student), None, cross
        check_same_tokenizer(lm.tokenizer, tok)
        vocab = shared_vocab_size(tok, student)
        return ServedTeacher(lm, cfg.teacher_top_k, vocab), vocab, None, None
    placement = cfg.teacher_placement
    # A mapped or quantised teacher stays where its map put it (each rank maps its own copy over its GPUs).
    placed = placement.device_map is not None or placement.precision in QUANTIZED
    if placed and par.active and cfg.distributed.teacher == "shard":
        raise ConfigError("distributed.teacher shard and teacher_placement.device_map / int8 / 4bit exclude each "
                          "other: a sharded teacher is split by FSDP2, a mapped one by its device map")
    where = placement.load_kwargs(str(device) if placement.device == "auto" else None)
    teacher_model, teacher_tok = load_model(cfg.teacher, trust_remote_code=cfg.trust_remote_code, **where)
    if cfg.attention_loss != "none":
        # Attention probabilities are only materialised by the eager implementation.
        teacher_model.set_attn_implementation("eager")
    shard = not placed and (cfg.distributed.teacher == "shard" or (cfg.distributed.teacher == "auto" and par.shards))
    wrap = lambda m: par.wrap_teacher(m, shard)  # noqa: E731
    kept = trimmed_from(cfg.student, teacher_tok, tok)
    if kept is not None:
        # A student whose vocabulary was trimmed from this teacher's: the same tokens under new ids.
        return (LiveTeacher(teacher_model, shared_vocab_size(teacher_tok, teacher_model), wrap=wrap, kept_ids=kept),
                shared_vocab_size(tok, student), None, None)
    if not same_vocabulary(teacher_tok, tok):
        # Another tokenizer: the teacher reads its own encoding of each conversation; spans line the two up.
        t_vocab = shared_vocab_size(teacher_tok, teacher_model)
        cross = _cross_setup(cfg, teacher_tok, tok, t_vocab)
        live = LiveTeacher(teacher_model, t_vocab, wrap=wrap)
        return CrossTeacher(live, cross.toks), shared_vocab_size(tok, student), None, cross
    vocab = shared_vocab_size(tok, teacher_model, student)
    return LiveTeacher(teacher_model, vocab, wrap=wrap), vocab, None, None


def _cross_setup(cfg: DistillConfig, teacher_tok, student_tok, t_vocab: int):
    """Both tokenizers' byte tables and shared ids, and the span objective (docs/cross-tokenizer.md)."""
    from kdforge.distill.cross_losses import CrossObjective
    from kdforge.distill.cross_teacher import CrossSetup, Tokenizers
    from kdforge.models.token_bytes import TokenBytesError

    if cfg.hidden_loss != "none" or cfg.attention_loss != "none" or cfg.preset == "two_stage":
        raise ConfigError("hidden-state and attention alignment compare positions one to one, and a student with "
                          "another tokenizer has other positions: set hidden_loss and attention_loss to none")
    try:
        toks = Tokenizers.of(teacher_tok, student_tok)
    except TokenBytesError as e:
        raise ConfigError(f"cross-tokenizer distillation: {e}") from None
    x = cfg.cross_tokenizer
    uld_weight = x.uld_weight if x.uld_weight is not None else (1.0 if x.unshared == "uld" else 0.0)
    return CrossSetup(toks, t_vocab, CrossObjective(x.loss, cfg.loss, cfg.jsd_beta, cfg.skew, uld_weight,
                                                    x.uld_top_k, x.multi_token, x.unshared))


def _loop(t: _Training, t0: float) -> int:
    """Optimizer steps from ``t.start_step`` to the end; returns the target tokens trained on."""
    from tqdm import tqdm

    from kdforge import distributed
    from kdforge.distill.checkpoint import save_checkpoint, save_sharded_checkpoint
    from kdforge.distill.on_policy import is_on_policy
    from kdforge.distill.schedules import Progress
    from kdforge.distill.trainer import make_batch, step_totals

    cfg, par, main = t.cfg, t.par, distributed.is_main()
    writer = _tensorboard(t.out) if cfg.tensorboard and main else None
    bar = tqdm(total=cfg.max_steps, initial=t.start_step, desc="distill", unit="step", dynamic_ncols=True,
               disable=not main)
    window: dict[str, float] = {}
    total_targets = 0
    clock = _Clock(t0, cfg.max_minutes, list(cfg.snapshot_minutes))
    t.steps_done = t.start_step
    if clock.snapshots and (par.shards or par.strategy == "deepspeed"):
        raise ConfigError("snapshot_minutes with sharded weights (fsdp, deepspeed) is not built: use ddp or one "
                          "process, or save_every checkpoints")
    for step in range(t.start_step, cfg.max_steps):
        ts = time.time()
        progress = Progress(step, cfg.max_steps, t.steps_per_epoch)
        # The step's global micro-batches, the same list on every rank; each rank trains its share.
        indices = [next(t.stream)[1] for _ in range(t.micro_per_step)]
        t.consumed += t.micro_per_step
        on = t.student_sampler is not None and is_on_policy(cfg.seed, step, cfg.on_policy.at(progress))
        if t.batcher is not None:
            # Preference data: each item is one micro-batch for DPO/KTO, two (chosen, rejected) for DistiLLM-2.
            micro, kinds = [], []
            for idx in indices:
                got, k = t.batcher(idx)
                micro, kinds = micro + got, kinds + k
            r = (t.distiller.step(micro, progress, step_totals(micro), divergence_only=True, kinds=kinds)
                 if cfg.objective == "distillm2" else t.distiller.step(micro, progress))
        elif on:
            # The student answers this rank's prompts now; the token counts that normalise the step are global.
            micro, gen_tokens, gen_s = _sampled_batches(t, par.mine(indices), step)
            totals = par.sum_floats(dict(zip(("targets", "tokens"), step_totals(micro))))
            r = t.distiller.step(micro, progress, (int(totals["targets"]), int(totals["tokens"])),
                                 divergence_only=True)
            window["gen_tokens"] = window.get("gen_tokens", 0) + par.sum_floats({"n": gen_tokens})["n"]
            window["gen_s"] = window.get("gen_s", 0.0) + gen_s
            window["on_policy_steps"] = window.get("on_policy_steps", 0) + 1
        else:
            micro = [make_batch([t.data[i] for i in idx], [t.rows[i] for i in idx] if t.rows else None,
                                t.tok.pad_token_id, [t.pairs[i] for i in idx] if t.pairs else None, t.teacher_pad_id)
                     for idx in indices]
            r = t.distiller.step(par.mine(micro), progress, step_totals(micro))
        grad_norm = par.step(t.root, t.opt, t.params, cfg.max_grad_norm)
        t.sched.step()
        total_targets += r["targets"]
        for k in TERMS:
            window[k] = window.get(k, 0.0) + r[k] * r["targets"]
        window["targets"] = window.get("targets", 0) + r["targets"]
        window["seconds"] = window.get("seconds", 0.0) + time.time() - ts
        bar.update(1)
        # Every rank stops, and snapshots, on rank 0's clock: a budget must end the run on all of them at once.
        over_budget, due = clock.after_step(par)
        last = step + 1 == cfg.max_steps or over_budget
        row: dict[str, Any] = {}
        if (step + 1) % cfg.log_every == 0 or last:
            row = _log_row(step, progress, t.sched.get_last_lr()[0], r, grad_norm, window,
                           on_policy=t.student_sampler is not None) | r.get("extra", {})
            window = {}
            bar.set_postfix(loss=f"{row['loss']:.3f}", soft=f"{row['soft']:.3f}",
                            tok_s=f"{row['target_tokens_per_s']:.0f}")
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last) and t.val_batches:
            with clock.paused():
                t.module.eval()
                with _grid_cached(t):
                    row = (row or {"step": step + 1}) | t.distiller.evaluate(t.val_batches)
                t.module.train()
        if row and main:
            append_lines(t.log_path, [json.dumps(row)])
            if writer is not None:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(f"distill/{k}", v, row["step"])
        for minutes in due:
            with clock.paused():
                if main:
                    folder = t.out / SNAPSHOTS / f"{minutes:g}min"
                    undo = _ship_switches(cfg, t.module)  # the folder as shipped; training goes on as it was
                    try:
                        _save_final(folder, t.module, t.tok, carry=_vocab_map_of(cfg.student),
                                    extra={"snapshot.json": json.dumps({"minutes": minutes, "step": step + 1,
                                                                        "clock_minutes": round(clock.minutes(), 3)})})
                    finally:
                        undo()
        if last:
            if over_budget and main:
                print(f"[kdforge] distill: max_minutes {cfg.max_minutes:g} reached after {step + 1} of "
                      f"{cfg.max_steps} steps", flush=True)
            t.steps_done = step + 1
            break
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            state = {"consumed_micro_batches": t.consumed, "micro_batches_per_step": t.micro_per_step,
                     "world_size": par.world}
            if getattr(t.distiller, "taid", None) is not None:
                state["taid"] = t.distiller.taid.state_dict()
            if par.active:
                save_sharded_checkpoint(t.out, step + 1, state, t.root, t.opt,
                                        {"scheduler": t.sched.state_dict()}, cfg.keep_checkpoints,
                                        engine=par.strategy == "deepspeed")
            else:
                save_checkpoint(t.out, step + 1, state, t.module,
                                {"optimizer": t.opt.state_dict(), "scheduler": t.sched.state_dict(),
                                 "projection": t.projection.state_dict() if t.projection is not None else None},
                                cfg.keep_checkpoints)
    bar.close()
    if writer is not None:
        writer.close()
    return total_targets


class _Clock:
    """The stage's wall-clock for max_minutes and snapshot_minutes: from the stage's start, less the time
    spent saving snapshots and validating (what a budget buys is training, model loading included)."""

    def __init__(self, t0: float, max_minutes: float | None, snapshots: list[float]):
        self.t0, self.max_minutes, self.snapshots, self.paused_s = t0, max_minutes, snapshots, 0.0

    def minutes(self) -> float:
        return (time.time() - self.t0 - self.paused_s) / 60

    @contextlib.contextmanager
    def paused(self):
        """Time inside does not count (validation, saving a snapshot)."""
        start = time.time()
        try:
            yield
        finally:
            self.paused_s += time.time() - start

    def after_step(self, par) -> tuple[bool, list[float]]:
        """(whether the budget is spent, the snapshot minutes passed since the last call), rank 0's answer."""
        if self.max_minutes is None and not self.snapshots:
            return False, []
        now = par.broadcast_float(self.minutes())  # itself where one process runs
        due = [m for m in self.snapshots if m <= now]
        self.snapshots = [m for m in self.snapshots if m > now]
        return self.max_minutes is not None and now >= self.max_minutes, due


def _sampled_batches(t: _Training, indices: list[list[int]], step: int) -> tuple[list[dict], int, float]:
    """This rank's micro-batches of an on-policy step: the student's answers to their prompts, as training
    batches (the teacher then scores exactly the sampled tokens); generated tokens and seconds."""
    from kdforge.distill.trainer import make_batch

    micro, tokens, seconds = [], 0, 0.0
    for idx in indices:
        with _grid_cached(t):
            got = t.student_sampler.sample(idx, [t.convs[i] for i in idx], step)
        tokens, seconds = tokens + got.tokens, seconds + got.seconds
        pairs = None
        if t.cross is not None:
            # The teacher reads the sampled answer's text in its own tokenisation; spans line the two up.
            from kdforge.distill.cross_teacher import encode_pairs

            pairs = encode_pairs(t.cross.toks, got.encoded, got.conversations, t.cfg.max_length)
        micro.append(make_batch(got.encoded, None, t.tok.pad_token_id, pairs, t.teacher_pad_id))
    return micro, tokens, seconds


def _grid_cached(t: _Training):
    """Under quant_aware: the grid values computed once for a pass without gradients (evaluation, sampling),
    not once per forward (a decode step is one forward)."""
    if t.quant is None:
        return contextlib.nullcontext()
    from torch.nn.utils import parametrize

    return parametrize.cached()


def _log_row(step: int, progress, lr: float, r: dict[str, float], grad_norm: float,
             window: dict[str, float], on_policy: bool = False) -> dict[str, Any]:
    """One train_log.jsonl row: each term averaged per target token over the steps since the last row; on-policy
    runs add the steps that sampled, the tokens they generated and the seconds generating took (of ``seconds``)."""
    n = max(window["targets"], 1)
    sampled = ({"on_policy_steps": int(window.get("on_policy_steps", 0)),
                "gen_tokens": int(window.get("gen_tokens", 0)), "gen_s": round(window.get("gen_s", 0.0), 4)}
               if on_policy else {})
    return {"step": step + 1, "epoch": round(progress.epoch, 4), "lr": lr,
            **{k: window[k] / n for k in TERMS},
            **{k: r[k] for k in ("temperature", "alpha", "kd_weight", "hidden_weight", "attention_weight",
                                 "consistency_weight", "taid_t") if k in r},
            "grad_norm": grad_norm, "target_tokens": int(window["targets"]),
            "seconds": round(window["seconds"], 4),
            "target_tokens_per_s": window["targets"] / max(window["seconds"], 1e-9)} | sampled


def _finish(t: _Training, total_targets: int, t0: float) -> dict[str, Any]:
    """Save the trained student as an HF folder (LoRA merged, training switches undone), then meta.json.
    In a parallel run rank 0 writes it (under FSDP2 from the gathered full state dict)."""
    from kdforge import distributed

    cfg = t.cfg
    runtime = getattr(t.distiller.teacher, "runtime", None)
    if runtime is not None:
        runtime.close()  # a served teacher's connections
    # A collective where weights are sharded (every rank takes part); DeepSpeed's engine holds its own copy.
    state = t.par.full_state_dict(t.root) if t.par.shards or t.par.strategy == "deepspeed" else None
    if not distributed.is_main():
        return {}
    final = t.module.merge_and_unload() if cfg.method == "lora" else t.module
    final.eval()
    if t.quant is not None:
        # The latent weights become their grid values: the folder is the quantised model, and says so.
        t.quant.materialise()
        final.config.kdforge_quant_aware = t.quant.record()
    if t.distiller.tied_embedding is not None:
        t.distiller.tied_embedding.sparse = False
    if cfg.gradient_checkpointing:
        getattr(final, "activation_checkpointing_disable", final.gradient_checkpointing_disable)()
    _ship_switches(cfg, final)
    if state is not None:
        # TargetHidden's keys: "model." + the student's own names; the alignment projection is not shipped.
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        # A tied weight appears under each of its names; the HF folder keeps the first (as save_pretrained does).
        first = {n for n, _ in final.named_parameters()}
        state = {k: v for k, v in state.items()
                 if k in first or k not in {n for n, _ in final.named_parameters(remove_duplicate=False)}}
    last = _read_log(t.log_path)
    _save_final(t.out, final, t.tok, state, carry=_vocab_map_of(cfg.student), card=(dump(cfg), last))
    wall = time.time() - t0
    metrics = {"steps": t.steps_done, "target_tokens_this_run": total_targets, "train_examples": len(t.data),
               "global_batch_size": t.micro_per_step * cfg.batch_size, "world_size": t.par.world,
               "final": last[-1] if last else {}, "wall_time_s": round(wall, 1)}
    extra = {"layer_map": {str(k): v for k, v in t.layer_map.items()}, "strategy": t.par.strategy}
    write_meta(t.out, "distill", {"teacher": _existing(cfg.teacher) if cfg.teacher else None,
                                  "student": cfg.student, "data": cfg.data, "labels": cfg.labels},
               metrics, wall, extra=extra, files=FILES)
    return metrics


def _ship_switches(cfg: DistillConfig, model) -> Callable[[], None]:
    """Set the config a shipped student has where training changed it (gradient checkpointing turns the K/V cache
    off, attention alignment needs eager attention); returns what puts the training settings back. The final
    folder and every snapshot are saved through it."""
    use_cache, attn = model.config.use_cache, model.config._attn_implementation
    if cfg.gradient_checkpointing:
        model.config.use_cache = True
    if cfg.attention_loss != "none":
        model.set_attn_implementation("sdpa")

    def undo() -> None:
        model.config.use_cache = use_cache
        if cfg.attention_loss != "none":
            model.set_attn_implementation(attn)

    return undo


def _save_final(out: Path, model, tok, state: dict | None = None, carry: Path | None = None,
                card: tuple[dict, list] | None = None, extra: dict[str, str] | None = None) -> None:
    """Write the HF folder into ``out`` (beside checkpoints/ and the log), each file atomically.
    ``state``: the full state dict to write instead of the model's own (FSDP2's parameters are shards).
    ``carry``: a file of the student's folder that travels with the model (a trimmed vocabulary's id map).
    ``card``: (the resolved config, the training log's rows) for the model card (README.md) written with it.
    ``extra``: further files, {name: text}."""
    from kdforge.models.model_card import complete_model_folder, write_model_card

    with atomic_files(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state} if state is not None else {}))
        tok.save_pretrained(tmp)
        complete_model_folder(tmp, tok, model)  # chat template in both places, every end-of-turn id
        if carry is not None:
            shutil.copyfile(carry, tmp / carry.name)
        if card is not None:
            write_model_card(tmp, "distill", card[0], log_rows=card[1])
        for name, text in (extra or {}).items():  # e.g. a snapshot's step and minute
            (tmp / name).write_text(text)


def _vocab_map_of(student: str) -> Path | None:
    """A trimmed student's id map, so that the distilled folder is trimmed from the same teacher too."""
    from kdforge.models.vocab_trim import vocab_map_file

    return vocab_map_file(student)


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"))


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (the killed run's extra steps). A rewrite,
    not an append: atomic, so a kill now cannot lose the rows before the checkpoint."""
    if not path.is_file():
        return
    rows = [r for r in _read_log(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _existing(spec: str) -> str | None:
    return spec if Path(spec).exists() else None


def _read_log(path: Path) -> list[dict]:
    """The log's rows; a row torn by a kill mid-append (no newline yet) is not one."""
    return [json.loads(x) for x in read_lines(path) if x.strip()]


STAGES = (Stage("distill", "train the student on teacher answers (online teacher or a label cache)", DistillConfig,
                run, flags=("teacher", "labels", "student", "data", "out", "max_steps", "batch_size", "lr",
                            "self_distill", "quant_aware"),
                aliases={"max_steps": "steps", "self_distill": "self"},
                options={"resume": "continue from the last checkpoint in --out"}, parallel=True),)
