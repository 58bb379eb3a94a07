"""Pieces the model-based rewards share: the dtype option, and the MLP head two of them put on an embedding."""

from __future__ import annotations

import torch

from rlbooth.rewards import RewardError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def torch_dtype(dtype: str, field: str) -> torch.dtype:
    """The torch dtype named by a reward's `dtype` option; `field` is that option's config key."""
    if dtype not in DTYPES:
        raise RewardError(f"{field}={dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class ScoreMLP(torch.nn.Module):
    """Linear layers with dropout between the first ones and no activations, embedding -> score.

    LAION's aesthetic predictor v2 and ImageReward share this head; the layer indices (0, 2, 4, 6, 7)
    match the keys of both original checkpoints.
    """

    def __init__(self, width: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)
