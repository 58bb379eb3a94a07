"""Differentiable rewards (reward feedback learning): the same values as scoring gives, gradients equal to finite
differences, and a composite that backpropagates through its weighted components or names those that cannot."""

from __future__ import annotations

import pytest
import torch

from rlbooth.rewards import CompositeReward, RewardError, backpropagating, build_reward, reward_is_differentiable
from rlbooth.rewards.composite import check_composite
from rlbooth.subject import Subject
from tests.conftest import REPO
from tests.toyworld.test_rewards import scenes_batch

DIFFERENTIABLE = ["brightness", "saturation", "toy_alignment", "toy_aesthetic", "toy_identity"]

# Scores of `fixed_batch()` by the numpy-era and no-grad code these rewards had before they were made
# differentiable (rlbooth main at f7386aa), written down.
BEFORE = {
    "brightness": [0.553144, 0.752345, 0.203291],
    "saturation": [0.428638, 0.200693, 0.474545],
    "toy_alignment": [0.955087, 0.928997, 0.947347],
    "toy_aesthetic": [0.318768, 0.314245, 0.320976],
    "toy_identity": [1.4e-05, 0.030229, 1.8e-05],
}


@pytest.fixture(scope="module")
def subject() -> Subject:
    return Subject.from_yaml(REPO / "examples" / "toyworld" / "subject.yaml")


def fixed_batch() -> tuple[torch.Tensor, list[str]]:
    """Three rendered toy-world images with some noise, and their prompts."""
    images, prompts = scenes_batch(3)
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    return (images * 0.8 + 0.2 * noise).clamp(0, 1)[:3], prompts[:3]


def make(name: str, subject: Subject):
    return build_reward(name, **({"subject": subject} if name == "toy_identity" else {}))


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_values_are_unchanged_and_the_differentiable_call_gives_them_too(name: str, subject: Subject) -> None:
    images, prompts = fixed_batch()
    reward = make(name, subject)
    scored = reward(images, prompts, [{}] * 3)
    assert scored.tolist() == pytest.approx(BEFORE[name], abs=1e-6)
    assert not scored.requires_grad and scored.device.type == "cpu"
    leaf = images.clone().requires_grad_(True)
    with backpropagating():
        connected = reward(leaf, prompts, [{}] * 3)
    assert connected.requires_grad and connected.dtype == torch.float32
    assert torch.equal(connected.detach(), scored)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_gradient_equals_finite_differences(name: str, subject: Subject) -> None:
    images, prompts = fixed_batch()
    reward = make(name, subject)
    leaf = (images[:1].double() * 0.6 + 0.2).requires_grad_(True)  # away from 0 and 1, where values are clamped

    def score(x: torch.Tensor) -> torch.Tensor:
        with backpropagating():
            return reward(x, prompts[:1], [{}])

    assert reward_is_differentiable(name)
    assert torch.autograd.gradcheck(score, (leaf,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_jpeg_and_scene_accuracy_are_not_differentiable() -> None:
    for name in ("jpeg_compressibility", "jpeg_incompressibility", "toy_scene_accuracy"):
        assert not reward_is_differentiable(name)


def test_differentiable_total_is_the_weighted_sum_and_honours_identifier_only(subject: Subject) -> None:
    images, prompts = fixed_batch()
    metadata = [{"with_identifier": True}, {"with_identifier": False}, {"with_identifier": True}]
    composite = CompositeReward({"brightness": 2.0, "toy_identity": -3.0}, context={"subject": subject})
    leaf = images.clone().requires_grad_(True)
    total, components = composite.differentiable_total(leaf, prompts, metadata)
    scored_total, scored = composite(images, prompts, metadata)
    assert total.requires_grad and not components["toy_identity"].requires_grad
    # by hand, from the written-down scores: identity only where the prompt names the subject
    hand = [2 * 0.553144 - 3 * 1.4e-05, 2 * 0.752345, 2 * 0.203291 - 3 * 1.8e-05]
    assert total.tolist() == pytest.approx(hand, abs=1e-5)
    assert torch.allclose(total.detach(), scored_total)
    assert components["toy_identity"][1].isnan() and torch.equal(components["brightness"], scored["brightness"])
    total.sum().backward()
    # brightness is the mean pixel: the middle image's gradient is 2 / (3 H W) everywhere
    assert torch.allclose(leaf.grad[1], torch.full_like(leaf.grad[1], 2 / leaf[1].numel()))


@pytest.mark.parametrize("weights", [{"brightness": 1.0, "jpeg_compressibility": 0.5},
                                     {"toy_scene_accuracy": 1.0, "jpeg_incompressibility": 1.0}])
def test_refl_refuses_a_non_differentiable_reward_by_name(weights: dict[str, float]) -> None:
    blocked = [name for name in weights if name != "brightness"]
    with pytest.raises(RewardError, match="not differentiable") as err:
        check_composite(weights, {}, differentiable=True)
    assert all(repr(name) in str(err.value) for name in blocked) and "'brightness'" not in str(err.value)
    assert "align.algorithm ppo or nft" in str(err.value)
    check_composite(weights, {})  # ppo and nft take it
