"""Which stored steps of each trajectory stage two trains on, and where the window of them sits each epoch.

DDPO draws a random subset of the window's steps per sample (`random`); Flow-GRPO trains the first
floor(N x timestep_fraction) steps of every trajectory in order (`first`), so at its 0.99 x 10 steps the
last, near-deterministic step (std about 0.006 on SD3) is never trained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rlbooth.config import AlignConfig


def window_steps(cfg: "AlignConfig", epoch: int) -> list[int]:
    """The steps of align.timestep_window at `epoch`: where it was set, or slid by align.window_stride every
    align.window_shift_every epochs (MixGRPO's progressive windows), over the positions where it holds all
    its steps, then from its start again; so every epoch trains the same number of steps."""
    steps = cfg.train_steps
    if not cfg.window_shift_every:
        return steps
    width = len(steps)
    positions = range(steps[0], cfg.num_steps - width + 1, cfg.window_stride or width)
    start = positions[(epoch // cfg.window_shift_every) % len(positions)]
    return list(range(start, start + width))


def trained_steps(cfg: "AlignConfig", epoch: int, sample_indices: Tensor, seed_of: Callable[[int], int]) -> Tensor:
    """(N, align.num_train_timesteps) step indices for the samples `sample_indices`, in training order, from the
    window at `epoch`; `random` keys each sample's draw by `seed_of(its global index)`, so a resumed run draws
    the same."""
    pool, k = torch.tensor(window_steps(cfg, epoch)), cfg.num_train_timesteps
    if cfg.train_step_selection == "first":
        return pool[:k].expand(len(sample_indices), k).clone()
    return torch.stack([pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed_of(int(i))))[:k]]
                        for i in sample_indices])
