"""Training checkpoints: everything needed to continue a run exactly, written atomically.

``<out>/checkpoints/step-000050/``: ``model.safetensors`` (the trained module's full state),
``state.pt`` (optimizer, scheduler, alignment projection, RNG states; read back with
``weights_only=True``), ``trainer_state.json`` (step and data position). A checkpoint is built
under a temporary name and renamed when complete, so a crash never leaves a partial one.

A parallel run (DDP or FSDP2, several processes) writes ``dcp/`` instead of ``model.safetensors``
and the optimizer: a `torch.distributed.checkpoint` of the model and optimizer state dicts, each rank
writing its own shard, keyed by parameter name. It loads at any world size (DCP re-shards on
load), in one process too; ``state.pt`` then holds the scheduler and rank 0's RNG states.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from kdforge import distributed
from kdforge.artifacts import atomic_dir, atomic_write_json, fsync_tree

_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(out: Path, step: int, trainer_state: dict[str, Any], module: torch.nn.Module,
                    extra_state: dict[str, Any], keep: int) -> Path:
    final = checkpoint_dir(out) / f"step-{step:06d}"
    # Built under a hidden temporary name (list_checkpoints ignores it) and renamed when complete.
    with atomic_dir(final, overwrite=True) as tmp:
        save_model(module, str(tmp / "model.safetensors"))  # handles tied (shared) tensors
        torch.save(extra_state | {"rng": rng_states()}, tmp / "state.pt")
        atomic_write_json(tmp / "trainer_state.json", trainer_state | {"step": step})
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, module: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore ``module`` in place; return (trainer_state, extra_state). RNG states are restored last."""
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        missing, unexpected = load_model(module, str(path / "model.safetensors"), strict=True)
        extra = torch.load(path / "state.pt", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is unreadable ({e}); delete it to resume from the one before") from e
    return trainer_state, extra


SHARDED = "dcp"  # the folder of a parallel run's checkpoint (torch.distributed.checkpoint)


def is_sharded(path: Path) -> bool:
    return (path / SHARDED).is_dir()


def is_deepspeed(path: Path) -> bool:
    return (path / DEEPSPEED).is_dir()


def load_deepspeed_checkpoint(path: Path, engine) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore a DeepSpeed engine (weights and partitioned optimizer state) at the world size that wrote it."""
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        loaded, _ = engine.load_checkpoint(str(path / DEEPSPEED), tag="step", load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError("DeepSpeed found no checkpoint there")
        extra = torch.load(path / "state.pt", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is unreadable ({e}); delete it to resume from the one before") from e
    return trainer_state, extra


DEEPSPEED = "deepspeed"  # the folder of a DeepSpeed run's checkpoint (the engine's own format)


def save_sharded_checkpoint(out: Path, step: int, trainer_state: dict[str, Any], root: torch.nn.Module,
                            opt: torch.optim.Optimizer, extra_state: dict[str, Any], keep: int,
                            engine: bool = False) -> Path:
    """Every rank calls this at the same step; each writes its shard, rank 0 the rest and the rename.
    The temporary folder's name is the same on every rank (they write into one folder). ``engine``:
    ``root`` is a DeepSpeed engine, which writes its own partitioned checkpoint."""
    final = checkpoint_dir(out) / f"step-{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp-sharded")
    if distributed.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)  # a killed run's leftover
        tmp.mkdir(parents=True)
    distributed.barrier()
    if engine:
        root.save_checkpoint(str(tmp / DEEPSPEED), tag="step", save_latest=False)
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(root, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / SHARDED))
    distributed.barrier()
    if distributed.is_main():
        torch.save(extra_state | {"rng": rng_states()}, tmp / "state.pt")
        atomic_write_json(tmp / "trainer_state.json", trainer_state | {"step": step})
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load_sharded_checkpoint(path: Path, root: torch.nn.Module,
                            opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore ``root`` and ``opt`` (plain, DDP or FSDP2, any world size) from a sharded checkpoint;
    return (trainer_state, extra_state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        model_sd, optim_sd = get_state_dict(root, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / SHARDED))
        set_state_dict(root, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = torch.load(path / "state.pt", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is unreadable ({e}); delete it to resume from the one before") from e
    return trainer_state, extra
