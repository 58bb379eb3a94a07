import json
import math

import numpy as np
import pytest
import torch

from rlbooth.align.ppo import (PerPromptStatTracker, batch_advantages, clip_advantages, group_advantages,
                              ppo_clip_loss)

CLIP = 0.2

# (advantage, ratio, expected loss, expected d loss / d log_prob, clipped?)
# d/d log_prob of -adv * ratio is -adv * ratio; the clipped branch is constant.
CASES = {
    "adv+ inside": (2.0, 1.1, -2.0 * 1.1, -2.0 * 1.1, False),
    "adv+ above": (2.0, 1.5, -2.0 * 1.2, 0.0, True),
    "adv+ below": (2.0, 0.5, -2.0 * 0.5, -2.0 * 0.5, True),
    "adv- inside": (-2.0, 0.9, 2.0 * 0.9, 2.0 * 0.9, False),
    "adv- above": (-2.0, 1.5, 2.0 * 1.5, 2.0 * 1.5, True),
    "adv- below": (-2.0, 0.5, 2.0 * 0.8, 0.0, True),
}


@pytest.mark.parametrize("adv, ratio, loss_value, grad, outside", CASES.values(), ids=CASES.keys())
def test_clip_loss_table(adv, ratio, loss_value, grad, outside):
    old = torch.tensor([-0.3], dtype=torch.float64)
    log_prob = (old + math.log(ratio)).requires_grad_(True)
    loss, info = ppo_clip_loss(log_prob, old, torch.tensor([adv], dtype=torch.float64), CLIP)
    loss.backward()
    assert loss.item() == pytest.approx(loss_value, rel=1e-9)
    assert log_prob.grad.item() == pytest.approx(grad, abs=1e-9)
    assert info["clipfrac"].item() == float(outside)
    assert info["ratio"].item() == pytest.approx(ratio, rel=1e-9)
    assert info["approx_kl"].item() == pytest.approx(0.5 * math.log(ratio) ** 2, rel=1e-9)


def test_clip_loss_is_a_batch_mean():
    advs, ratios, losses, grads, outside = zip(*CASES.values())
    old = torch.zeros(len(advs), dtype=torch.float64)
    log_prob = torch.log(torch.tensor(ratios, dtype=torch.float64)).requires_grad_(True)
    loss, info = ppo_clip_loss(log_prob, old, torch.tensor(advs, dtype=torch.float64), CLIP)
    loss.backward()
    n = len(advs)
    assert loss.item() == pytest.approx(sum(losses) / n)
    torch.testing.assert_close(log_prob.grad, torch.tensor(grads, dtype=torch.float64) / n)
    assert info["clipfrac"].item() == pytest.approx(sum(outside) / n)
    assert all(not v.requires_grad for v in info.values())


def test_ratio_one():
    g = torch.Generator().manual_seed(0)
    log_prob = torch.randn(8, generator=g).requires_grad_(True)
    adv = torch.randn(8, generator=g)
    loss, info = ppo_clip_loss(log_prob, log_prob.detach().clone(), adv, 1e-4)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert info["clipfrac"].item() == 0.0
    assert info["approx_kl"].item() == 0.0
    assert info["ratio"].item() == 1.0


def test_clip_loss_rejects_bad_arguments():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(x, x, x, 0.0)
    with pytest.raises(ValueError, match="shape"):
        ppo_clip_loss(x, x, torch.zeros(4, 1), 0.1)


def test_batch_and_clip_advantages():
    rewards = np.array([1.0, 2.0, 3.0, 10.0])
    adv = batch_advantages(rewards)
    np.testing.assert_allclose(adv, (rewards - rewards.mean()) / (rewards.std() + 1e-6))
    assert adv.mean() == pytest.approx(0.0) and adv.std() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_array_equal(clip_advantages(np.array([-7.0, -1.0, 0.5, 6.0]), 5.0), [-5.0, -1.0, 0.5, 5.0])
    with pytest.raises(ValueError, match="max_abs"):
        clip_advantages(adv, 0.0)


def test_group_advantages_by_hand():
    adv = group_advantages(np.array([1.0, 3.0, 10.0, 14.0]), np.array([0, 0, 1, 1]))
    residuals = np.array([-1.0, 1.0, -2.0, 2.0])
    np.testing.assert_allclose(adv, residuals / (residuals.std() + 1e-6))


def test_group_advantages_ignore_what_the_start_decided():
    """Adding any constant per group (what a shared initial noise contributes) changes no advantage."""
    rng = np.random.default_rng(0)
    rewards, groups = rng.normal(size=24), np.repeat(np.arange(6), 4)
    shifted = rewards + rng.normal(scale=100.0, size=6)[groups]
    np.testing.assert_allclose(group_advantages(shifted, groups), group_advantages(rewards, groups), atol=1e-9)
    assert np.allclose(np.bincount(groups, weights=group_advantages(rewards, groups)), 0.0)


def test_group_advantages_reject_lone_samples_and_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 samples"):
        group_advantages(np.array([1.0, 2.0, 3.0]), np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="equal length"):
        group_advantages(np.array([1.0, 2.0]), np.array([0, 0, 1]))


def normalized(values, reference):
    reference = np.asarray(reference, dtype=np.float64)
    return (np.asarray(values, dtype=np.float64) - reference.mean()) / (reference.std() + 1e-6)


def test_tracker_uses_batch_stats_until_min_count():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=3)
    prompts = ["a", "a", "b"]
    rewards = np.array([1.0, 2.0, 10.0])
    # "a" has 2 < 3 values, "b" 1: both normalized by the whole batch.
    np.testing.assert_allclose(tracker.update(prompts, rewards), normalized(rewards, rewards))
    # Now "a" has 4 buffered values (>= 3) and uses its buffer; "b" has 2 and still uses the batch.
    rewards2 = np.array([3.0, 4.0, 20.0])
    adv = tracker.update(prompts, rewards2)
    np.testing.assert_allclose(adv[:2], normalized([3.0, 4.0], [1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose(adv[2], normalized([20.0], rewards2))
    assert tracker.stats() == {"num_prompts": 2, "mean_buffer_length": 3.0}


def test_tracker_extends_buffer_before_deciding():
    """A prompt reaching min_count in this batch already uses its buffer (ddpo-pytorch)."""
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    adv = tracker.update(["a", "a", "b", "b", "b"], np.array([0.0, 2.0, 100.0, 200.0, 300.0]))
    np.testing.assert_allclose(adv[:2], [-1.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(adv[2:], normalized([100.0, 200.0, 300.0], [100.0, 200.0, 300.0]))


def test_tracker_truncates_to_buffer_size():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    tracker.update(["p"] * 4, np.array([100.0, 1.0, 2.0, 3.0]))
    assert tracker.state_dict() == {"buffers": {"p": [1.0, 2.0, 3.0]}}
    adv = tracker.update(["p"], np.array([5.0]))
    np.testing.assert_allclose(adv, normalized([5.0], [2.0, 3.0, 5.0]))
    assert tracker.stats()["mean_buffer_length"] == 3.0


def test_tracker_normalizes_prompts_independently():
    tracker = PerPromptStatTracker(buffer_size=16, min_count=1)
    rng = np.random.default_rng(0)
    prompts = ["low", "high"] * 8
    rewards = np.where(np.array(prompts) == "low", 0.0, 100.0) + rng.normal(size=16)
    adv = tracker.update(prompts, rewards)
    for prompt in ("low", "high"):
        mask = np.array(prompts) == prompt
        np.testing.assert_allclose(adv[mask], normalized(rewards[mask], rewards[mask]))
        assert abs(adv[mask].mean()) < 1e-9  # not pushed to +-1 by the other prompt's scale


def test_tracker_state_dict_round_trips_through_json():
    rng = np.random.default_rng(1)
    prompts = ["a cat", "a dog", "a cat", "sks dog"]
    tracker = PerPromptStatTracker(buffer_size=5, min_count=2)
    for _ in range(3):
        tracker.update(prompts, rng.normal(size=4).astype(np.float32))
    restored = PerPromptStatTracker(buffer_size=5, min_count=2)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.state_dict() == tracker.state_dict()
    assert restored.stats() == tracker.stats()
    for _ in range(3):
        rewards = rng.normal(size=4)
        np.testing.assert_array_equal(restored.update(prompts, rewards), tracker.update(prompts, rewards))


def test_tracker_load_keeps_newest_when_buffer_is_smaller():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=1)
    tracker.load_state_dict({"buffers": {"p": [1.0, 2.0, 3.0]}})
    assert tracker.state_dict() == {"buffers": {"p": [2.0, 3.0]}}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"buffer_size": 0, "min_count": 1}, "buffer_size"),
        ({"buffer_size": 4, "min_count": 0}, "min_count"),
        ({"buffer_size": 4, "min_count": 5}, "min_count"),
    ],
)
def test_tracker_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PerPromptStatTracker(**kwargs)


def test_tracker_rejects_mismatched_rewards():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=1)
    with pytest.raises(ValueError, match="rewards"):
        tracker.update(["a", "b"], np.array([1.0]))
