"""Stage LoRA files with wide `lora_target_modules`: plain diffusers' `load_lora_weights` restores every
trained module (attention, feed-forward, convs, time embedding, samplers) and the same pixels on every family;
a file of the older mixed layout is read under peft's names, and its conversion command rewrites it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlbooth.config import TinyModelConfig
from rlbooth.families import get_family
from rlbooth.models import (TEXT_ENCODER_LORA_TARGETS, add_lora, legacy_lora_layout, main, readable_lora,
                            save_lora)
from rlbooth.stages import LORA_WEIGHTS

WIDE_TARGETS = {  # every kind of layer the family's denoiser has, not only the attention projections
    "unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
             "conv2", "conv_shortcut", "time_emb_proj", "linear_1", "linear_2", "conv", "conv_in", "conv_out"],
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "net.0.proj", "net.2", "linear", "linear_1", "linear_2", "proj", "proj_out", "proj_mlp",
                    "x_embedder", "context_embedder"],
}
LORA_KINDS = {  # module names that must come back LoRA'd, by denoiser (the list)
    "unet": {"to_q", "ff.net.2", "proj_in", "conv1", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
             "conv_in", "conv_out", "time_embedding.linear_1"},
    "transformer": {"to_q", "ff.net.2", "add_q_proj", "norm1.linear", "timestep_embedder.linear_1", "proj_out"},
}


def lora_modules(model: torch.nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def trained_pipeline(family_name: str):
    """A tiny pipeline with wide LoRAs on its denoiser and LoRA'd text encoders, B drawn non-zero (as trained)."""
    family = get_family(family_name)
    pipe = family.build_tiny(TinyModelConfig())
    models = {family.denoiser: getattr(pipe, family.denoiser)}
    models |= {name: getattr(pipe, name) for name in family.lora_text_encoders}
    torch.manual_seed(1)
    for name, model in models.items():
        add_lora(model, 4, 2.0, WIDE_TARGETS[family.denoiser] if name == family.denoiser
                 else TEXT_ENCODER_LORA_TARGETS)
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                torch.nn.init.normal_(param, std=0.2)
    return family, pipe, models


def pixels(pipe) -> torch.Tensor:
    from rlbooth.families import family_of

    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo", num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="pt",
               generator=torch.Generator().manual_seed(0), **family_of(pipe).call_kwargs(pipe))
    return out.images


@pytest.mark.parametrize("family_name", ["sd", "sdxl", "sd3", "flux"])
def test_wide_target_lora_loads_every_module_in_plain_diffusers(tmp_path: Path, family_name: str):
    family, pipe, models = trained_pipeline(family_name)
    save_lora(tmp_path, family, models)
    fresh = family.build_tiny(TinyModelConfig())
    base = pixels(fresh)
    fresh.load_lora_weights(tmp_path)  # plain diffusers, as a user's own script or the model card does
    for name, model in models.items():
        loaded = lora_modules(getattr(fresh, name))
        assert loaded == lora_modules(model), name
        if name == family.denoiser:
            kinds = {kind for kind in LORA_KINDS[name] if any(m.endswith(kind) for m in loaded)}
            assert kinds == LORA_KINDS[name]
    expected, got = pixels(pipe), pixels(fresh)
    assert (expected - base).abs().max() > 1e-2  # the LoRA changes the image, so equal pixels mean something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.fixture
def legacy_file(tmp_path: Path):
    """An SD stage LoRA written as rlbooth wrote it before issue 34: diffusers' older names for the
    attention projections (`convert_state_dict_to_diffusers`) next to peft's for everything else."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from rlbooth import models as models_module

    family, pipe, models = trained_pipeline("sd")
    old = models_module.lora_layers
    models_module.lora_layers = lambda model, adapter_name="default": convert_state_dict_to_diffusers(
        get_peft_model_state_dict(model, adapter_name=adapter_name))
    try:
        save_lora(tmp_path, family, models)
    finally:
        models_module.lora_layers = old
    return tmp_path, pipe


def keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / LORA_WEIGHTS), "pt") as f:
        return list(f.keys())


def test_older_mixed_layout_is_read_under_peft_names(legacy_file):
    folder, pipe = legacy_file
    assert legacy_lora_layout(keys(folder))
    plain = get_family("sd").build_tiny(TinyModelConfig())
    plain.load_lora_weights(folder)  # what went wrong: the attention LoRAs are dropped
    assert not any("to_q" in name for name in lora_modules(plain.unet))
    fresh = get_family("sd").build_tiny(TinyModelConfig())
    with readable_lora(folder) as source:
        fresh.load_lora_weights(source)
    assert lora_modules(fresh.unet) == lora_modules(pipe.unet)
    torch.testing.assert_close(pixels(fresh), pixels(pipe), atol=1e-5, rtol=0)


def test_conversion_command_rewrites_the_older_layout(legacy_file):
    folder, pipe = legacy_file
    main([str(folder / LORA_WEIGHTS)])
    assert not legacy_lora_layout(keys(folder))
    fresh = get_family("sd").build_tiny(TinyModelConfig())
    fresh.load_lora_weights(folder)
    assert lora_modules(fresh.unet) == lora_modules(pipe.unet)
    with readable_lora(folder) as source:
        assert source == folder  # a file in peft's layout is read as it is


def test_default_targets_write_the_file_they_always_wrote():
    """With the attention projections only, every key keeps the name rlbooth wrote before wide targets worked."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from rlbooth.models import lora_layers

    unet = get_family("sd").build_tiny(TinyModelConfig()).unet
    add_lora(unet, 4, None, ["to_k", "to_q", "to_v", "to_out.0"])
    before = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    assert list(lora_layers(unet)) == list(before) and all(".lora.down." in k or ".lora.up." in k for k in before)
