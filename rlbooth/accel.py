"""Accelerator set-up shared by both stages: precision, tracker logging (TensorBoard, W&B), and friendly checks."""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlbooth.config import ConfigError, RuntimeConfig

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from PIL import Image


def check_runtime(runtime: RuntimeConfig) -> None:
    """Fail before loading anything when the precision or the tracker cannot run here."""
    import torch

    if runtime.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("runtime.mixed_precision: fp16 needs a CUDA GPU; on this machine use "
                          "`--set runtime.mixed_precision=no` (or bf16)")
    if runtime.report_to == "wandb" and find_spec("wandb") is None:
        raise ConfigError("runtime.report_to: wandb is not installed; `pip install wandb` (then `wandb login`), "
                          "or choose tensorboard or none")


def make_accelerator(runtime: RuntimeConfig, output_dir: Path, gradient_accumulation_steps: int = 1
                     ) -> "Accelerator":
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if runtime.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if runtime.report_to == "wandb":  # W&B's local run files beside the stage's other logs, not in the cwd
        os.environ.setdefault("WANDB_DIR", str(output_dir / "logs"))
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        # Without this, accelerate runs each torchrun process on CPUs as a separate single-process job.
        cpu=world_size > 1 and not torch.cuda.is_available(),
        mixed_precision=runtime.mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=None if runtime.report_to == "none" else runtime.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"launched as {world_size} processes but accelerate set up {accelerator.num_processes}: "
                           "each would train on its own")
    return accelerator


def weight_dtype(accelerator: "Accelerator") -> "torch.dtype":
    """The dtype frozen weights are kept in; trainable ones stay float32."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def sampling_autocast(accelerator: "Accelerator") -> "torch.dtype | None":
    """The dtype images are drawn under autocast in (grids, class images, held-out sets): the frozen weights'
    16-bit dtype, since the trained ones stay float32 beside them; None in full precision."""
    import torch

    dtype = weight_dtype(accelerator)
    return None if dtype == torch.float32 else dtype


def flat_hparams(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard's hparams take scalars only: nested keys are dotted, lists and None become strings."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def log_grid(accelerator: "Accelerator", tag: str, grid: "Image.Image", step: int) -> None:
    """A sample grid to every tracker that is on (each takes images its own way)."""
    import numpy as np

    pixels = np.asarray(grid.convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: pixels[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [pixels]}, step=step)


def backward_and_step(accelerator: "Accelerator", loss: "torch.Tensor", params: list, max_grad_norm: float,
                      optimizer: Any, lr_scheduler: Any) -> None:
    """One accumulation micro-step; inside `accelerator.accumulate` the optimizer acts only on sync steps."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
