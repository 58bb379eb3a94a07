"""Reward feedback learning (align.algorithm=refl): its loss against a computation by hand, the gradient's reach,
the reward's direction on the four tiny families, resume and two processes, and the refused rewards."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlbooth.align import train as train_module
from rlbooth.align.algorithms.refl import refl_loss
from rlbooth.align.train import align
from rlbooth.config import ConfigError
from rlbooth.rewards import RewardError
from rlbooth.stages import read_stage
from tests.align.conftest import align_config, assert_same_lora, kill_and_resume
from tests.align.test_distributed import COMMON, run_two_processes
from tests.align.test_train import brightness_gain, make_trainer

REFL = ("align.algorithm=refl",)
FAMILIES = ["stage_one", "stage_one_sdxl", "stage_one_sd3", "stage_one_flux",
            pytest.param("stage_one_qwenimage", marks=pytest.mark.slow), "stage_one_zimage"]


def test_refl_loss_shapings() -> None:
    total = torch.tensor([0.5, 2.5, -1.0])
    assert refl_loss(total, "linear", 2.0).item() == pytest.approx(-(0.5 + 2.5 - 1.0) / 3)
    assert refl_loss(total, "relu", 2.0).item() == pytest.approx((1.5 + 0.0 + 3.0) / 3)


@pytest.mark.parametrize("overrides, field", [
    (["align.refl_backprop_steps=2"], "align.refl_backprop_steps"),  # a refl field without refl
    ([*REFL, "align.refl_window=[0, 3]"], "align.refl_window"),
    ([*REFL, "align.refl_window=[3, 2]"], "align.refl_window"),
    ([*REFL, "align.refl_window=[5, 9]"], "align.refl_window"),  # beyond the 4 steps
    ([*REFL, "align.refl_window=[1, 1]", "align.refl_backprop_steps=2"], "align.refl_window"),
    ([*REFL, "align.refl_backprop_steps=0"], "align.refl_backprop_steps"),
    ([*REFL, "align.window_shift_every=1"], "align.window_shift_every"),
    ([*REFL, "align.samples_per_noise=2"], "align.samples_per_noise"),
    ([*REFL, "align.nft_beta=0.5"], "align.nft_beta"),
])
def test_bad_refl_settings_name_their_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        align_config(*overrides)


def test_refl_window_counts_steps_from_the_end():
    cfg = align_config(*REFL, "align.num_steps=10", "align.refl_window=[2, 4]").align
    assert cfg.train_steps == [6, 7, 8] and cfg.num_train_timesteps == 1
    cfg = align_config(*REFL, "align.num_steps=10", "align.refl_window=[1, 4]", "align.refl_backprop_steps=3").align
    assert cfg.train_steps == [6, 7]  # 3 steps from step 7 end at the last one


def test_non_differentiable_reward_is_refused_by_name_before_any_model_loads(stage_one, tmp_path, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train_module, "load_stage_pipeline", no_models)
    config = align_config(*REFL, "align.reward={brightness: 1.0, jpeg_compressibility: 0.1}")
    with pytest.raises(RewardError, match="'jpeg_compressibility' is not differentiable") as err:
        align(config, stage_one, tmp_path / "out")
    assert "'brightness'" not in str(err.value) and "ppo or nft" in str(err.value)


def test_rlbooth_run_refuses_it_before_stage_one(tmp_path):
    from rlbooth.run import run
    from rlbooth.subject import Subject

    config = align_config(*REFL, "align.reward={jpeg_incompressibility: 1.0}")
    with pytest.raises(RewardError, match="'jpeg_incompressibility' is not differentiable"):
        run(config, Subject(images=tmp_path / "photos", class_noun="toy"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def by_hand_sd(trainer, samples, rows, step, weights: dict[str, float], k: int) -> torch.Tensor:
    """ReFL's loss on the tiny SD 1.x written out with diffusers' modules: CFG on the UNet, epsilon -> x0,
    K - 1 DDIM (eta 0) steps first, the VAE's decode, then brightness and saturation by their formulas."""
    pipe, unet = trainer.pipe, trainer.acc.unwrap_model(trainer.unet)
    alphas = pipe.scheduler.alphas_cumprod
    timesteps = samples.timesteps
    hidden = torch.cat([trainer.uncond.hidden.expand(len(rows), -1, -1), samples.embeds.hidden[rows]])
    x = samples.latents[rows, step]
    for j in range(k):
        t = timesteps[step + j]
        out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=hidden).sample
        eps = out[:len(rows)] + trainer.cfg.guidance_scale * (out[len(rows):] - out[:len(rows)])
        a = alphas[t].view(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if j < k - 1:
            a_next = alphas[timesteps[step + j + 1]].view(-1, 1, 1, 1)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    images = (pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    brightness = images.mean(dim=(1, 2, 3))
    top, bottom = images.amax(dim=1), images.amin(dim=1)
    saturation = ((top - bottom) / top.clamp_min(1e-12)).mean(dim=(1, 2))
    return -(weights["brightness"] * brightness + weights["saturation"] * saturation).mean()


@pytest.mark.parametrize("k", [1, 2])
def test_loss_is_minus_the_weighted_reward_of_the_decoded_x0_prediction(stage_one, tmp_path, k):
    weights = {"brightness": 2.0, "saturation": -0.5}
    config = align_config(*REFL, "align.reward={brightness: 2.0, saturation: -0.5}", "align.num_steps=6",
                          f"align.refl_backprop_steps={k}", "align.refl_window=[1, 4]")
    trainer = make_trainer(config, stage_one, tmp_path)
    samples = trainer.sample_epoch(0)
    rows, step = torch.tensor([0, 3, 5]), torch.tensor([6 - 4, 6 - 3, 6 - k])
    loss, info = trainer.algorithm.loss(samples, rows, step, torch.zeros(3))
    with torch.no_grad():
        hand = by_hand_sd(trainer, samples, rows, step, weights, k)
    assert loss.item() == pytest.approx(hand.item(), rel=1e-4, abs=1e-6)
    assert info["refl_reward"].item() == pytest.approx(-hand.item(), rel=1e-4, abs=1e-6)


def test_flow_loss_is_minus_the_reward_of_the_decoded_velocity_x0(stage_one_sd3, tmp_path):
    """The same on the tiny SD3 written out: CFG on the transformer, x0 = x_t - sigma v, the VAE's shift and
    scale undone before decoding."""
    config = align_config(*REFL, "align.num_steps=6", "align.refl_window=[1, 4]")
    trainer = make_trainer(config, stage_one_sd3, tmp_path)
    samples = trainer.sample_epoch(0)
    rows, step = torch.tensor([1, 2]), torch.tensor([2, 5])
    loss, _ = trainer.algorithm.loss(samples, rows, step, torch.zeros(2))
    pipe, transformer = trainer.pipe, trainer.acc.unwrap_model(trainer.unet)
    cond, uncond = samples.embeds[rows], trainer.uncond
    with torch.no_grad():
        x, t = samples.latents[rows, step], samples.timesteps[step]
        v_cond = transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.hidden,
                             pooled_projections=cond.added["pooled_projections"]).sample
        v_uncond = transformer(hidden_states=x, timestep=t, encoder_hidden_states=uncond.hidden.expand(2, -1, -1),
                               pooled_projections=uncond.added["pooled_projections"].expand(2, -1)).sample
        v = v_uncond + config.align.guidance_scale * (v_cond - v_uncond)
        sigma = (t / 1000).view(-1, 1, 1, 1)
        x0 = x - sigma * v
        vae = pipe.vae
        decoded = vae.decode(x0 / vae.config.scaling_factor + vae.config.shift_factor).sample
        hand = -((decoded / 2 + 0.5).clamp(0, 1).mean(dim=(1, 2, 3))).mean()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("stage", FAMILIES)
def test_gradient_reaches_the_lora_only(stage, request, tmp_path):
    config = align_config(*REFL, "align.learning_rate=1e-2", "align.kl_coef=1e-2", "align.refl_backprop_steps=2",
                          "align.num_batches_per_epoch=1", "align.sample_batch_size=2", "align.train_batch_size=2")
    trainer = make_trainer(config, request.getfixturevalue(stage), tmp_path)
    samples = trainer.sample_epoch(0)
    assert samples.latents.shape[1] == config.align.num_steps + 1  # the trajectories: training restarts them
    modules = {"denoiser": trainer.denoiser, "vae": trainer.pipe.vae,
               **{f"text_{i}": m for i, m in enumerate(trainer.family.text_encoder_modules(trainer.pipe))}}
    frozen = {(name, k): v.clone() for name, m in modules.items() for k, v in m.state_dict().items()
              if "lora" not in k}
    lora = [p.detach().clone() for p in trainer.params]
    logs = trainer.train_epoch(0, samples, trainer.advantages(0, samples))
    assert set(logs) == {"loss", "refl_reward", "kl_stage_one"} and all(math.isfinite(v) for v in logs.values())
    assert all(not torch.equal(a, p) for a, p in zip(lora, trainer.params)), "a LoRA tensor did not move"
    for (name, k), v in frozen.items():
        assert torch.equal(modules[name].state_dict()[k], v), (name, k)


def test_pretrain_term_is_stage_ones_loss_and_training_lowers_it(stage_one, tmp_path):
    """align.refl_pretrain_weight adds stage one's denoising loss on the subject photos: alone (reward weight
    0) a few updates lower it on a fixed batch of photos, noise and timesteps."""
    config = align_config(*REFL, "align.reward={brightness: 0.0}", "align.refl_pretrain_weight=2.0",
                          "align.learning_rate=1e-2", "align.num_batches_per_epoch=1")
    trainer = make_trainer(config, stage_one, tmp_path)
    pretrain = trainer.algorithm.pretrain
    samples = trainer.sample_epoch(0)
    rows, step = torch.arange(4), torch.full((4,), 3)
    loss, info = trainer.algorithm.loss(samples, rows, step, torch.zeros(4))
    assert loss.item() == pytest.approx(2.0 * info["pretrain_loss"].item(), rel=1e-6)
    with torch.no_grad():
        before = pretrain([1, 2, 3, 4]).item()
    for epoch in range(3):
        trainer.train_epoch(epoch, samples, torch.zeros(len(samples.indices)))
    with torch.no_grad():
        after = pretrain([1, 2, 3, 4]).item()
    assert after < before, (before, after)


SIGN_SETTINGS = {"sdxl": ("1e-3", 256, 4)}
"""(learning rate, evaluation seeds, epochs) where the defaults (1e-2, 32, 2) do not fit the tiny model."""


@pytest.mark.slow
@pytest.mark.parametrize("weight", [1.0, -1.0])
def test_refl_climbs_the_reward_in_its_sign(any_stage_one_8px, tmp_path, weight):
    """+brightness must brighten, -brightness darken under ReFL, as under PPO (tests/align/test_train.py).

    One optimizer step per epoch on 8 samples. Measured (z of the brightness change on the evaluation seeds,
    + / - brightness): SD 1.x +5.4 / -7.3, SD3 +11.3 / -11.4, FLUX +21.1 / -20.5 (their tiny T5 at 64 positions;
    at 512, +11.2 / -10.8 and +21.8 / -21.7), Qwen-Image +19.8 / -19.6, Z-Image +24.9 / -21.2 at the defaults
    (FLUX, Qwen-Image and Z-Image since their stage one's class images are drawn at its 8 px: 2026-12-06); the tiny
    SDXL moves little (z +1.8 / -0.8 at the defaults, +0.1 / +1.1 at lr 3e-3 with 32 samples), and follows
    the sign at lr 1e-3 over 4 epochs (+3.0 / -2.8 on 256 seeds). With the reward's sign flipped in the loss
    (refl_loss(-total, ...)) the eight cases of the first four fail (checked once)."""
    family = read_stage(any_stage_one_8px).metadata["family"]
    learning_rate, eval_seeds, epochs = SIGN_SETTINGS.get(family, ("1e-2", 32, 2))
    config = align_config(*REFL, f"align.reward={{brightness: {weight}}}", "runtime.seed=0",
                          f"align.num_epochs={epochs}", "align.sample_batch_size=8", "align.num_batches_per_epoch=1",
                          "align.train_batch_size=8", f"align.learning_rate={learning_rate}")
    out = align(config, any_stage_one_8px, tmp_path / "out")
    gain = brightness_gain(any_stage_one_8px, out.parent, seeds=list(range(100, 100 + eval_seeds)))
    z = gain.mean() / (gain.std() / len(gain) ** 0.5)
    assert weight * z > 2, f"brightness change {gain.mean():.2e} (z={z:.1f}) does not follow the reward {weight}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage_one_8px", "stage_one_sd3"])
def test_killed_refl_run_resumes_to_the_same_weights(stage, request, tmp_path, monkeypatch):
    """The drawn steps are keyed by (seed, epoch, pass, sample): the resumed run restarts the same steps."""
    stage_one = request.getfixturevalue(stage)
    overrides = (*REFL, "align.num_epochs=4", "align.checkpointing_epochs=2", "align.checkpoints_total_limit=null",
                 "align.learning_rate=1e-2", "align.refl_window=[1, 3]")
    whole = align(align_config(*overrides), stage_one, tmp_path / "whole")
    resumed = kill_and_resume(align_config(*overrides), stage_one, tmp_path / "resumed", 3, monkeypatch)
    a = load_file(str(whole / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k or ".up." in k), "nothing was trained"
    assert_same_lora(whole, resumed)
    history = lambda folder: json.loads((folder.parent / "rlbooth.json").read_text())["history"]
    assert history(whole) == history(resumed)


@pytest.mark.slow
@pytest.mark.parametrize("stage, extra", [("stage_one", ()), ("stage_one_sd3", ()),
                                          ("stage_one", ("align.refl_pretrain_weight=1.0",
                                                         "align.refl_backprop_steps=2"))])
def test_two_refl_processes_equal_one(stage, extra, request, tmp_path):
    """As tests/align/test_distributed.py for ppo: the drawn steps and the loss are the same whether the 4
    samples of an epoch are trained on one process or split over two; also with DRaFT-2 (two checkpointed
    denoiser passes) and the pretraining term (a third pass, its photos keyed per sample: keyed per batch and
    process, the LoRAs differed by 0.04)."""
    stage_one = request.getfixturevalue(stage)
    single = align(align_config(*COMMON, *REFL, *extra, "align.sample_batch_size=2", "align.num_batches_per_epoch=2",
                                "align.train_batch_size=2", "align.gradient_accumulation_steps=2"),
                   stage_one, tmp_path / "single")
    run_two_processes(stage_one, tmp_path / "two", (*REFL, *extra))
    meta = json.loads((tmp_path / "two" / "rlbooth.json").read_text())
    single_history = json.loads((single.parent / "rlbooth.json").read_text())["history"]
    rewards, single_rewards = ([h["reward_mean"] for h in history] for history in (meta["history"], single_history))
    assert rewards[0] == single_rewards[0]  # the same samples from the same weights
    # later epochs draw from LoRAs that differ by the gradients' summation order (about 1e-7 on the tiny SD3)
    assert rewards[1:] == pytest.approx(single_rewards[1:], rel=1e-5, abs=0)
    a = load_file(str(single / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert any(v.abs().sum() > 0 for k, v in a.items() if ".up." in k or "lora_B" in k), "nothing was trained"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
