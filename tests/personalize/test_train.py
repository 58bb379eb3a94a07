"""Stage one end to end on the tiny pipeline: it learns, touches only what it trains, saves loadable output, resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from rlbooth.config import PersonalizeConfig, load_config
from rlbooth.families import family_of
from rlbooth.families.base import to_latents
from rlbooth.models import load_pipeline
from rlbooth.personalize import train as train_module
from rlbooth.personalize.data import encode_images
from rlbooth.personalize.objective import objective_for
from rlbooth.personalize.train import personalize
from rlbooth.stages import METADATA, OutputError
from rlbooth.sampling import draw_grid, fixed_resolution
from rlbooth.subject import Subject


def tiny_config(*overrides: str, preset: str = "tiny"):
    return load_config(preset, ["runtime.report_to=none", "personalize.validation_steps=0", *overrides])


FAMILY_PRESETS = pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-qwenimage",
                                                    "tiny-zimage"])
QUICK_TIER_PRESETS = pytest.mark.parametrize("preset", ["tiny", "tiny-sd3", *(
    pytest.param(preset, marks=pytest.mark.slow) for preset in ("tiny-sdxl", "tiny-flux", "tiny-qwenimage",
                                                                "tiny-zimage"))])
"""Every family, the quick tier one UNet and one flow family: for tests whose other four cases cost it most."""


@pytest.fixture
def subject(subject_photos: Path) -> Subject:
    return Subject(images=subject_photos, class_noun="toy", description="triangular")


def instance_loss(pipe, denoiser, paths: list[Path]) -> float:
    """Stage one's loss on the subject's photos with fixed noise and timesteps (DDPM noise or flow velocity)."""
    family = family_of(pipe)
    bank = encode_images(pipe.vae, paths, 32, True, seed=0)
    latents = to_latents(pipe.vae, bank.mean)
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(latents.shape, generator=g)
    objective = objective_for(family, pipe, PersonalizeConfig())
    index = objective.draw(latents.shape[0], g)
    with torch.no_grad():
        cond = family.with_geometry(family.encode_prompts(pipe, ["a sks triangular toy"] * len(paths)), bank.geometry)
        noisy, timesteps = objective.inputs(latents, noise, index)
        pred = family.denoise(denoiser, noisy, timesteps, family.with_guidance(cond, 3.5))
        return objective.loss(pred, latents, noise, index, with_prior=False)[0].item()


@FAMILY_PRESETS
def test_full_finetune_lowers_instance_loss_and_leaves_frozen_parts(tmp_path, subject, preset):
    config = tiny_config("personalize.mode=full", "personalize.learning_rate=1e-3",
                         "personalize.max_train_steps=25", "personalize.with_prior_preservation=false", preset=preset)
    model_dir = personalize(config, subject, tmp_path / "out")
    base = load_pipeline(config.model)
    tuned = type(base).from_pretrained(model_dir)
    photos = sorted(subject.images.iterdir())
    name = family_of(base).denoiser
    trained, original = getattr(tuned, name), getattr(base, name)
    assert instance_loss(base, trained, photos) < 0.8 * instance_loss(base, original, photos)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert len(changed) > 0.9 * len(original.state_dict())
    for name in ("vae", *family_of(base).text_encoders):
        frozen, original = getattr(tuned, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(frozen[k], original[k]) for k in original), f"{name} changed"


@FAMILY_PRESETS
def test_lora_output_reloads_with_diffusers_and_draws_what_training_drew(tmp_path, subject, preset):
    """The last validation grid is drawn in memory; the reloaded LoRA must draw the same pixels."""
    config = tiny_config("personalize.max_train_steps=6", "personalize.validation_steps=6",
                         "personalize.train_text_encoder=true", preset=preset)
    out = tmp_path / "out"
    model_dir = personalize(config, subject, out)
    pipe = load_pipeline(config.model)
    components = family_of(pipe).lora_components  # denoiser, CLIP text encoder(s); never T5
    lora = load_file(str(model_dir / "pytorch_lora_weights.safetensors"))
    assert {k.split(".")[0] for k in lora} == set(components)
    for encoder in components[1:]:
        assert any(".up." in k and v.abs().sum() > 0 for k, v in lora.items() if k.startswith(f"{encoder}."))

    pipe.load_lora_weights(model_dir)
    p = config.personalize
    grid = draw_grid(pipe, [subject.prompt(t) for t in p.validation_prompts], p.validation_seeds,
                     p.validation_inference_steps, p.validation_guidance_scale,
                     resolution=fixed_resolution(pipe, p.resolution))
    assert grid.size == (32 * len(p.validation_seeds), 32 * len(p.validation_prompts))
    in_memory = np.asarray(Image.open(out / "samples" / "step-6.png"), dtype=np.int16)
    assert np.abs(np.asarray(grid, dtype=np.int16) - in_memory).max() <= 1

    meta = json.loads((out / METADATA).read_text())
    assert meta["mode"] == "lora" and meta["instance_prompt"] == "a sks triangular toy"
    assert meta["class_prompt"] == "a toy" and meta["subject"]["class_noun"] == "toy"
    assert meta["config"]["personalize"]["max_train_steps"] == 6


class Killed(Exception):
    pass


@QUICK_TIER_PRESETS
def test_killed_run_resumes_to_the_same_weights(tmp_path, subject, monkeypatch, preset):
    overrides = ("personalize.max_train_steps=6", "personalize.checkpointing_steps=2",
                 "personalize.gradient_accumulation_steps=2", "personalize.lr_scheduler=linear",
                 "personalize.checkpoints_total_limit=null")
    whole = personalize(tiny_config(*overrides, preset=preset), subject, tmp_path / "whole")

    original_micro_step = train_module.TrainLoop.micro_step

    def dies_at_step_five(self, micro_step):
        if micro_step == 4 * 2 + 1:  # second micro-batch of step 5: after the step-4 checkpoint
            raise Killed
        return original_micro_step(self, micro_step)

    monkeypatch.setattr(train_module.TrainLoop, "micro_step", dies_at_step_five)
    with pytest.raises(Killed):
        personalize(tiny_config(*overrides, preset=preset), subject, tmp_path / "resumed")
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert not (tmp_path / "resumed" / METADATA).exists()
    monkeypatch.setattr(train_module.TrainLoop, "micro_step", original_micro_step)

    with pytest.raises(OutputError, match="--resume"):
        personalize(tiny_config(*overrides, preset=preset), subject, tmp_path / "resumed")
    resumed = personalize(tiny_config(*overrides, preset=preset), subject, tmp_path / "resumed", resume=True)

    a = load_file(str(whole / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)

    with pytest.raises(OutputError, match="finished"):
        personalize(tiny_config(*overrides, preset=preset), subject, tmp_path / "resumed")


@pytest.mark.parametrize("preset, size, folder_suffix", [("tiny", 32, "seed0"), ("tiny-flux", 16, "seed0-16px")])
def test_class_images_are_drawn_at_the_size_the_grids_are(tmp_path, subject, monkeypatch, preset, size,
                                                           folder_suffix):
    """Trained at 16 px on models built at 32 px: the denoiser's native size where it has one (the tiny UNet's
    32 px), else the size trained at, where FLUX's pipeline would draw its default (1024 px for the real model,
    256 px for the tiny one). The cache keeps a folder per chosen size, so a run at another size draws its own."""
    monkeypatch.setenv("RLBOOTH_CACHE", str(tmp_path / "cache"))
    config = tiny_config("personalize.max_train_steps=1", "personalize.num_class_images=2",
                         "personalize.resolution=16", preset=preset)
    personalize(config, subject, tmp_path / "out")
    drawn = sorted((tmp_path / "cache" / "class_images").glob("*/*/*.png"))
    assert len(drawn) == 2 and drawn[0].parent.name.endswith(folder_suffix), drawn
    assert Image.open(drawn[0]).size == (size, size)


def test_class_images_are_seeded_and_only_missing_ones_are_drawn(tmp_path, subject, monkeypatch):
    class_dir = tmp_path / "class"
    config = tiny_config("personalize.max_train_steps=1", f"personalize.class_data_dir={class_dir}",
                         "personalize.num_class_images=3")
    personalize(config, subject, tmp_path / "a")
    first = {p.name: np.asarray(Image.open(p)) for p in sorted(class_dir.glob("*.png"))}
    assert list(first) == ["00000.png", "00001.png", "00002.png"]
    assert not np.array_equal(first["00000.png"], first["00001.png"])

    (class_dir / "00001.png").unlink()
    drawn: list[int] = []
    original = StableDiffusionPipeline.__call__

    def counting_call(self, prompt, *args, **kwargs):
        drawn.append(len(prompt))
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counting_call)
    personalize(config, subject, tmp_path / "b")
    assert drawn == [1]
    assert np.array_equal(np.asarray(Image.open(class_dir / "00001.png")), first["00001.png"])
