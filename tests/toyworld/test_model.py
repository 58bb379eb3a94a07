"""The toy world's base model: shipped weights load the standard ways and draw the world; the script rebuilds them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlbooth.config import ModelConfig
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


def test_shipped_model_draws_heldout_compositions() -> None:
    """The base model puts the asked scene behind objects in colour x shape x scene combinations it never saw."""
    pipe = load_pipeline(ModelConfig(pretrained="toyworld"))
    pipe.set_progress_bar_config(disable=True)
    prompts = [c.text() for c in world.heldout_captions()]
    images = pipe(prompts, num_inference_steps=10, guidance_scale=4.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    record = json.loads((model.WEIGHTS / "pretrain.json").read_text())
    assert record["heldout_scene_accuracy"] > 0.8
    assert scene_accuracy(images, prompts).mean() > 0.7


def test_missing_weights_say_how_to_rebuild_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(model, "WEIGHTS", tmp_path / "weights")
    with pytest.raises(ModelLoadError, match="python -m rlbooth.toyworld.pretrain"):
        load_pipeline(ModelConfig(pretrained="toyworld"))


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
