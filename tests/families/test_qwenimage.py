"""Qwen-Image against diffusers' own `QwenImagePipeline` on the tiny model built in code: the template's 34
tokens dropped with the mask kept, two true-CFG steps (norm rescale) equal the pipeline's, its timesteps and
its VAE decode; stage one's loss equals a transcription of diffusers' `train_dreambooth_lora_qwen_image.py`;
the LoRA the family saves is what `load_lora_weights` loads."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImagePipeline

from rlbooth.config import PersonalizeConfig, TinyModelConfig
from rlbooth.families import family_of, get_family
from rlbooth.families.base import decode_latents, from_latents, latent_dist, to_latents
from rlbooth.families.flux import pack, unpack
from rlbooth.families.qwenimage import DROPPED_TOKENS
from tests.families.conftest import PROMPTS, assert_saved_lora_reloads, capture_timesteps



@pytest.fixture(scope="module")
def qwen():
    return get_family("qwenimage").build_tiny(TinyModelConfig())


def latents_of(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 16, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_template_drops_34_tokens_and_conditioning_equals_the_pipelines_encode_prompt(qwen):
    """The tiny tokenizer spells the template in 34 tokens, as Qwen's does, so the prompt starts right after
    them; the pipeline pads to the longest prompt, the family to `text_length`: equal where the mask is 1,
    zeros (masked) after."""
    family = family_of(qwen)
    ids, _ = family.tokenize(qwen, ["a sks dog"])
    assert qwen.tokenizer.decode(ids[0, :DROPPED_TOKENS]).endswith("<|im_start|>user\n")
    assert qwen.tokenizer.decode(ids[0, DROPPED_TOKENS:DROPPED_TOKENS + 7]) == "a sks dog"
    ours = family.encode_prompts(qwen, PROMPTS)
    embeds, embeds_mask = qwen.encode_prompt(PROMPTS, device="cpu")
    length = embeds.shape[1]
    assert ours.hidden.shape[1] == family.text_length(qwen) == 64 > length
    torch.testing.assert_close(ours.hidden[:, :length], embeds)
    torch.testing.assert_close(ours.added["encoder_hidden_states_mask"][:, :length], embeds_mask)
    assert not ours.added["encoder_hidden_states_mask"][:, length:].any() and not ours.hidden[:, length:].any()
    uncond, (negative, _) = family.unconditional(qwen), qwen.encode_prompt(" ", device="cpu")
    torch.testing.assert_close(uncond.hidden[:, :negative.shape[1]], negative)


def test_two_true_cfg_steps_equal_the_pipelines(qwen):
    """The pipeline's true CFG (negative prompt, separate forwards, norm rescale) equals stage two's one batched
    forward (`guided_noise`, through the family's `guide`); plain CFG (no rescale) does not."""
    from rlbooth.align.rollout import guidance_inputs, guided_noise

    family, latents, scale = family_of(qwen), latents_of(), 4.0
    theirs = qwen("a dog", num_inference_steps=2, height=32, width=32, latents=pack(latents), output_type="latent",
                  **family.guidance_kwargs(scale), **family.call_kwargs(qwen)).images
    scheduler = family.flow_scheduler(qwen)
    inputs = guidance_inputs(family, family.unconditional(qwen), family.encode_prompts(qwen, ["a dog"]))
    ours = latents
    with torch.no_grad():
        timesteps = family.set_timesteps(qwen, scheduler, 2, latents.shape[-2:])
        for t in timesteps:
            ours = scheduler.step(guided_noise(family, qwen.transformer, ours, t, inputs, scale), t, ours).prev_sample
        uncond_v, cond_v = family.denoise(qwen.transformer, torch.cat([latents] * 2), timesteps[:1].expand(2),
                                          inputs).chunk(2)
    torch.testing.assert_close(pack(ours), theirs)
    assert not torch.allclose(family.guide(uncond_v, cond_v, scale), uncond_v + scale * (cond_v - uncond_v),
                              atol=1e-3)


def test_sampling_timesteps_equal_the_pipelines(qwen):
    """Linear sigmas, the dynamic shift from the packed image tokens, the terminal stretch."""
    family = family_of(qwen)
    torch.testing.assert_close(family.set_timesteps(qwen, family.flow_scheduler(qwen), 5, (16, 16)),
                               capture_timesteps(qwen, 5))


def test_latents_decode_as_the_pipeline_decodes(qwen):
    """The pipeline's image from its final latents equals `decode(from_latents(...))` through the frame axis and
    the per-channel statistics; `to_latents` inverts `from_latents`."""
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32}
    final = qwen("a dog", output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images
    image = qwen("a dog", output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images
    latents = unpack(final, 16, 16)
    with torch.no_grad():
        ours = decode_latents(qwen.vae, from_latents(qwen.vae, latents))
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), image)
    torch.testing.assert_close(to_latents(qwen.vae, from_latents(qwen.vae, latents)), latents)


def script_loss(pipe, pixels, noise, indices, with_prior: bool, prior_loss_weight: float) -> torch.Tensor:
    """diffusers' `train_dreambooth_lora_qwen_image.py` (weighting_scheme none), transcribed: 5-D latents
    normalized by `latents_mean` and 1 / `latents_std`, sigmas looked up by timestep, frames moved behind the
    channels before packing, velocity target, per-image mean, prior half weighted."""
    vae, scheduler = pipe.vae, type(pipe.scheduler).from_config(pipe.scheduler.config)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    model_input = (vae.encode(pixels.unsqueeze(2)).latent_dist.mode() - mean) * std
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[[(scheduler.timesteps == t).nonzero().item() for t in timesteps]]
    sigmas = sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise.unsqueeze(2)
    noisy = noisy.permute(0, 2, 1, 3, 4)
    packed = QwenImagePipeline._pack_latents(noisy, noisy.shape[0], 16, 16, 16)
    embeds, embeds_mask = pipe.encode_prompt(["a sks dog"] * len(pixels), device="cpu")
    pred = pipe.transformer(hidden_states=packed, encoder_hidden_states=embeds,
                            encoder_hidden_states_mask=embeds_mask, timestep=timesteps / 1000,
                            img_shapes=[(1, 8, 8)] * len(pixels), return_dict=False)[0]
    pred = QwenImagePipeline._unpack_latents(pred, 32, 32, pipe.vae_scale_factor)
    target = noise.unsqueeze(2) - model_input
    if with_prior:
        pred, pred_prior = pred.chunk(2)
        target, target_prior = target.chunk(2)
        prior = ((pred_prior.float() - target_prior.float()) ** 2).reshape(target_prior.shape[0], -1).mean(1).mean()
    loss = ((pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(1).mean()
    return loss + prior_loss_weight * prior if with_prior else loss


@pytest.mark.parametrize("with_prior", [False, True])
def test_stage_one_loss_equals_the_diffusers_script(qwen, with_prior):
    """The family's encoding, normalization, conditioning and denoise under stage one's flow objective give
    the script's loss for the same images, noise and timesteps."""
    from rlbooth.personalize.objective import objective_for

    family = family_of(qwen)
    cfg = PersonalizeConfig(with_prior_preservation=with_prior, prior_loss_weight=0.7)
    objective = objective_for(family, qwen, cfg)
    g = torch.Generator().manual_seed(3)
    pixels, noise = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 16, 16, 16, generator=g)
    indices = objective.draw(2, g)
    with torch.no_grad():
        latents = to_latents(qwen.vae, latent_dist(qwen.vae, pixels).mean)
        noisy, timesteps = objective.inputs(latents, noise, indices)
        pred = family.denoise(qwen.transformer, noisy, timesteps, family.encode_prompts(qwen, ["a sks dog"] * 2))
        ours, _ = objective.loss(pred, latents, noise, indices, with_prior=with_prior)
        theirs = script_loss(qwen, pixels, noise, indices, with_prior, 0.7)
    torch.testing.assert_close(ours, theirs)


def test_saved_lora_reloads_with_load_lora_weights(tmp_path):
    assert set(get_family("qwenimage").lora_components) <= set(QwenImagePipeline._lora_loadable_modules)
    assert_saved_lora_reloads("qwenimage", tmp_path, 4.0)
