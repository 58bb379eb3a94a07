"""Gradient checkpointing lowers the measured peak of a training pass and leaves its gradients as they were."""

from __future__ import annotations

import pytest

from rlbooth.memory import Case, measure


MID_UNET = {"block_out_channels": [64, 128], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 64, "layers_per_block": 2,
            "attention_head_dim": 8, "sample_size": 32}


@pytest.mark.slow
def test_gradient_checkpointing_lowers_the_measured_peak_of_a_pass():
    """A mid-size UNet (18 M parameters) at batch 2, 256 px: each pass in a fresh process, peak RSS measured."""
    case = Case("diffusers", "UNet2DConditionModel", MID_UNET, "sd", batch=2, latent=32, dtype="float32")
    plain, checkpointed = measure(case), measure(Case(**{**case.__dict__, "checkpointing": True}))
    assert checkpointed["grad_sum"] == plain["grad_sum"]
    assert checkpointed["peak_bytes"] < 0.85 * plain["peak_bytes"]
