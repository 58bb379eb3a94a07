"""Gradient checkpointing lowers the measured peak of a training pass and leaves its gradients as they were;
sliced decoding lowers the measured peak of a decode and leaves the images as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rlbooth.memory import Case, DecodeCase, measure


MID_UNET = {"block_out_channels": [64, 128], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 64, "layers_per_block": 2,
            "attention_head_dim": 8, "sample_size": 32}


@pytest.mark.slow
def test_gradient_checkpointing_lowers_the_measured_peak_of_a_pass():
    """A mid-size UNet (18 M parameters) at batch 2, 256 px: each pass in a process of its own, peak RSS measured
    (0.188 and 0.137 GiB, twice each, forked from `measure`'s server; 0.185-0.186 and 0.129-0.131 in fresh
    interpreters, as before)."""
    case = Case("diffusers", "UNet2DConditionModel", MID_UNET, "sd", batch=2, latent=32, dtype="float32")
    plain, checkpointed = measure(case), measure(Case(**{**case.__dict__, "checkpointing": True}))
    assert checkpointed["grad_sum"] == plain["grad_sum"]
    assert checkpointed["peak_bytes"] < 0.85 * plain["peak_bytes"]


MID_VAE = {"block_out_channels": [64, 128, 128], "down_block_types": ["DownEncoderBlock2D"] * 3,
           "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1, "latent_channels": 4}


@pytest.mark.slow
def test_sliced_decoding_lowers_the_measured_peak_of_a_decode():
    """A mid-size VAE (3 levels of 64-128 channels where SD's has 4 of 128-512; 3.8 M parameters) decoding 8
    latents to 256 px whole and one at a time (align.decode_slice=1), each in a process of its own, peak RSS
    measured. Forked from `measure`'s server the peaks were 0.773 and 0.185 GiB twice from one server, 0.928 and
    0.277 from another that had served a small decode first (0.83 GiB whole under the mutation run); in fresh
    interpreters (before) the peak before the decode varied by up to 0.1 GiB between processes (0.77-0.92 GiB
    whole, 0.17-0.29 GiB sliced), so the batch is large enough for the gap to stand out either way."""
    case = DecodeCase(MID_VAE, batch=8, latent=64)
    whole, sliced = measure(case), measure(DecodeCase(**{**case.__dict__, "slice": 1}))
    assert sliced["image_sum"] == pytest.approx(whole["image_sum"], rel=1e-6)
    assert sliced["peak_bytes"] < 0.5 * whole["peak_bytes"]


@pytest.mark.slow
def test_a_failed_measurement_raises_with_the_childs_traceback():
    with pytest.raises(RuntimeError, match="NoSuchModel"):
        measure(Case("diffusers", "NoSuchModel", {}, "sd", batch=1, latent=8, dtype="float32"))


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
    for step in (2, 4):  # the grids drawn from the embeddings equal those the pipeline encodes for itself, to
        # one level: each prompt is encoded alone, the pipeline encodes a batch of them, and the tiny SD3's pooled
        # projection of a batch of one differs from a larger batch's by 1 ulp (2e-7), which turned one pixel of
        # 4,096 by 1/255
        grids = [np.asarray(Image.open(tmp_path / k / "samples" / f"step-{step}.png"), np.int16)
                 for k in ("false", "true")]
        assert np.abs(grids[0] - grids[1]).max() <= 1 and (grids[0] != grids[1]).mean() < 0.01


def test_stage_one_offload_draws_class_images_and_grids_without_the_text_encoders(tmp_path, subject_photos,
                                                                                   monkeypatch):
    """Every prompt is encoded first, with the text encoders alone on the device; after that they never run,
    so they and the transformer never share the device (SD3.5's T5-XXL alone is 8.9 GiB)."""
    from accelerate import Accelerator

    from rlbooth.config import load_config
    from rlbooth.models import load_pipeline
    from rlbooth.personalize import train as stage_one
    from rlbooth.personalize.class_images import generate_class_images
    from rlbooth.subject import Subject

    forward = {}
    real_encode_first = stage_one.encode_first

    def encode_first(pipe, family, *args):
        result = real_encode_first(pipe, family, *args)
        for encoder in family.text_encoder_modules(pipe):
            forward[id(encoder)] = encoder.forward
            monkeypatch.setattr(encoder, "forward", lambda *a, **k: pytest.fail("a text encoder ran after encoding"))
        return result

    monkeypatch.setattr(stage_one, "encode_first", encode_first)
    subject = Subject(images=subject_photos, class_noun="toy", description="triangular")
    config = load_config("tiny-sd3", ["runtime.report_to=none", "personalize.max_train_steps=2",
                                      "personalize.validation_steps=2", "personalize.offload_encoders=true",
                                      "personalize.with_prior_preservation=true", "personalize.num_class_images=2",
                                      f"personalize.class_data_dir={tmp_path / 'class'}"])
    stage_one.personalize(config, subject, tmp_path / "out")
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert (tmp_path / "out" / "samples" / "step-2.png").is_file()
    assert forward  # the encoders were put out of use
    monkeypatch.undo()
    cfg = config.personalize
    plain = generate_class_images(load_pipeline(config.model), subject.prompt(cfg.class_prompt, with_identifier=False),
                                  tmp_path / "plain", 2, seed=config.runtime.seed,
                                  num_inference_steps=cfg.class_generation_steps,
                                  guidance_scale=cfg.class_guidance_scale, batch_size=cfg.class_batch_size,
                                  accelerator=Accelerator(cpu=True))
    assert [p.read_bytes() for p in plain] == [p.read_bytes() for p in sorted((tmp_path / "class").glob("*.png"))]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_stage_one_frozen_weights_reach_the_device_in_the_runs_16_bit_dtype(mode, tmp_path, subject_photos,
                                                                            monkeypatch):
    """The frozen components are cast before they move (a bf16 run never holds T5's fp32 copy on the device),
    and the trained ones stay fp32. A cache of its own, so that the class images are drawn here: with the full
    UNet in fp32 beside a bf16 text encoder and VAE they are drawn under autocast, as the grids are (without it
    the UNet's first layer refused the encoder's bf16 states; a shared cache filled by the LoRA case hid that)."""
    from rlbooth.config import load_config
    from rlbooth.personalize import train as stage_one
    from rlbooth.subject import Subject

    moved = {}
    real = stage_one.to_device

    def to_device(pipe, device, but):
        for name in ("vae", "text_encoder", "unet"):
            moved[name] = {p.dtype for p in getattr(pipe, name).parameters()}
        real(pipe, device, but)

    monkeypatch.setattr(stage_one, "to_device", to_device)
    monkeypatch.setenv("RLBOOTH_CACHE", str(tmp_path / "cache"))
    config = load_config("tiny", ["runtime.report_to=none", "runtime.mixed_precision=bf16",
                                  "personalize.max_train_steps=1", "personalize.validation_steps=0",
                                  f"personalize.mode={mode}"])
    stage_one.personalize(config, Subject(images=subject_photos, class_noun="toy"), tmp_path / "out")
    assert len(list((tmp_path / "cache" / "class_images").glob("*/*/*.png"))) == config.personalize.num_class_images
    assert moved["vae"] == moved["text_encoder"] == {torch.bfloat16}
    assert moved["unet"] == ({torch.bfloat16} if mode == "lora" else {torch.float32})
