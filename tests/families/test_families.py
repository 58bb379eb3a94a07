"""The family seam: detection from model_index.json, SDXL's conditioning against diffusers' own pipeline,
DDIM with log-probs on SDXL's schedule, and SDXL through evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlbooth.align.ddim import ddim_step_with_logprob
from rlbooth.config import ModelConfig, TinyModelConfig
from rlbooth.families import Conditioning, family_of, get_family
from rlbooth.families.base import square_geometry
from rlbooth.images import load_image_with_geometry
from rlbooth.models import ModelLoadError, load_pipeline, resolve_family, tiny_pipeline_folder
from tests.align.conftest import make_stage_one
from tests.rewards.test_clip_models import tiny_clip  # noqa: F401  (fixture)
from tests.rewards.test_identity import tiny_vit  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def sdxl():
    return load_pipeline(ModelConfig(pretrained="tiny", family="sdxl"))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_family_is_read_from_model_index(family):
    folder = tiny_pipeline_folder(TinyModelConfig(), get_family(family))
    assert resolve_family(ModelConfig(pretrained=str(folder))).name == family
    assert family_of(load_pipeline(ModelConfig(pretrained=str(folder)))).name == family


def test_unsupported_or_unreadable_model_index_names_the_fix(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ModelLoadError, match="KandinskyPipeline.*model.family"):
        resolve_family(ModelConfig(pretrained=str(tmp_path)))
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        resolve_family(ModelConfig(pretrained=str(tmp_path)))
    assert resolve_family(ModelConfig(pretrained=str(tmp_path), family="sdxl")).name == "sdxl"


def test_sdxl_conditioning_equals_the_pipelines_encode_prompt(sdxl):
    prompts = ["a sks dog on the beach", "a dog"]
    family = family_of(sdxl)
    ours = family.encode_prompts(sdxl, prompts)
    embeds, negative, pooled, negative_pooled = sdxl.encode_prompt(prompts, device="cpu",
                                                                   do_classifier_free_guidance=True)
    torch.testing.assert_close(ours.hidden, embeds)
    torch.testing.assert_close(ours.added["text_embeds"], pooled)
    uncond = family.unconditional(sdxl)
    torch.testing.assert_close(uncond.hidden.expand_as(negative), negative)  # zeros: force_zeros_for_empty_prompt
    torch.testing.assert_close(uncond.added["text_embeds"].expand_as(negative_pooled), negative_pooled)


def test_sdxl_denoiser_call_equals_the_pipelines(sdxl):
    """The pipeline's own first guided step at 32 px equals `family.denoise` with `square_geometry(32)`."""
    family = family_of(sdxl)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    cond = family.with_geometry(family.encode_prompts(sdxl, ["a dog"]), square_geometry(32))
    ours = family.denoise(sdxl.unet, latents, t, cond)
    embeds, _, pooled, _ = sdxl.encode_prompt(["a dog"], device="cpu", do_classifier_free_guidance=False)
    time_ids = sdxl._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=embeds.dtype,
                                      text_encoder_projection_dim=sdxl.text_encoder_2.config.projection_dim)
    theirs = sdxl.unet(latents, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    torch.testing.assert_close(ours, theirs)


def test_ddim_log_prob_step_on_sdxl_schedule(sdxl):
    """DDIM built from SDXL's (Euler) scheduler config: eta -> 0 is diffusers' DDIM step, and with diffusers'
    own noise the log-prob is the Gaussian density at that draw."""
    scheduler = family_of(sdxl).ddim_scheduler(sdxl)
    assert sdxl.scheduler.__class__.__name__ == "EulerDiscreteScheduler"
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g)
    z = torch.randn(2, 4, 8, 8, generator=g)
    for t in scheduler.timesteps:
        expected = scheduler.step(output, t, sample, eta=0.0).prev_sample
        got, _ = ddim_step_with_logprob(scheduler, output, t, sample, eta=1e-6, generator=torch.Generator())
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
        mean = scheduler.step(output, t, sample, eta=1.0, variance_noise=torch.zeros_like(z)).prev_sample
        drawn = scheduler.step(output, t, sample, eta=1.0, variance_noise=z).prev_sample
        sigma = ((drawn - mean) / z).mean().item()
        assert sigma > 0, "the last step must keep noise (set_alpha_to_one=False)"
        _, log_prob = ddim_step_with_logprob(scheduler, output, t, sample, eta=1.0, prev_sample=drawn)
        density = -0.5 * (z**2).mean(dim=(1, 2, 3)) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
        torch.testing.assert_close(log_prob, density, atol=1e-3, rtol=0)


def test_geometry_is_sdxls_size_conditioning(tmp_path):
    """Original size before resizing, crop top-left in the resized image, target size (diffusers' SDXL script)."""
    Image.fromarray(np.zeros((60, 90, 3), np.uint8)).save(tmp_path / "wide.png")
    image, geometry = load_image_with_geometry(tmp_path / "wide.png", 40, center_crop=True)
    assert image.size == (40, 40)
    assert geometry == (60, 90, 0, 10, 40, 40)  # resized to 40 x 60, centre crop from x = 10
    _, geometry = load_image_with_geometry(tmp_path / "wide.png", 40, False, np.random.default_rng(0))
    assert geometry[:3] == (60, 90, 0) and 0 <= geometry[3] <= 20


def test_conditioning_rows_and_guidance_stack():
    cond = Conditioning(torch.arange(6.0).view(3, 2, 1), {"text_embeds": torch.arange(3.0).view(3, 1)})
    uncond = Conditioning(torch.zeros(1, 2, 1), {"text_embeds": torch.full((1, 1), -1.0)})
    stacked = Conditioning.guided(uncond, cond[1:])
    assert len(stacked) == 4
    assert stacked.added["text_embeds"].flatten().tolist() == [-1, -1, 1, 2]
    torch.testing.assert_close(stacked.hidden[2:], cond.hidden[1:])
    assert Conditioning.cat([cond[:1], cond[1:]]).hidden.equal(cond.hidden)


def test_eval_scores_an_sdxl_stage(tmp_path, tiny_vit, tiny_clip):  # noqa: F811
    from rlbooth.dreambench import evaluate
    from tests.dreambench.test_evaluate import read_csv, write_photos

    stage = make_stage_one(tmp_path / "stage", 32, "tiny-sdxl")
    write_photos(tmp_path / "dreambench" / "dog", 2, (40, 40), (200, 120, 60))
    out = tmp_path / "eval"
    assert evaluate.main(["--models", f"XL={stage}", "--dreambench-root", str(tmp_path / "dreambench"),
                          "--subjects", "dog", "--num-prompts", "2", "--num-images", "1", "--steps", "2",
                          "--metrics", "dino", "clip_t", "--dino-model", str(tiny_vit), "--clip-model", str(tiny_clip),
                          "--device", "cpu", "--output", str(out)]) == 0
    rows = read_csv(out / "scores.csv")
    assert [r["model"] for r in rows] == ["XL", "XL"]
    assert all(-1 <= float(r[m]) <= 1 for r in rows for m in ("dino", "clip_t"))
    drawn = [np.asarray(Image.open(out / "images" / "XL" / "dog" / f"p0{p}-seed0.png")) for p in (0, 1)]
    assert drawn[0].shape == (32, 32, 3) and not np.array_equal(drawn[0], drawn[1])
