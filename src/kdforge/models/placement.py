"""Where a teacher's weights go and in what precision: one device, or a device map across GPUs, CPU memory
and disk; bf16, fp16, fp32, or int8 / 4-bit through bitsandbytes.

:class:`TeacherPlacement` declares the fields once (generate and label take them as their own flat fields,
``--set device_map=auto``, ``--set 'max_memory={0: 70GiB, cpu: 200GiB}'``, ``--precision int8``) and
`kdforge.models.loading.load_model` takes them as keyword arguments (``**placement.load_kwargs()``).
This module stays light (pydantic only) so that stage modules can import it for their configs; what
needs torch, accelerate or transformers is imported inside the functions that load.

Under ``torchrun`` with several processes on a node, each rank places its own replica: GPU numbers in
``device_map`` / ``max_memory`` count within the rank's share of the node's GPUs (local rank l of L takes
GPUs l·g .. l·g+g-1, g = visible GPUs // L), so one config means the same at any world size.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdforge.config import ConfigError, Dtype

Precision = Literal["auto", "bf16", "fp16", "fp32", "int8", "4bit"]
QUANTIZED = ("int8", "4bit")  # bitsandbytes precisions: weights quantized on load, CUDA only
# The older ``dtype`` spelling of the float precisions, both ways.
PRECISION_OF_DTYPE = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DTYPE_OF_PRECISION = {v: k for k, v in PRECISION_OF_DTYPE.items()}
BNB_HINT = "`pip install bitsandbytes` (it quantizes on a CUDA GPU only)"

DeviceMap = Literal["auto"] | dict[str, int | str]
MaxMemory = dict[int | str, int | str]

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_CUDA_RE = re.compile(r"cuda:(\d+)")
HOST_DEVICES = ("cpu", "disk")  # the device names a map may use besides GPU numbers


def size_bytes(value: int | str) -> int:
    """``"70GiB"`` / ``"500MB"`` / an int of bytes -> bytes (binary and decimal units, as accelerate reads them)."""
    if isinstance(value, bool):
        raise ValueError(f"memory size {value!r}: expected bytes or a size such as '70GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"memory size {value}: must not be negative")
        return value
    m = _SIZE_RE.fullmatch(str(value))
    if not m:
        raise ValueError(f"memory size {value!r}: expected bytes or a size such as '70GiB', '500MB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def map_device(value: int | str) -> int | str:
    """A device as a map names it -> 0, 1, ... (GPU numbers) or 'cpu' / 'disk'; 'cuda:1' and '1' are GPU 1."""
    if isinstance(value, bool):
        raise ValueError(f"device {value!r}: expected a GPU number, 'cuda:N', 'cpu' or 'disk'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"device {value}: GPU numbers start at 0")
        return value
    text = str(value).strip().lower()
    if text.isdigit():
        return int(text)
    if m := _CUDA_RE.fullmatch(text):
        return int(m.group(1))
    if text in ("cuda", "gpu"):
        return 0
    if text in HOST_DEVICES:
        return text
    raise ValueError(f"device {value!r}: expected a GPU number, 'cuda:N', 'cpu' or 'disk'")


class TeacherPlacement(BaseModel):
    """Where the teacher is loaded and in what precision (mixed into the generate and label configs)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    device: str = Field("auto", description="the whole teacher on one device: auto (this rank's GPU, else the "
                        "CPU), cpu, cuda, cuda:N; leave auto with device_map")
    dtype: Dtype = Field("auto", description="older spelling of precision (float32, bfloat16, float16)")
    precision: Precision = Field("auto", description="teacher weights: bf16, fp16, fp32, or int8 / 4bit through "
                                 "bitsandbytes (CUDA only); auto: bf16 on CUDA, fp32 on CPU")
    device_map: DeviceMap | None = Field(None, description="spread the teacher over devices: 'auto' (accelerate "
                                         "fills GPUs, then CPU memory, bounded by max_memory) or an explicit "
                                         "{module: device} map; GPU numbers count within this rank's GPUs")
    max_memory: MaxMemory | None = Field(None, description="with device_map auto: the most each device may hold, "
                                         "e.g. {0: 70GiB, cpu: 200GiB} (GPU numbers, cpu, disk)")
    offload_folder: str | None = Field(None, description="folder for weights placed on 'disk' by device_map or "
                                       "max_memory")

    @model_validator(mode="after")
    def _check_placement(self) -> TeacherPlacement:
        # dtype and precision name the same thing for float weights: keep them in step, so that a config
        # that says dtype: float32 and one that says precision: fp32 resume each other.
        said = PRECISION_OF_DTYPE[self.dtype]
        if said != "auto" and self.precision != "auto" and self.precision not in QUANTIZED and said != self.precision:
            raise ValueError(f"dtype {self.dtype} and precision {self.precision} disagree; set precision only")
        if self.precision == "auto" and said != "auto":
            object.__setattr__(self, "precision", said)
        elif self.precision in DTYPE_OF_PRECISION and self.dtype == "auto":
            object.__setattr__(self, "dtype", DTYPE_OF_PRECISION[self.precision])
        if self.device_map is not None and self.device != "auto":
            raise ValueError(f"device {self.device!r} and device_map both place the teacher: with a device_map "
                             "leave device at auto")
        if self.max_memory is not None and self.device_map != "auto":
            raise ValueError("max_memory bounds device_map=auto; set device_map: auto (an explicit map places "
                             "every module itself)")
        devices: list[int | str] = []
        if isinstance(self.device_map, dict):
            if not self.device_map:
                raise ValueError("device_map is empty: give 'auto' or {module: device}, e.g. {'': 0}")
            devices += [map_device(v) for v in self.device_map.values()]
        if self.max_memory is not None:
            if not self.max_memory:
                raise ValueError("max_memory is empty: give memory per device, e.g. {0: 70GiB, cpu: 200GiB}")
            for key, value in self.max_memory.items():
                devices.append(map_device(key))
                size_bytes(value)
        if "disk" in devices and not self.offload_folder:
            raise ValueError("a device_map or max_memory with 'disk' needs offload_folder (where those weights go)")
        return self

    def load_kwargs(self, device: str | None = None) -> dict[str, Any]:
        """The keyword arguments of `kdforge.models.loading.load_model` (``device``: this rank's device, e.g.
        what `kdforge.distributed.init` returned, instead of the config's)."""
        return {"device": device or self.device, "dtype": self.dtype, "precision": self.precision,
                "device_map": self.device_map, "max_memory": self.max_memory, "offload_folder": self.offload_folder}


def earlier_precision(previous: dict[str, Any]) -> dict[str, Any]:
    """An earlier run's config.yaml for a resume check: one written before ``precision`` existed ran at its
    ``dtype``'s precision, and says so now (so that resuming it is not refused as "precision not set")."""
    if "precision" in previous or previous.get("dtype", "auto") not in PRECISION_OF_DTYPE:
        return previous
    return {**previous, "precision": PRECISION_OF_DTYPE[previous.get("dtype", "auto")]}


def resolve_precision(precision: str, dtype: str, cuda: bool) -> str:
    """One of bf16, fp16, fp32, int8, 4bit: what ``precision`` (or the older ``dtype``) asks for, auto resolved
    (bf16 on CUDA, fp32 on CPU: this project's CPUs have no fast bf16)."""
    said = PRECISION_OF_DTYPE.get(dtype)
    if said is None:
        raise ConfigError(f"dtype must be one of {', '.join(PRECISION_OF_DTYPE)}, not {dtype!r}")
    if precision not in ("auto", "bf16", "fp16", "fp32", *QUANTIZED):
        raise ConfigError(f"precision must be one of auto, bf16, fp16, fp32, int8, 4bit, not {precision!r}")
    if said != "auto" and precision not in ("auto", *QUANTIZED) and said != precision:
        raise ConfigError(f"dtype {dtype} and precision {precision} disagree; set precision only")
    chosen = precision if precision != "auto" else said
    if chosen == "auto":
        return "bf16" if cuda else "fp32"
    return chosen


def check_available(precision: str) -> None:
    """Fail now, in one line, when ``precision`` needs what this machine lacks (int8 / 4bit: bitsandbytes and
    CUDA), before a stage creates its folder or reads any weights."""
    if precision not in QUANTIZED:
        return
    import importlib.util

    import torch

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed")
    if not torch.cuda.is_available():
        missing.append("this machine has no CUDA GPU")
    if missing:
        raise ConfigError(f"precision {precision} quantizes the teacher with bitsandbytes, which needs a CUDA GPU: "
                          f"{' and '.join(missing)}. Install it with {BNB_HINT}, or use precision bf16 (fp32 on CPU)")


def local_gpus(visible: int, local_rank: int, local_world: int) -> list[int]:
    """The node's GPUs this rank may place a device map on: local rank l of L takes g = visible // L of them,
    l·g .. l·g+g-1 (all of them in one process). Ranks never share a GPU."""
    if local_world <= 1 or visible == 0:
        return list(range(visible))
    per = visible // local_world
    if per == 0:
        raise ConfigError(f"{local_world} processes on this node share {visible} GPU(s): with a device_map each "
                          f"rank needs GPUs of its own; launch at most {visible} process(es) per node")
    return list(range(local_rank * per, (local_rank + 1) * per))


def localize(device_map: DeviceMap | None, max_memory: MaxMemory | None,
             gpus: list[int]) -> tuple[Any, dict[int | str, int] | None]:
    """``device_map`` / ``max_memory`` with GPU numbers relative to this rank's ``gpus`` made absolute and sizes
    in bytes (what transformers' ``from_pretrained`` takes)."""

    def absolute(dev: int | str) -> int | str:
        d = map_device(dev)
        if isinstance(d, str):
            return d
        if d >= len(gpus):
            have = f"GPUs {gpus}" if gpus else "no GPU"
            raise ConfigError(f"device {dev!r} in device_map/max_memory: this rank has {have} "
                              f"(numbers count from 0 within them)")
        return gpus[d]

    dmap = {k: absolute(v) for k, v in device_map.items()} if isinstance(device_map, dict) else device_map
    mem = {absolute(k): size_bytes(v) for k, v in max_memory.items()} if max_memory is not None else None
    return dmap, mem


def _rank_share() -> tuple[int, int]:
    """(local rank, processes on this node) under torchrun / accelerate launch; (0, 1) in one process."""
    from kdforge import distributed

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world_size()))
    return distributed.local_rank(), max(local_world, 1)


def from_pretrained_kwargs(device: str, dtype: str, precision: str, device_map: DeviceMap | None,
                           max_memory: MaxMemory | None, offload_folder: str | None) -> dict[str, Any]:
    """The placement as transformers' ``from_pretrained`` keyword arguments: ``dtype`` always; ``device_map``,
    ``max_memory``, ``offload_folder``, ``quantization_config`` when placed by a map or quantized (such a
    model is dispatched on load and must not be moved with ``.to()`` afterwards). ``device`` applies only
    without a map; int8 / 4bit without a map are loaded whole on that (CUDA) device."""
    import torch

    from kdforge.models.loading import pick_device

    cuda = torch.cuda.is_available() if device_map is not None else pick_device(device).type == "cuda"
    chosen = resolve_precision(precision, dtype, cuda)
    check_available(chosen)
    float_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    kw: dict[str, Any] = {}
    if chosen in QUANTIZED:
        # Unquantized parts (norms, the output head) and 4-bit matmuls run in bf16 unless dtype says otherwise.
        compute = float_dtype.get(PRECISION_OF_DTYPE[dtype], torch.bfloat16)
        kw["dtype"] = compute
        if device_map is None:
            dev = pick_device(device)  # this rank's GPU: an absolute number, not one within a share
            if dev.type != "cuda":
                raise ConfigError(f"precision {chosen} runs on a CUDA GPU, not on {dev}: use device auto or cuda")
            kw["device_map"] = {"": dev.index if dev.index is not None else torch.cuda.current_device()}
    else:
        kw["dtype"] = float_dtype[chosen]
    if device_map is not None:
        gpus = local_gpus(torch.cuda.device_count(), *_rank_share())
        dmap, mem = localize(device_map, max_memory, gpus)
        if dmap == "auto" and mem is None and _rank_share()[1] > 1 and gpus:
            mem = _rank_default_memory(gpus, _rank_share()[1])
        kw["device_map"] = dmap
        if mem is not None:
            kw["max_memory"] = mem
        if offload_folder:
            kw["offload_folder"] = offload_folder
    if chosen in QUANTIZED:
        from transformers import BitsAndBytesConfig

        values = kw["device_map"].values() if isinstance(kw["device_map"], dict) else ()
        offloads = kw["device_map"] == "auto" or any(v in HOST_DEVICES for v in values)
        if chosen == "int8":
            # Modules that land on the CPU stay fp32 there (bitsandbytes' int8 kernels are CUDA only).
            q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offloads)
        else:
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=kw["dtype"],
                                   llm_int8_enable_fp32_cpu_offload=offloads)
        kw["quantization_config"] = q
    return kw


def _rank_default_memory(gpus: list[int], local_world: int) -> dict[int | str, int]:
    """device_map auto without max_memory, one of several ranks on a node: this rank's GPUs (their free
    memory) and its share of the CPU memory, so that ranks never fill each other's devices."""
    from accelerate.utils import get_max_memory

    every = get_max_memory()
    mem: dict[int | str, int] = {g: every[g] for g in gpus if g in every}
    if "cpu" in every:
        mem["cpu"] = every["cpu"] // local_world
    return mem


def precision_of(model) -> str:
    """What a loaded model's weights are: int8 / 4bit (bitsandbytes), else bf16 / fp16 / fp32 (the label
    cache records it)."""
    if getattr(model, "is_loaded_in_4bit", False):
        return "4bit"
    if getattr(model, "is_loaded_in_8bit", False):
        return "int8"
    q = getattr(model.config, "quantization_config", None)
    get = q.get if isinstance(q, dict) else (lambda k, d=None: getattr(q, k, d))
    if q is not None and get("load_in_4bit", False):
        return "4bit"
    if q is not None and get("load_in_8bit", False):
        return "int8"
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(model.dtype, str(model.dtype))


class ServedTeacher(BaseModel):
    """A teacher behind a vLLM-compatible server (a model spec ``http(s)://host:port/v1[#name]``, several
    comma-separated): its local tokenizer and how requests are sent (`kdforge.runtime.served`). Generate
    and label take these as flat fields (``--set tokenizer=DIR``); they do not apply to a local teacher."""

    model_config = ConfigDict(extra="forbid")

    tokenizer: str | None = Field(None, description="served teacher (http(s)://...): the teacher's tokenizer "
                                  "folder (checked against the server's /tokenize on a probe text)")
    request_concurrency: int = Field(4, gt=0, le=1024, description="served teacher: requests in flight per URL")
    request_timeout: float = Field(600.0, gt=0, description="served teacher: seconds one request may take")
    request_retries: int = Field(8, ge=0, le=100, description="served teacher: retries (exponential backoff) "
                                 "of a request after a connection error, timeout, 429 or 502/503/504")

    def served_options(self) -> dict[str, Any]:
        """`kdforge.runtime.served.ServedRuntime.load`'s keyword arguments."""
        return {"tokenizer": self.tokenizer, "max_in_flight": self.request_concurrency,
                "timeout": self.request_timeout, "retries": self.request_retries}


# The served-teacher fields that schedule requests (a resumed run may change them), and an earlier run's
# config.yaml as the resume check reads it: one written before these fields existed had no tokenizer.
SERVED_MAY_CHANGE = frozenset({"request_concurrency", "request_timeout", "request_retries"})


def is_url(spec: str) -> bool:
    """A served model's spec (`kdforge.runtime.served.is_served_spec`, without importing the runtime)."""
    return isinstance(spec, str) and spec.strip().lower().startswith(("http://", "https://"))


def earlier_served(previous: dict[str, Any]) -> dict[str, Any]:
    return {"tokenizer": None, **previous}
