"""The real flow-model presets: stage two as their references set it, on modules their transformers have."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from rlbooth.config import load_config


@pytest.mark.parametrize("preset, model", [("sd35-lora", SD3Transformer2DModel), ("flux-lora", FluxTransformer2DModel)])
def test_every_stage_two_lora_target_is_in_the_real_transformer(preset, model):
    """Flow-GRPO's targets include the text stream's projections (add_q/k/v_proj, to_add_out)."""
    with torch.device("meta"):
        transformer = model()  # diffusers' defaults: the released architectures, on the meta device
    names = [name for name, _ in transformer.named_modules()]
    targets = load_config(preset).align.lora_target_modules
    assert {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} <= set(targets)
    for target in targets:
        assert any(name.endswith(f".{target}") for name in names), target


def test_flow_presets_take_their_references_stage_two():
    sd35, flux = load_config("sd35-lora").align, load_config("flux-lora").align
    # Flow-GRPO, SD3.5-M: 10 steps, CFG 4.5, a = 0.7, steps 0-8, its KL form and beta, independent groups
    assert (sd35.num_steps, sd35.guidance_scale, sd35.flow_noise_level) == (10, 4.5, 0.7)
    assert (sd35.train_steps[:sd35.num_train_timesteps], sd35.train_step_selection) == (list(range(9)), "first")
    assert (sd35.kl_form, sd35.kl_coef, sd35.group_noise, sd35.group_std) == ("flow_grpo", 0.04, "independent",
                                                                               "rewards")
    # DanceGRPO, FLUX.1-dev: 16 steps, guidance input 3.5, constant eta 0.3, 60% of the steps but the last
    assert (flux.num_steps, flux.guidance_scale, flux.flow_noise_schedule, flux.flow_noise_level) == \
        (16, 3.5, "constant", 0.3)
    assert 15 not in flux.train_steps and flux.num_train_timesteps == int(16 * 0.6)
    assert (flux.samples_per_noise, flux.group_noise) == (12, "shared")
