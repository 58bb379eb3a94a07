"""Z-Image against diffusers' own `ZImagePipeline` on the tiny model built in code: the chat-templated Qwen3
conditioning, two CFG steps, the timesteps and the VAE decode equal the pipeline's; the LoRA the family saves
is what `load_lora_weights` loads."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImagePipeline

from rlbooth.align.rollout import guidance_inputs, guided_noise
from rlbooth.config import TinyModelConfig
from rlbooth.families import family_of, get_family
from rlbooth.families.base import from_latents, to_latents
from tests.families.conftest import PROMPTS, assert_saved_lora_reloads, capture_timesteps



@pytest.fixture(scope="module")
def zimage():
    return get_family("zimage").build_tiny(TinyModelConfig())


def latents_of(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_conditioning_equals_the_pipelines_encode_prompt(zimage):
    """The pipeline passes each prompt's own tokens (a list); the family keeps them padded, masked, in a batch."""
    family = family_of(zimage)
    ours = family.encode_prompts(zimage, PROMPTS)
    embeds, negative = zimage.encode_prompt(PROMPTS, device="cpu", **family.call_kwargs(zimage))
    mask = ours.added["attention_mask"].bool()
    assert [int(m.sum()) for m in mask] == [len(e) for e in embeds] and len(embeds[0]) != len(embeds[1])
    for row, theirs in enumerate(embeds):
        torch.testing.assert_close(ours.hidden[row][mask[row]], theirs, rtol=0, atol=0)
        assert not ours.hidden[row][~mask[row]].any()
    uncond = family.unconditional(zimage)
    torch.testing.assert_close(uncond.hidden[0][uncond.added["attention_mask"][0].bool()], negative[0],
                               rtol=0, atol=0)


def test_two_cfg_steps_equal_the_pipelines(zimage):
    """The pipeline's CFG (cond + s (cond - uncond), the output negated, time as 1 - sigma) equals stage two's
    batched `guided_noise`."""
    family, latents, scale = family_of(zimage), latents_of(), 3.0
    theirs = zimage("a dog", num_inference_steps=2, height=32, width=32, latents=latents, output_type="latent",
                    **family.guidance_kwargs(scale), **family.call_kwargs(zimage)).images
    scheduler = family.flow_scheduler(zimage)
    inputs = guidance_inputs(family, family.unconditional(zimage), family.encode_prompts(zimage, ["a dog"]))
    ours = latents
    with torch.no_grad():
        for t in family.set_timesteps(zimage, scheduler, 2, latents.shape[-2:]):
            ours = scheduler.step(guided_noise(family, zimage.transformer, ours, t, inputs, scale), t,
                                  ours).prev_sample
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, latents, atol=1e-2)


def test_sampling_timesteps_equal_the_pipelines(zimage):
    family = family_of(zimage)
    torch.testing.assert_close(family.set_timesteps(zimage, family.flow_scheduler(zimage), 5, (16, 16)),
                               capture_timesteps(zimage, 5, **family.call_kwargs(zimage)))


def test_latents_decode_as_the_pipeline_decodes(zimage):
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, **family_of(zimage).call_kwargs(zimage)}
    final = zimage("a dog", output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images
    image = zimage("a dog", output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images
    with torch.no_grad():
        ours = zimage.vae.decode(from_latents(zimage.vae, final)).sample
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), image)
    torch.testing.assert_close(to_latents(zimage.vae, from_latents(zimage.vae, final)), final)


def test_saved_lora_reloads_with_load_lora_weights(tmp_path):
    assert list(ZImagePipeline._lora_loadable_modules) == ["transformer"]
    assert_saved_lora_reloads("zimage", tmp_path, 3.0)
