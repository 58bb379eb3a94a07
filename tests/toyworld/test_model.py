"""The toy world's base models: shipped weights load the standard ways and draw the world; the script rebuilds them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlbooth.config import ModelConfig
from rlbooth.families import get_family
from rlbooth.models import ModelLoadError, load_pipeline, model_key
from rlbooth.toyworld import model, pretrain, world
from rlbooth.toyworld.rewards import scene_accuracy


def test_shipped_weights_load_with_from_pretrained_and_are_small() -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model.WEIGHTS)
    assert pipe.tokenizer.model_max_length == model.MAX_TOKENS
    assert pipe.vae.config.scaling_factor != 1.0  # set from the latents' std by the script
    size = sum(p.stat().st_size for p in model.WEIGHTS.rglob("*") if p.is_file())
    assert size < 12e6, f"shipped weights grew to {size / 1e6:.1f} MB"
    assert model_key(ModelConfig(pretrained="toyworld")).startswith("toyworld-")


def test_shipped_flow_weights_load_with_from_pretrained_and_are_small() -> None:
    """SD3's pipeline class, without T5 (as SD3 is run without it), on the UNet world's VAE and tokenizer."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model.FLOW_WEIGHTS, text_encoder_3=None)
    assert pipe.tokenizer_3.model_max_length == 0 and get_family("sd3").t5_length(pipe) == 0
    assert pipe.tokenizer.get_vocab() == model.toy_tokenizer().get_vocab()
    assert pipe.vae.config.scaling_factor == load_pipeline(ModelConfig(pretrained="toyworld")).vae.config.scaling_factor
    size = sum(p.stat().st_size for p in model.FLOW_WEIGHTS.rglob("*") if p.is_file())
    assert size < 16e6, f"shipped flow weights grew to {size / 1e6:.1f} MB"
    assert model_key(ModelConfig(pretrained="toyworld-flow")).startswith("toyworld-flow-")
    assert model_key(ModelConfig(pretrained="toyworld-flow")) != model_key(ModelConfig(pretrained="toyworld"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toyworld", "toyworld-flow"])
def test_shipped_model_draws_heldout_compositions(name: str) -> None:
    """The base model puts the asked scene behind objects in colour x shape x scene combinations it never saw."""
    from rlbooth.sampling import draw

    pipe = load_pipeline(ModelConfig(pretrained=name))
    prompts = [c.text() for c in world.heldout_captions()]
    images = draw(pipe, prompts, [0], num_inference_steps=10, guidance_scale=4.0)
    pixels = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1) for im in images])
    folder = model.WEIGHTS if name == "toyworld" else model.FLOW_WEIGHTS
    record = json.loads((folder / "pretrain.json").read_text())
    assert record["heldout_scene_accuracy"] > 0.8
    assert scene_accuracy(pixels, prompts).mean() > 0.7


@pytest.mark.parametrize("name, attribute, command", [
    ("toyworld", "WEIGHTS", "python -m rlbooth.toyworld.pretrain --out"),
    ("toyworld-flow", "FLOW_WEIGHTS", "python -m rlbooth.toyworld.pretrain --family sd3 --out"),
])
def test_missing_weights_say_how_to_rebuild_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str,
                                                 attribute: str, command: str) -> None:
    monkeypatch.setattr(model, attribute, tmp_path / "weights")
    with pytest.raises(ModelLoadError, match=command):
        load_pipeline(ModelConfig(pretrained=name))


def test_pretraining_script_writes_a_loadable_pipeline(tmp_path: Path) -> None:
    """A few steps of each phase: the real code path, not the real quality (that is the script's own figure)."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "weights"
    pretrain.main(["--out", str(out), "--vae-steps", "3", "--vae-batch-size", "4", "--steps", "3",
                   "--batch-size", "4", "--eval-steps", "2", "--eval-images-per-caption", "1"])
    record = json.loads((out / "pretrain.json").read_text())
    assert record["config"]["steps"] == 3 and record["heldout_images"] == 25
    assert 0 <= record["heldout_scene_accuracy"] <= 1
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.tokenizer("a sks square").input_ids == model.toy_tokenizer()("a sks square").input_ids
    assert not list(tmp_path.glob(".weights-*"))  # the temporary folder was renamed, not left behind


def test_flow_pretraining_writes_a_loadable_sd3_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "weights-flow"
    pretrain.main(["--family", "sd3", "--out", str(out), "--steps", "3", "--batch-size", "4", "--eval-steps", "2",
                   "--eval-images-per-caption", "1"])
    record = json.loads((out / "pretrain.json").read_text())
    assert record["config"]["family"] == "sd3" and record["heldout_images"] == 25
    pipe = load_pipeline(ModelConfig(pretrained=str(out)))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    shipped_vae = load_pipeline(ModelConfig(pretrained="toyworld")).vae.state_dict()
    assert all(torch.equal(v, shipped_vae[k]) for k, v in pipe.vae.state_dict().items())  # phase 1 reused
