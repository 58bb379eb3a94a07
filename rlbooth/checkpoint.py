"""Atomic, resumable checkpoints of what a run trains (not the frozen base, which can be gigabytes).

A checkpoint is a folder `step-<N>` holding the trainable weights (safetensors), the optimizer,
LR-scheduler and grad-scaler states (loaded back with `weights_only=True`) and a JSON of run state.
It is written under a temporary name (`.tmp-step-<N>`) and renamed, so a killed run leaves only whole
checkpoints; a temporary left by a kill is never loaded and is removed by the next save. A full disk
during a save leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from rlbooth.errors import RlboothError
from rlbooth.files import (DiskFullError, check_safetensors, check_torch_file, kill_point, load_safetensors,
                           load_torch, read_json, replacing)

if TYPE_CHECKING:
    from accelerate import Accelerator

_NAME = re.compile(r"^step-(\d+)$")
WEIGHTS, STATE, EXTRA = "trainable.safetensors", "state.json", "extra.safetensors"
STATE_FILES = ("optimizer.pt", "lr_scheduler.pt")


class CheckpointError(RlboothError, ValueError):
    """A checkpoint's files are missing or damaged; the message says which and how to resume without it."""


def trainable_parameters(accelerator: "Accelerator", models: dict[str, torch.nn.Module]
                         ) -> dict[str, torch.nn.Parameter]:
    return {f"{name}.{pname}": p
            for name, model in models.items()
            for pname, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(accelerator: "Accelerator", root: Path, step: int, models: dict[str, torch.nn.Module],
                    optimizer: Any, lr_scheduler: Any, state: dict[str, Any], total_limit: int | None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Every process calls this (and waits); only the main process writes. `extra_tensors` (a stage-two
    algorithm's state, e.g. DiffusionNFT's old policy) go to their own file, written only when given."""
    final = root / f"step-{step}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a kill inside an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        try:
            with replacing(final, f".tmp-step-{step}") as tmp:
                tmp.mkdir()
                weights = {k: p.detach().to("cpu", copy=True).contiguous()
                           for k, p in trainable_parameters(accelerator, models).items()}
                save_file(weights, str(tmp / WEIGHTS))
                if extra_tensors:
                    save_file({k: t.detach().to("cpu", copy=True).contiguous() for k, t in extra_tensors.items()},
                              str(tmp / EXTRA))
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
                if accelerator.scaler is not None:
                    torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
                (tmp / STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
                kill_point("checkpoint-write")
        except DiskFullError as err:
            previous = latest_checkpoint(root)
            raise DiskFullError(f"{err}. The last whole checkpoint, {previous}, is intact" if previous else
                                f"{err}. No checkpoint had been written yet") from None
        if total_limit is not None:
            for old in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _hint(path: Path) -> str:
    earlier = [p for p in list_checkpoints(path.parent) if p != path]
    return (f"remove the folder {path} to resume from {earlier[-1].name}" if earlier else
            f"remove the folder {path} to start the stage over")


def check_checkpoint(path: Path) -> None:
    """The files of a checkpoint open (headers, zip directories, JSON): checked before any model is loaded."""
    hint = _hint(path)
    check_safetensors(path / WEIGHTS, "checkpoint weights", hint, CheckpointError)
    if (path / EXTRA).is_file():
        check_safetensors(path / EXTRA, "checkpoint extra tensors", hint, CheckpointError)
    for name in STATE_FILES:
        check_torch_file(path / name, "checkpoint state", hint, CheckpointError)
    read_json(path / STATE, "checkpoint run state", hint, CheckpointError)


def load_checkpoint(path: Path, accelerator: "Accelerator", models: dict[str, torch.nn.Module],
                    optimizer: Any, lr_scheduler: Any) -> dict[str, Any]:
    """Restore into the prepared objects in place; returns the run state saved with them."""
    hint = _hint(path)
    params = trainable_parameters(accelerator, models)
    weights = load_safetensors(path / WEIGHTS, "checkpoint weights", hint, CheckpointError)
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit this run's trainable weights "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}): was the config changed?")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(weights[key].to(param.device, param.dtype))
    optimizer.load_state_dict(load_torch(path / "optimizer.pt", "checkpoint state", hint, CheckpointError))
    lr_scheduler.load_state_dict(load_torch(path / "lr_scheduler.pt", "checkpoint state", hint, CheckpointError))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(load_torch(path / "scaler.pt", "checkpoint state", hint, CheckpointError))
    return read_json(path / STATE, "checkpoint run state", hint, CheckpointError)


def load_extra_tensors(path: Path, device: Any) -> dict[str, torch.Tensor]:
    """The `extra_tensors` saved with a checkpoint (none if it has none)."""
    if not (path / EXTRA).is_file():
        return {}
    tensors = load_safetensors(path / EXTRA, "checkpoint extra tensors", _hint(path), CheckpointError)
    return {k: t.to(device) for k, t in tensors.items()}
