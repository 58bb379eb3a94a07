"""The flow-matching families against diffusers' own pipelines: SD3's and FLUX's conditioning equals
`encode_prompt` (SD3 with and without T5), a guided step through the family equals the pipeline's step,
the sampling timesteps equal the pipeline's, FLUX's packing and ids equal the pipeline's, and the LoRA
the family saves is what `load_lora_weights` loads."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from rlbooth.config import TinyModelConfig
from rlbooth.families import Conditioning, FlowMatchingFamily, family_of, get_family
from rlbooth.families.flux import image_ids, pack, unpack
from rlbooth.families.base import from_latents, to_latents
from rlbooth.models import TEXT_ENCODER_LORA_TARGETS, add_lora, save_lora
from tests.families.conftest import PROMPTS, capture_timesteps


@pytest.fixture(scope="module")
def sd3():
    return get_family("sd3").build_tiny(TinyModelConfig())


@pytest.fixture(scope="module")
def sd3_without_t5(sd3):
    return StableDiffusion3Pipeline(**{**sd3.components, "text_encoder_3": None, "tokenizer_3": None})


@pytest.fixture(scope="module")
def flux():
    return get_family("flux").build_tiny(TinyModelConfig())


def latents_of(pipe, batch: int = 1, seed: int = 0) -> torch.Tensor:
    size = TinyModelConfig().resolution // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, pipe.vae.config.latent_channels, size, size, generator=g)


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_conditioning_equals_the_pipelines_encode_prompt(sd3, sd3_without_t5, with_t5):
    pipe = sd3 if with_t5 else sd3_without_t5
    family = family_of(pipe)
    ours = family.encode_prompts(pipe, PROMPTS)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                                   do_classifier_free_guidance=True,
                                                                   **family.call_kwargs(pipe))
    torch.testing.assert_close(ours.hidden, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.added["pooled_projections"], pooled, rtol=0, atol=0)
    t5_part = ours.hidden[:, 77:]
    # the tiny T5 tokenizer's 64 positions; without T5, the pipeline's default of zeros
    assert t5_part.shape[1] == (64 if with_t5 else family.max_sequence_length)
    assert (t5_part.abs().sum() > 0) == with_t5  # without T5 the pipeline feeds zeros there
    uncond = family.unconditional(pipe)  # negative prompt "" through every encoder, as the pipeline
    torch.testing.assert_close(uncond.hidden.expand_as(negative), negative)
    torch.testing.assert_close(uncond.added["pooled_projections"].expand_as(negative_pooled), negative_pooled)


def test_sd3_t5_length_follows_the_t5_tokenizer_and_equals_the_pipelines_at_that_length(sd3_without_t5):
    """The toy world's flow model says `model_max_length=0` on its T5 tokenizer: no T5 positions, in rlbooth
    and in the pipeline called with `call_kwargs` (SD3's pipeline alone would pad 256 zero tokens)."""
    from rlbooth.toyworld.model import no_t5_tokenizer

    pipe = StableDiffusion3Pipeline(**{**sd3_without_t5.components, "tokenizer_3": no_t5_tokenizer()})
    family = family_of(pipe)
    assert family.t5_length(sd3_without_t5) == 256 and family.t5_length(pipe) == 0
    ours = family.encode_prompts(pipe, PROMPTS)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False,
                                              **family.call_kwargs(pipe))
    assert ours.hidden.shape[1] == 77
    torch.testing.assert_close(ours.hidden, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.added["pooled_projections"], pooled, rtol=0, atol=0)


def test_sd3_folder_saved_without_t5_loads_through_the_family(sd3_without_t5, tmp_path):
    sd3_without_t5.save_pretrained(tmp_path)
    loaded = get_family("sd3").load(str(tmp_path))
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None
    with pytest.raises(ValueError):  # what the family spares its callers
        StableDiffusion3Pipeline.from_pretrained(tmp_path)


def test_guidance_inputs_build_no_unconditional_rows_for_a_guidance_distilled_family(sd3, flux):
    from rlbooth.align.rollout import guidance_inputs

    for pipe, rows in ((sd3, 2 * len(PROMPTS)), (flux, len(PROMPTS))):
        family = family_of(pipe)
        cond = family.encode_prompts(pipe, PROMPTS)
        assert len(guidance_inputs(family, family.unconditional(pipe), cond)) == rows


def test_sd3_absent_t5_moves_and_casts_like_an_encoder(sd3_without_t5):
    t5 = family_of(sd3_without_t5).text_encoder_modules(sd3_without_t5)[2]
    t5.to(torch.float16).requires_grad_(False)
    assert t5(torch.zeros(2, 5, dtype=torch.long))[0].dtype == torch.float16


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_guided_step_equals_the_pipelines(sd3, sd3_without_t5, with_t5):
    """One CFG step of the pipeline (uncond rows first) from the same latents equals the family's:
    conditioning, unconditional, denoise, the flow scheduler and its timesteps."""
    pipe = sd3 if with_t5 else sd3_without_t5
    family, latents, scale = family_of(pipe), latents_of(pipe), 5.0
    theirs = pipe("a dog", num_inference_steps=1, height=32, width=32, guidance_scale=scale, latents=latents,
                  output_type="latent", **family.call_kwargs(pipe)).images
    scheduler = family.flow_scheduler(pipe)
    (t,) = family.set_timesteps(pipe, scheduler, 1, latents.shape[-2:])
    cond = Conditioning.guided(family.unconditional(pipe), family.encode_prompts(pipe, ["a dog"]))
    uncond_v, cond_v = family.denoise(pipe.transformer, torch.cat([latents] * 2), t.expand(2), cond).chunk(2)
    ours = scheduler.step(uncond_v + scale * (cond_v - uncond_v), t, latents).prev_sample
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, latents)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_sampling_timesteps_equal_the_pipelines(sd3, flux, name):
    """SD3's static shift and FLUX's resolution-dependent one (`mu` from the image tokens, linear sigmas)."""
    pipe = {"sd3": sd3, "flux": flux}[name]
    family = family_of(pipe)
    scheduler = family.flow_scheduler(pipe)
    for steps in (3, 7):
        ours = family.set_timesteps(pipe, scheduler, steps, latents_of(pipe).shape[-2:])
        torch.testing.assert_close(ours, capture_timesteps(pipe, steps))
    assert scheduler is not pipe.scheduler and scheduler.config == pipe.scheduler.config


def test_flow_families_have_no_ddim_scheduler(sd3, flux):
    for pipe in (sd3, flux):
        with pytest.raises(NotImplementedError, match="flow-matching.*flow_scheduler"):
            family_of(pipe).ddim_scheduler(pipe)


def test_flux_conditioning_equals_the_pipelines_encode_prompt(flux):
    family = family_of(flux)
    ours = family.encode_prompts(flux, PROMPTS)
    embeds, pooled, text_ids = flux.encode_prompt(PROMPTS, None, device="cpu", **family.call_kwargs(flux))
    torch.testing.assert_close(ours.hidden, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.added["pooled_projections"], pooled, rtol=0, atol=0)
    # the tiny T5 tokenizer's 64 positions, where the pipeline's default is 512 (a real T5 tokenizer allows it)
    assert family.max_sequence_length == 512 and ours.hidden.shape[1] == 64 and not text_ids.any()


def test_flux_packing_and_ids_equal_the_pipelines(flux):
    latents = torch.randn(2, 16, 8, 12)
    packed = pack(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 12), rtol=0, atol=0)
    torch.testing.assert_close(unpack(packed, 8, 12), latents, rtol=0, atol=0)
    vae_scale = flux.vae_scale_factor  # the pipeline's unpack takes pixel sizes
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 8 * vae_scale, 12 * vae_scale, vae_scale),
                               latents, rtol=0, atol=0)
    torch.testing.assert_close(image_ids(8, 12), FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_step_equals_the_pipelines(flux, guidance_embeds):
    """One step of the pipeline from packed latents equals the family's on the unpacked ones (FLUX.1-dev
    with its guidance input; schnell without), with no unconditional batch."""
    pipe = flux if guidance_embeds else get_family("flux").build_tiny(TinyModelConfig(), guidance_embeds=False)
    family, latents, scale = family_of(pipe), latents_of(pipe), 3.5
    assert not family.classifier_free_guidance
    theirs = pipe("a dog", num_inference_steps=1, height=32, width=32, guidance_scale=scale, latents=pack(latents),
                  output_type="latent", **family.call_kwargs(pipe)).images
    scheduler = family.flow_scheduler(pipe)
    (t,) = family.set_timesteps(pipe, scheduler, 1, latents.shape[-2:])
    cond = family.with_guidance(family.encode_prompts(pipe, ["a dog"]), scale)
    velocity = family.denoise(pipe.transformer, latents, t.expand(1), cond)
    ours = scheduler.step(velocity, t, latents).prev_sample
    torch.testing.assert_close(pack(ours), theirs)
    if guidance_embeds:  # the guidance input reaches the transformer, and is required
        other = family.denoise(pipe.transformer, latents, t.expand(1), family.with_guidance(cond, 1.0))
        assert not torch.allclose(other, velocity)
        with pytest.raises(ValueError, match="with_guidance"):
            family.denoise(pipe.transformer, latents, t.expand(1), family.encode_prompts(pipe, ["a dog"]))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_latents_decode_as_the_pipeline_decodes(sd3, flux, name):
    """The pipeline's image from its final latents equals `vae.decode(from_latents(...))`; and
    `to_latents` inverts it (SD3's and FLUX's VAEs have a non-zero shift)."""
    pipe = {"sd3": sd3, "flux": flux}[name]
    kwargs = {"num_inference_steps": 1, "height": 32, "width": 32}
    final = pipe("a dog", output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images
    image = pipe("a dog", output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images
    latents = unpack(final, 16, 16) if name == "flux" else final
    assert pipe.vae.config.shift_factor != 0
    with torch.no_grad():
        ours = pipe.vae.decode(from_latents(pipe.vae, latents)).sample
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), image)
    torch.testing.assert_close(to_latents(pipe.vae, from_latents(pipe.vae, latents)), latents)


def randomize_lora_b(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.copy_(torch.randn(param.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_saved_lora_reloads_with_load_lora_weights(tmp_path, name):
    """Transformer and CLIP LoRA with non-zero B, saved by the family, loaded by plain diffusers into a fresh
    tiny pipeline: the same velocity and conditioning, both different from the base model's."""
    family, cfg = get_family(name), TinyModelConfig()
    assert isinstance(family, FlowMatchingFamily)
    trained, fresh = family.build_tiny(cfg), family.build_tiny(cfg)
    assert set(family.lora_components) == set(fresh._lora_loadable_modules)
    assert getattr(trained, family.denoiser) is trained.transformer
    models = {name: getattr(trained, name) for name in family.lora_components}
    for component, model in models.items():
        add_lora(model, 4, 4, ["to_k", "to_q", "to_v", "to_out.0"] if component == family.denoiser
                 else TEXT_ENCODER_LORA_TARGETS)
        randomize_lora_b(model)
    save_lora(tmp_path, family, models)

    latents, t = latents_of(trained, batch=2), torch.tensor([700.0, 300.0])

    def outputs(pipe):
        cond = family.with_guidance(family.encode_prompts(pipe, PROMPTS), 3.5)
        return cond, family.denoise(pipe.transformer, latents, t, cond)

    with torch.no_grad():
        base_cond, base_v = outputs(fresh)
        fresh.load_lora_weights(tmp_path)
        (want_cond, want_v), (got_cond, got_v) = outputs(trained), outputs(fresh)
    torch.testing.assert_close(got_v, want_v)
    torch.testing.assert_close(got_cond.added["pooled_projections"], want_cond.added["pooled_projections"])
    torch.testing.assert_close(got_cond.hidden, want_cond.hidden)
    assert not torch.allclose(got_v, base_v, atol=1e-3)
    assert not torch.allclose(got_cond.added["pooled_projections"], base_cond.added["pooled_projections"], atol=1e-3)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_tiny_pipeline_saves_and_reloads_offline(tmp_path, sd3, flux, name):
    """The in-code T5 tokenizer survives `save_pretrained`, so the tiny model folder loads like a real one."""
    pipe = {"sd3": sd3, "flux": flux}[name]
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = type(pipe).from_pretrained(tmp_path)
    family = family_of(reloaded)
    assert family.name == name
    torch.testing.assert_close(family.encode_prompts(reloaded, PROMPTS).hidden,
                               family.encode_prompts(pipe, PROMPTS).hidden)
