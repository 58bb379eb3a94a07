"""Stage two's memory savings change nothing they should not: gradient checkpointing trains the same LoRA (it only
recomputes the training passes' activations), and so do offloaded text encoders and reward models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlbooth.align import train
from rlbooth.align.train import align
from tests.align.conftest import align_config
from tests.align.test_train import make_trainer
from tests.rewards.test_clip_models import head_file, tiny_clip  # noqa: F401  (module fixtures)


def trained_lora(config, stage_one: Path, out: Path) -> dict[str, torch.Tensor]:
    trainer = make_trainer(config, stage_one, out)
    samples = trainer.sample_epoch(0)
    trainer.train_epoch(0, samples, trainer.advantages(0, samples))
    return {k: v.detach().clone() for k, v in trainer.denoiser.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("stage_one_fixture", ["stage_one", "stage_one_sd3"])
def test_stage_two_gradient_checkpointing_trains_the_same_lora(stage_one_fixture, request, tmp_path):
    stage_one = request.getfixturevalue(stage_one_fixture)
    plain = trained_lora(align_config("align.learning_rate=1e-2"), stage_one, tmp_path / "a")
    checkpointed = trained_lora(align_config("align.learning_rate=1e-2", "align.gradient_checkpointing=true"),
                                stage_one, tmp_path / "b")
    assert any(v.abs().sum() > 0 for k, v in plain.items() if "lora_B" in k)  # it trained
    for k, v in plain.items():
        torch.testing.assert_close(checkpointed[k], v, rtol=0, atol=1e-7)


def test_stage_two_gradient_checkpointing_is_on_in_training_passes(stage_one, tmp_path):
    trainer = make_trainer(align_config("align.gradient_checkpointing=true"), stage_one, tmp_path)
    assert trainer.denoiser.is_gradient_checkpointing
    assert not make_trainer(align_config(), stage_one, tmp_path / "off").denoiser.is_gradient_checkpointing


def test_offloaded_text_encoders_are_not_used_while_training_and_change_nothing(stage_one_sd3, tmp_path,
                                                                                 monkeypatch):
    """Every training prompt is encoded at the start: after that an epoch runs with the encoders unusable, and
    trains the LoRA the default run trains."""
    plain = trained_lora(align_config("align.learning_rate=1e-2"), stage_one_sd3, tmp_path / "a")
    trainer = make_trainer(align_config("align.learning_rate=1e-2", "align.offload_text_encoders=true"),
                           stage_one_sd3, tmp_path / "b")
    assert len(trainer.offloaded) == 3  # CLIP-L, CLIP-G, T5
    for encoder in trainer.offloaded:
        monkeypatch.setattr(encoder, "forward", lambda *a, **k: pytest.fail("a text encoder ran while training"))
    samples = trainer.sample_epoch(0)
    trainer.train_epoch(0, samples, trainer.advantages(0, samples))
    for k, v in trainer.denoiser.named_parameters():
        if v.requires_grad:
            assert torch.equal(v, plain[k]), k


def test_offloaded_text_encoders_stay_off_for_grids_and_held_out_sets(stage_one_sd3, tmp_path, monkeypatch):
    """Grid and held-out prompts are encoded at the start too, so drawing them needs no text encoder either:
    the encoders and the transformer never share the device (SD3.5's T5-XXL alone is 8.9 GiB)."""
    config = align_config("align.offload_text_encoders=true", "align.grid_every=1", "align.grid_seeds=[0]",
                          "align.eval_every=1", "align.eval_num_prompts=2", "align.eval_seeds=[0]")
    trainer = make_trainer(config, stage_one_sd3, tmp_path)
    for encoder in trainer.offloaded:
        monkeypatch.setattr(encoder, "forward", lambda *a, **k: pytest.fail("a text encoder ran after the start"))
    trainer.draw_grid(1)
    assert (tmp_path / "samples" / "epoch-1.png").is_file()
    scores = trainer.evaluate(1, 0.0)
    assert scores["heldout/brightness"] > 0


def test_sliced_decoding_gives_the_same_images_one_slice_per_call(stage_one, tmp_path, monkeypatch):
    """Equal up to the decoder's float sums over a different batch (1e-6 per pixel); the rewards then move by
    as much, which PPO's per-prompt normalization can amplify, so the trained LoRA is not compared."""
    from rlbooth.align.rollout import decode

    trainer = make_trainer(align_config("align.decode_slice=2"), stage_one, tmp_path / "t")
    latents = torch.randn(5, *trainer.latent_shape, generator=torch.Generator().manual_seed(0))
    whole = decode(trainer.pipe.vae, latents)
    torch.testing.assert_close(decode(trainer.pipe.vae, latents, 2), whole, rtol=0, atol=1e-6)
    rows, real = [], trainer.pipe.vae.decode
    monkeypatch.setattr(trainer.pipe.vae, "decode", lambda z, *a, **k: rows.append(len(z)) or real(z, *a, **k))
    trainer.sample_epoch(0)
    assert rows and max(rows) == 2 and sum(rows) == trainer.cfg.sample_batch_size * trainer.cfg.num_batches_per_epoch


@pytest.mark.parametrize("algorithm", ["ppo", "refl"])
def test_offloaded_reward_models_train_the_same_lora(algorithm, stage_one, tmp_path, tiny_clip,  # noqa: F811
                                                     head_file, monkeypatch):  # noqa: F811
    """align.offload_rewards moves the reward models, training's and the held-out evaluation's, and nothing else:
    the LoRA is bit-identical, reward feedback learning's too (the models' placement during a call and the backward
    pass: tests/rewards/test_offload.py)."""
    built = []

    class Recorded(train.CompositeReward):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(kwargs["offload_models"])

    monkeypatch.setattr(train, "CompositeReward", Recorded)
    options = {"aesthetic": {"clip_model": str(tiny_clip), "head": str(head_file)},
               "clip_t": {"clip_model": str(tiny_clip)}}
    overrides = [f"align.algorithm={algorithm}", "align.num_epochs=1", "align.learning_rate=1e-2",
                 "align.reward={aesthetic: 0.1, clip_t: 1.0}", f"align.reward_options={json.dumps(options)}",
                 "align.eval_every=1", "align.eval_num_prompts=2", "align.eval_seeds=[0]",
                 "align.eval_rewards={clip_t: 1.0}"]
    plain = align(align_config(*overrides), stage_one, tmp_path / "a")
    offloaded = align(align_config(*overrides, "align.offload_rewards=true"), stage_one, tmp_path / "b")
    assert built == [False, False, True, True]
    a = load_file(str(plain / "pytorch_lora_weights.safetensors"))
    b = load_file(str(offloaded / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if k.endswith("up.weight"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
