"""The toy world's rewards read a rendered image back exactly, through the reward registry."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from rlbooth.rewards import CompositeReward, RewardError, build_reward
from rlbooth.subject import Subject
from rlbooth.toyworld import world
from rlbooth.toyworld.rewards import scene_accuracy
from tests.conftest import REPO


def as_batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture
def subject() -> Subject:
    return Subject.from_yaml(REPO / "examples" / "toyworld" / "subject.yaml")


def scenes_batch(seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(seed)
    captions = [world.Caption(rng.choice(world.SHAPES), rng.choice(list(world.COLOURS)), scene)
                for scene in world.SCENES]
    return as_batch([world.render_caption(c, rng) for c in captions]), [c.text() for c in captions]


def test_alignment_is_one_on_the_truth_and_lower_on_every_other_scene() -> None:
    images, prompts = scenes_batch()
    reward = build_reward("toy_alignment")
    truth = reward(images, prompts, [{}] * len(prompts))
    assert torch.allclose(truth, torch.ones(len(prompts)))
    assert scene_accuracy(images, prompts).tolist() == [1.0] * len(prompts)
    for other in world.SCENES:
        asked = [f"a square {other}"] * len(prompts)
        scores = reward(images, asked, [{}] * len(asked))
        for i, scene in enumerate(world.SCENES):
            assert (scores[i] == 1.0) == (scene == other)
            assert scores[i] < 0.9 or scene == other


def test_alignment_falls_as_the_background_drifts_from_the_scene() -> None:
    images, prompts = scenes_batch()
    reward = build_reward("toy_alignment")
    target = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    scores = [reward(images * (1 - a) + target * a, prompts, [{}] * len(prompts)) for a in (0.0, 0.2, 0.5, 1.0)]
    for closer, further in zip(scores, scores[1:]):
        assert (closer >= further).all() and (closer > further).any()


def test_alignment_needs_a_scene_in_the_prompt() -> None:
    images, _ = scenes_batch()
    with pytest.raises(RewardError, match="'a sks square' names no scene"):
        build_reward("toy_alignment")(images[:1], ["a sks square"], [{}])


def test_identity_tells_the_subject_from_other_squares(subject: Subject) -> None:
    reward = build_reward("toy_identity", subject=subject)
    assert reward.identifier_only
    rng = random.Random(1)
    photos = as_batch([world.render_subject(scene, rng) for scene in world.SCENES])
    others = as_batch([world.render("square", colour, "in a studio", rng) for colour in world.COLOURS])
    assert (reward(photos, ["p"] * len(photos), [{}] * len(photos)) > 0.9).all()
    assert (reward(others, ["p"] * len(others), [{}] * len(others)) < 0.1).all()
    half = photos.clone()
    half[:, :, :, 16:] = others[:1, :, :, 16:]  # half the subject is half as much like it
    assert (reward(half, ["p"] * len(half), [{}] * len(half)) - 0.5).abs().max() < 0.15


def test_identity_needs_the_subject() -> None:
    with pytest.raises(RewardError, match="toy_identity.*subject"):
        build_reward("toy_identity")


def test_aesthetic_prefers_clean_backgrounds() -> None:
    images, prompts = scenes_batch()
    reward = build_reward("toy_aesthetic")
    clean = reward(images, prompts, [{}] * len(prompts))
    noisy = reward((images + 0.1 * torch.randn_like(images)).clamp(0, 1), prompts, [{}] * len(prompts))
    assert torch.allclose(clean, torch.ones_like(clean)) and (noisy < 0.5).all()


def test_rewards_accept_other_resolutions() -> None:
    images, prompts = scenes_batch()
    large = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    reward = build_reward("toy_alignment")
    assert torch.allclose(reward(large, prompts, [{}] * len(prompts)), reward(images, prompts, [{}] * len(prompts)))


def test_composite_gets_the_subject_from_the_run_and_masks_identity(subject: Subject) -> None:
    composite = CompositeReward({"toy_alignment": 1.0, "toy_identity": 1.0}, context={"subject": subject})
    rng = random.Random(2)
    images = as_batch([world.render_subject("on the beach", rng), world.render("square", "red", "on the beach", rng)])
    prompts = ["a sks square on the beach", "a square on the beach"]
    total, parts = composite(images, prompts, [{"with_identifier": True}, {"with_identifier": False}])
    assert parts["toy_identity"][0] > 0.9 and parts["toy_identity"][1].isnan()
    assert torch.allclose(total, torch.tensor([1 + parts["toy_identity"][0].item(), 1.0]))


def test_scene_accuracy_reward_is_one_on_the_asked_scene_only() -> None:
    images, prompts = scenes_batch()
    reward = build_reward("toy_scene_accuracy")
    assert torch.equal(reward(images, prompts, [{}] * len(prompts)), torch.ones(len(prompts)))
    shifted = prompts[1:] + prompts[:1]  # each image now asked for another scene
    assert torch.equal(reward(images, shifted, [{}] * len(prompts)), torch.zeros(len(prompts)))
