"""Issue 20's speed-ups leave stage two's numbers as they were: samples, log-probs, logged stats, frozen weights."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from rlbooth.align.merge import adapter_layers, merged_lora
from rlbooth.align.train import DDPOTrainer, reward_workers
from rlbooth.config import ConfigError
from rlbooth.stages import ALIGN_ADAPTER
from tests.align.conftest import align_config
from tests.align.test_train import make_trainer


def randomize_lora(trainer: DDPOTrainer, scale: float = 0.05) -> None:
    """A stage-two LoRA far from its zero start, so merging it changes the weights."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in trainer.pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def frozen_state(trainer: DDPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.pipe.unet.state_dict().items() if "lora" not in k}


@pytest.mark.parametrize("device, setting, workers", [("cpu", None, 0), ("cuda", None, 1), ("cpu", True, 1),
                                                      ("cuda", False, 0)])
def test_rewards_overlap_sampling_by_default_on_cuda_only(device, setting, workers):
    cfg = align_config(f"align.reward_thread={'null' if setting is None else str(setting).lower()}").align
    assert reward_workers(cfg, torch.device(device)) == workers


def test_training_stats_reach_the_host_once_per_epoch_and_equal_the_per_step_means(stage_one, tmp_path, monkeypatch,
                                                                                    item_calls):
    config = align_config("align.kl_coef=0.1", "align.learning_rate=1e-2")
    trainer = make_trainer(config, stage_one, tmp_path)
    samples = trainer.sample_epoch(0)
    advantages = trainer.advantages(0, samples)
    returned: list[dict[str, torch.Tensor]] = []
    train_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *args: returned.append(train_step(*args)) or returned[-1])
    item_calls.clear()
    logs = trainer.train_epoch(0, samples, advantages)
    calls = list(item_calls)
    monkeypatch.undo()
    assert calls == [], f"{len(calls)} .item() calls (host syncs) by rlbooth in one epoch's training: {calls[:3]}"
    assert len(returned) == len(samples.indices) // config.align.train_batch_size * config.align.num_train_timesteps
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for r in returned for v in r.values())
    assert set(logs) == {"loss", "approx_kl", "clipfrac", "ratio", "kl_stage_one"}
    for key, value in logs.items():  # what the per-step .item() calls and np.mean logged before
        assert value == float(np.mean([r[key].item() for r in returned])), key


def optimizer_gradients(trainer: DDPOTrainer, monkeypatch) -> list[list[torch.Tensor]]:
    """The (clipped) gradients each optimizer step of the trainer applies, recorded as the step is taken."""
    seen: list[list[torch.Tensor]] = []
    inner = trainer.optimizer.optimizer
    step = inner.step
    monkeypatch.setattr(inner, "step", lambda *a, **k: seen.append([p.grad.clone() for p in trainer.params])
                        or step(*a, **k))
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage_one", "stage_one_flux"])
def test_timesteps_per_pass_takes_the_same_optimizer_steps_with_fewer_passes(stage, request, tmp_path, monkeypatch):
    """Two epochs with every timestep in its own pass, two per pass, and all four in one: the same optimizer
    steps (gradients after clipping, which is not scale-free, so a wrongly scaled loss shows), the same LoRA
    and logged means, within float rounding of the changed batch shapes."""
    stage_one = request.getfixturevalue(stage)
    runs = {}
    for k in (1, 2, 4):
        config = align_config("align.learning_rate=1e-2", "align.checkpointing_epochs=100", "align.kl_coef=0.1",
                              "align.max_grad_norm=1e-3", f"align.timesteps_per_pass={k}")
        trainer = make_trainer(config, stage_one, tmp_path / str(k))
        grads = optimizer_gradients(trainer, monkeypatch)
        passes = []
        train_step = trainer.train_step
        monkeypatch.setattr(trainer, "train_step", lambda *args: passes.append(len(args[1])) or train_step(*args))
        for epoch in range(2):
            trainer.run_epoch(epoch)
        lora = {i: p.detach().clone() for i, p in enumerate(trainer.params)}
        runs[k] = grads, passes, lora, trainer.history
    one_grads, one_passes, one_lora, one_history = runs[1]
    assert len(one_grads) == 2 * 8 // 4  # 2 epochs x 2 training batches, each an optimizer step
    assert max(g.abs().max() for g in one_grads[-1]) > 0
    for k, (grads, passes, lora, history) in runs.items():
        assert passes == [4 * k] * (len(one_passes) // k), k  # k timesteps x 4 trajectories per pass
        assert len(grads) == len(one_grads), k
        for step, (got, want) in enumerate(zip(grads, one_grads)):
            scale = max(w.abs().max() for w in want)  # rounding is relative to the step's largest entries
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-4 * scale, msg=lambda m: f"k={k}, step {step}: {m}")
        for name, value in lora.items():
            torch.testing.assert_close(value, one_lora[name], rtol=0, atol=1e-4, msg=lambda m: f"k={k}: {name} {m}")
        for got, want in zip(history, one_history):
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (k, key)


def test_timesteps_per_pass_must_divide_the_trained_timesteps():
    with pytest.raises(ConfigError, match="align.timesteps_per_pass"):
        align_config("align.timesteps_per_pass=3")


def sample_with(trainer: DDPOTrainer, merge: bool, epoch: int = 0):
    trainer.merge_lora = merge
    return trainer.sample_epoch(epoch)


def test_merged_lora_samples_what_the_adapter_samples_and_restores_the_weights_exactly(stage_one, tmp_path):
    """Merged and unmerged forwards differ only in float rounding: measured 2e-5 in latents up to 20 and
    2.4e-7 in the log-probs after 4 steps with a large LoRA; the frozen weights come back bit for bit."""
    trainer = make_trainer(align_config(), stage_one, tmp_path)
    randomize_lora(trainer)
    before = frozen_state(trainer)
    plain = sample_with(trainer, merge=False)
    with merged_lora(trainer.pipe.unet, ALIGN_ADAPTER):  # the merge is real: the base weights moved
        assert all(layer.merged for layer in adapter_layers(trainer.pipe.unet, ALIGN_ADAPTER))
        moved = frozen_state(trainer)
    assert any(not torch.equal(moved[k], before[k]) for k in before)
    merged = sample_with(trainer, merge=True)

    assert (plain.latents[:, -1] - plain.latents[:, 0]).abs().max() > 0.1
    torch.testing.assert_close(merged.latents, plain.latents, rtol=1e-5, atol=5e-5)  # |latents| up to ~20
    torch.testing.assert_close(merged.log_probs, plain.log_probs, rtol=0, atol=1e-6)  # ratio 1 +- 1e-6 << clip
    after = frozen_state(trainer)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(layer.merged for layer in adapter_layers(trainer.pipe.unet, ALIGN_ADAPTER))


@pytest.mark.slow
def test_merged_sampling_over_epochs_keeps_frozen_weights_bit_equal_and_matches_unmerged_training(stage_one,
                                                                                                  tmp_path):
    """Three epochs each way (the LoRA is non-zero from the second epoch's sampling on).

    Frozen weights: bit-equal to the start. LoRA (|B| up to 0.06) and logs: sampling's rounding differences
    (1e-7 relative) pass through advantages and Adam; measured 1.1e-5 apart in the LoRA, 2e-5 relative in logs.
    """
    config = lambda merge: align_config("align.learning_rate=1e-2", "align.checkpointing_epochs=100",
                                        f"align.merge_lora_for_sampling={merge}")
    trainers = {merge: make_trainer(config(merge), stage_one, tmp_path / merge) for merge in ("true", "false")}
    assert trainers["true"].merge_lora and not trainers["false"].merge_lora
    start = frozen_state(trainers["true"])
    for trainer in trainers.values():
        for epoch in range(3):
            trainer.run_epoch(epoch)
    merged, plain = trainers["true"], trainers["false"]
    assert all(torch.equal(v, start[k]) for k, v in frozen_state(merged).items())
    lora = lambda t: {k: v for k, v in t.pipe.unet.state_dict().items() if "lora" in k}
    assert any(v.abs().max() > 1e-4 for k, v in lora(merged).items() if "lora_B" in k)
    for key, value in lora(merged).items():
        torch.testing.assert_close(value, lora(plain)[key], rtol=0, atol=1e-4, msg=key)
    for a, b in zip(merged.history, plain.history):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_merge_with_half_precision_weights_is_refused_by_name(stage_one, tmp_path):
    from rlbooth.align.train import preflight

    config = align_config("runtime.mixed_precision=bf16", "align.merge_lora_for_sampling=true")
    with pytest.raises(ConfigError, match="align.merge_lora_for_sampling"):
        preflight(config, stage_one, tmp_path / "out", resume=False)
    assert not make_trainer(align_config("runtime.mixed_precision=bf16"), stage_one, tmp_path).merge_lora


def compile_works() -> bool:
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1))
    except Exception:  # no C++ compiler, an unsupported Python, ...
        return False
    return True


@pytest.mark.skipif(os.environ.get("RLBOOTH_TEST_COMPILE") != "1",
                    reason="compiling the tiny UNet takes about a minute on 2 CPU cores: set RLBOOTH_TEST_COMPILE=1")
def test_compiled_denoiser_samples_what_the_eager_one_samples(stage_one, tmp_path):
    if not compile_works():
        pytest.skip("torch.compile does not run here")
    trainer = make_trainer(align_config("align.compile_denoiser=true"), stage_one, tmp_path)
    randomize_lora(trainer)
    compiled = trainer.sample_epoch(0)
    trainer.sample_epoch(1)  # the compiled graph is reused, and reads the weights as they are now
    compiled_module, trainer.compiled = trainer.compiled, None
    eager = trainer.sample_epoch(0)
    torch.testing.assert_close(compiled.latents, eager.latents, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(compiled.log_probs, eager.log_probs, rtol=0, atol=1e-6)
    with torch.no_grad():  # a changed LoRA reaches the compiled module: its samples change with it
        for name, p in trainer.pipe.unet.named_parameters():
            if "lora_B" in name:
                p.mul_(2)
    trainer.compiled = compiled_module
    assert (trainer.sample_epoch(0).latents - compiled.latents).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_mode_reaches_torch_compile_of_the_sampling_denoiser_only(stage_one, tmp_path, monkeypatch, mode):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: calls.append((module, kwargs)) or module)
    trainer = make_trainer(align_config("align.compile_denoiser=true", f"align.compile_mode={mode}"), stage_one,
                           tmp_path)
    assert calls == [(trainer.pipe.unet, {"mode": mode})]


def test_unknown_compile_mode_is_refused_by_name():
    with pytest.raises(ConfigError, match="align.compile_mode"):
        align_config("align.compile_mode=fast")


def test_fused_adamw_trains_the_lora_the_for_loop_trains(stage_one, tmp_path):
    """runtime.optimizer_impl reaches stage two's optimizer and leaves two epochs' LoRA as it was."""
    config = lambda impl: align_config("align.learning_rate=1e-2", "align.checkpointing_epochs=100",
                                       f"runtime.optimizer_impl={impl}")
    trainers = {impl: make_trainer(config(impl), stage_one, tmp_path / impl) for impl in ("fused", "for-loop")}
    assert trainers["fused"].optimizer.optimizer.defaults["fused"] is True
    for trainer in trainers.values():
        for epoch in range(2):
            trainer.run_epoch(epoch)
    lora = lambda t: {k: v for k, v in t.pipe.unet.state_dict().items() if "lora" in k}
    fused, plain = lora(trainers["fused"]), lora(trainers["for-loop"])
    assert any(v.abs().max() > 1e-4 for k, v in fused.items() if "lora_B" in k)
    for key, value in fused.items():
        torch.testing.assert_close(value, plain[key], rtol=0, atol=1e-5, msg=key)
