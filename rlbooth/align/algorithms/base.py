"""What a stage-two algorithm decides, in one interface; the loop around it (prompts, rewards, advantages,
checkpoints, logging, grids) is `rlbooth.align.train`'s and the same for every algorithm.

An algorithm picks the sampler and the weights that sample, what of a sampled batch is kept, the loss of a
batch of stored (trajectory, step) rows, and what happens at the end of an epoch; its state goes into the
checkpoint so that a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rlbooth.align.policy import StepPolicy
    from rlbooth.align.rollout import Rollout
    from rlbooth.align.train import DDPOTrainer, Samples
    from rlbooth.families import Conditioning


class Algorithm(ABC):
    """One stage-two algorithm bound to a trainer, whose models, config and accelerator it reads."""

    name: str
    """Value of `align.algorithm` that selects it."""
    policy: "StepPolicy"
    """The sampler of the epoch's samples."""

    def __init__(self, trainer: "DDPOTrainer") -> None:
        self.trainer = trainer

    def sampling_inputs(self, cond: "Conditioning") -> tuple["Conditioning", float]:
        """The rows `guided_noise` runs while sampling and the guidance scale: CFG at `align.guidance_scale`."""
        from rlbooth.align.rollout import guidance_inputs

        t = self.trainer
        return guidance_inputs(t.family, t.uncond, cond), t.cfg.guidance_scale

    def keep(self, rollout: "Rollout") -> "Rollout":
        """What of a sampled batch is stored until training: the whole trajectory (and its log-probs)."""
        return rollout

    @abstractmethod
    def loss(self, samples: "Samples", rows: torch.Tensor, step: torch.Tensor, advantages: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of stored steps `step` of samples `rows`, and its detached statistics."""

    @contextmanager
    def sampling_weights(self) -> Iterator[None]:
        """The adapter's weights while sampling (the trained ones unless the algorithm samples another policy)."""
        yield

    def end_epoch(self, optimizer_steps: int) -> None:
        """Called after an epoch's training, with the optimizer steps taken so far in the run."""

    def summary(self, logs: dict[str, Any]) -> str:
        """The algorithm's part of the per-epoch log line."""
        return ""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensor state for the checkpoint (empty: nothing beyond the trained weights)."""
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore `tensors()` from a checkpoint."""
