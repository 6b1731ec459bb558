"""Load a causal LM and its tokenizer from an HF folder, a GGUF file or the embedded teacher.

No code path here downloads anything: every spec must resolve to a local file or folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kdforge.data.chat import END_OF_TURN_MARKERS
from kdforge.models.embedded import (  # noqa: F401  (EMBEDDED_MODELS, cache_dir, embedded_gguf_path: re-exported)
    EMBEDDED_MODELS,
    EMBEDDED_PREFIX,
    ModelLoadError,
    cache_dir,
    dequantized_copy,
    embedded_gguf_path,
    ensure_embedded_folder,
)
from kdforge.models.placement import DeviceMap, MaxMemory


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: an HF folder, or a GGUF file inside ``folder``."""

    folder: Path
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def is_gguf_file(spec: str) -> bool:
    """A spec naming a .gguf file (not the embedded teacher, whose weights also ship as GGUF)."""
    return Path(spec).suffix.lower() == ".gguf" and not spec.startswith(EMBEDDED_PREFIX)


def resolve_model(spec: str) -> ModelSource:
    """Turn a user's model spec into a local source, converting the embedded teacher on first use."""
    if spec.startswith(EMBEDDED_PREFIX):
        return ModelSource(ensure_embedded_folder(spec[len(EMBEDDED_PREFIX):]))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file; expected an HF folder or a GGUF file")
        return ModelSource(path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder without config.json; expected a Hugging Face model folder "
                "(save_pretrained output) or a kdforge student/distill artifact"
            )
        return ModelSource(path)
    raise ModelLoadError(
        f"model '{spec}' not found: expected a local HF folder, a .gguf file, or one of "
        f"{', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)} (kdforge never downloads from a hub)"
    )


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when there is a GPU (this rank's own, cuda:LOCAL_RANK, under torchrun with several
    processes: ranks never share a GPU by accident), else the CPU."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from kdforge import distributed

        return torch.device(f"cuda:{distributed.local_rank()}" if distributed.launched() else "cuda")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (this project's CPUs have no bf16 hardware), bf16 on CUDA, unless told."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(
            src.folder, gguf_file=src.gguf_file, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # transformers raises many types; the user needs the path and the cause
        raise ModelLoadError(f"could not read a tokenizer from {src.display}: {_why(src, e)}") from e
    if tok.pad_token is None:
        # Padding positions are always masked, so any token id will do; eos is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    *,
    precision: str = "auto",
    device_map: DeviceMap | None = None,
    max_memory: MaxMemory | None = None,
    offload_folder: str | None = None,
):
    """Load (model, tokenizer) in eval mode: whole on ``device``, or placed by ``device_map``.

    ``precision``: bf16 | fp16 | fp32 | int8 | 4bit (int8/4bit: bitsandbytes, CUDA only; a clear error
    without them) or auto (``dtype``'s choice: bf16 on CUDA, fp32 on CPU). ``device_map``: "auto" (accelerate
    fills the GPUs, then CPU memory, then disk, each bounded by ``max_memory``, e.g. ``{0: "70GiB", "cpu":
    "200GiB"}``) or an explicit ``{module name: device}`` (``{"": 0}``: all on GPU 0); GPU numbers count
    within this rank's GPUs under torchrun (kdforge.models.placement). A placed model stays where the map
    put it: feed it inputs on :func:`input_device`.
    """
    from transformers import AutoModelForCausalLM

    from kdforge.models.placement import QUANTIZED, from_pretrained_kwargs, resolve_precision

    src = resolve_model(spec)
    placed = device_map is not None or precision in QUANTIZED
    if src.gguf_file and placed:
        raise ModelLoadError(f"{src.display}: a GGUF file is loaded whole and dequantised on one device; "
                             "device_map and int8/4bit need an HF folder (safetensors)")
    if placed:
        kw = from_pretrained_kwargs(device, dtype, precision, device_map, max_memory, offload_folder)
        dev = None
    else:
        dev = pick_device(device)
        resolve = resolve_precision(precision, dtype, dev.type == "cuda")
        kw = {"dtype": {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[resolve]}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.folder, gguf_file=src.gguf_file, trust_remote_code=trust_remote_code, **kw
        )
    except Exception as e:  # transformers raises many types; the user needs the path and the cause
        raise ModelLoadError(f"could not load a causal LM from {src.display}: {_why(src, e)}") from e
    if src.gguf_file:
        model = dequantized_copy(model)
    if dev is not None:
        model.to(dev)
    model.eval()
    return model, load_tokenizer(spec, trust_remote_code)


def input_device(model) -> torch.device:
    """Where a model's input ids go: its input embedding's device, or the execution device accelerate's hook
    gives it when the map offloaded its weights (their parameters are then on "meta")."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model: its first weight's device
        emb = None
    if emb is None:
        return next(model.parameters()).device
    hook = getattr(emb, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return emb.weight.device


def gguf_problem(path: Path) -> str | None:
    """Why a GGUF file cannot be read, in words (None when its header and tensor table are whole and
    every tensor's data lies inside the file)."""
    size = path.stat().st_size
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as e:
        return (f"the file is truncated or not a GGUF file: its header or tensor table cannot be read "
                f"({size} bytes; {type(e).__name__}: {e})")
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        return f"the file is truncated: {size} bytes, its tensors need {end}; copy or export it again"
    return None


def _why(src: ModelSource, e: Exception) -> str:
    """The loader's error, with the plain reason first when the file is a damaged GGUF."""
    problem = gguf_problem(src.folder / src.gguf_file) if src.gguf_file else None
    return f"{problem} ({e})" if problem else str(e)


def end_of_turn_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an assistant turn: eos, the chat end-of-turn marker, the model's eos."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for marker in END_OF_TURN_MARKERS:
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list):
        ids.update(int(x) for x in gen_eos)
    return sorted(ids)


def count_parameters(model) -> int:
    """Unique parameters (a tied embedding and output projection count once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def hf_folder_of(model, tokenizer, spec: str, scratch: Path) -> Path:
    """An HF folder with ``model``'s weights for a tool that loads folders (the ONNX builder, llmcompressor):
    the spec's own folder when it is one with safetensors, else the loaded model and tokenizer saved into
    ``scratch/hf`` (a GGUF file or the embedded teacher, dequantised)."""
    src = resolve_model(spec)
    if not src.gguf_file and (src.folder / "config.json").is_file() and any(src.folder.glob("*.safetensors")):
        return src.folder
    folder = Path(scratch) / "hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
