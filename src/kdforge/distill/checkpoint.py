"""Training checkpoints: everything needed to continue a run exactly, written atomically.

``<out>/checkpoints/step-000050/``: ``model.safetensors`` (the trained module's full state),
``state.pt`` (optimizer, scheduler, alignment projection, RNG states; read back with
``weights_only=True``), ``trainer_state.json`` (step and data position). A checkpoint is built
under a temporary name and renamed when complete, so a crash never leaves a partial one.
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

from kdforge.artifacts import atomic_dir, atomic_write_json

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
