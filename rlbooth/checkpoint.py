"""Atomic, resumable checkpoints of what a run trains (not the frozen base, which can be gigabytes).

A checkpoint is a folder `step-<N>` holding the trainable weights (safetensors), the optimizer,
LR-scheduler and grad-scaler states (loaded back with `weights_only=True`) and a JSON of run state.
It is written under a temporary name and renamed, so a killed run leaves only whole checkpoints.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from accelerate import Accelerator

_NAME = re.compile(r"^step-(\d+)$")


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
                    optimizer: Any, lr_scheduler: Any, state: dict[str, Any], total_limit: int | None) -> Path:
    """Every process calls this (and waits); only the main process writes."""
    final = root / f"step-{step}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = root / f".tmp-step-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {k: p.detach().to("cpu", copy=True).contiguous()
                   for k, p in trainable_parameters(accelerator, models).items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if total_limit is not None:
            for old in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, accelerator: "Accelerator", models: dict[str, torch.nn.Module],
                    optimizer: Any, lr_scheduler: Any) -> dict[str, Any]:
    """Restore into the prepared objects in place; returns the run state saved with them."""
    params = trainable_parameters(accelerator, models)
    weights = load_file(str(path / "trainable.safetensors"))
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit this run's trainable weights "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}): was the config changed?")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(weights[key].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", map_location="cpu", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())
