"""Gradient checkpointing lowers the measured peak of a training pass and leaves its gradients as they were."""

from __future__ import annotations

import pytest
import torch

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


def test_stage_one_offload_trains_the_same_lora_and_draws_the_same_grid(tmp_path, subject_photos):
    from safetensors.torch import load_file

    from rlbooth.config import load_config
    from rlbooth.personalize.train import personalize
    from rlbooth.subject import Subject

    subject = Subject(images=subject_photos, class_noun="toy", description="triangular")
    outputs = {}
    for offload in ("false", "true"):
        config = load_config("tiny-sd3", ["runtime.report_to=none", "personalize.max_train_steps=4",
                                          "personalize.validation_steps=2", f"personalize.offload_encoders={offload}"])
        outputs[offload] = personalize(config, subject, tmp_path / offload)
    a, b = (load_file(str(outputs[k] / "pytorch_lora_weights.safetensors")) for k in ("false", "true"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for step in (2, 4):  # the grids drawn with the encoders brought back
        grids = [(tmp_path / k / "samples" / f"step-{step}.png").read_bytes() for k in ("false", "true")]
        assert grids[0] == grids[1]
