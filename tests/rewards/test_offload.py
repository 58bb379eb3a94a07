"""align.offload_rewards: the model rewards' torch modules wait in host memory and come to the device only while
they score (until the backward pass with reward feedback learning), and the scores and gradients stay the same.

This machine has no accelerator, so device and host are the same memory. The rewards' device here is named
"cpu:0" (the CPU under another name) and `placements` records the device each module was last sent to by name:
"cpu" is host memory, "cpu:0" the reward's device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlbooth.rewards import CompositeReward
from rlbooth.subject import Subject
from tests.conftest import draw_subject_photos
from tests.rewards.test_clip_models import head_file, tiny_clip  # noqa: F401  (module fixtures)
from tests.rewards.test_image_reward import TINY
from tests.rewards.test_image_reward import files as image_reward_files  # noqa: F401
from tests.rewards.test_identity import tiny_vit  # noqa: F401
from tests.rewards.test_reward_gradients import MODEL_REWARDS, PROMPTS, tiny_images

DEVICE = "cpu:0"
METADATA = [{"with_identifier": True}] * len(PROMPTS)


@pytest.fixture(scope="module")
def options(tiny_clip: Path, head_file: Path, image_reward_files: dict, tiny_vit: Path) -> dict:  # noqa: F811
    return {"aesthetic": {"clip_model": str(tiny_clip), "head": str(head_file)},
            "clip_t": {"clip_model": str(tiny_clip)},
            "pickscore": {"model": str(tiny_clip), "processor": str(tiny_clip)},
            "image_reward": {"checkpoint": image_reward_files["checkpoint"],
                             "tokenizer": image_reward_files["tokenizer"], "config": TINY},
            "identity_dino": {"model": str(tiny_vit)}}


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> Subject:
    return Subject(images=draw_subject_photos(tmp_path_factory.mktemp("photos")), class_noun="toy")


def composite(options: dict, subject: Subject, offload: bool, workers: int = 0) -> CompositeReward:
    weights = {name: 0.5 + i for i, name in enumerate(MODEL_REWARDS)}
    return CompositeReward(weights, options, executor_workers=workers, offload_models=offload,
                           context={"device": DEVICE, "subject": subject})


@pytest.fixture
def placements(monkeypatch: pytest.MonkeyPatch) -> dict[int, str]:
    """id(module) -> the device its last `.to(device)` named."""
    where: dict[int, str] = {}
    original = torch.nn.Module.to

    def to(self: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            where[id(self)] = str(device)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    return where


def held_modules(reward: CompositeReward) -> list[torch.nn.Module]:
    return [module for component in reward.components.values() for module in component.torch_modules]


def record_forwards(modules: list[torch.nn.Module], where: dict[int, str]) -> list[str]:
    """Where each module's top-level container was whenever one of its layers ran forward."""
    seen: list[str] = []
    for top in modules:
        for layer in top.modules():
            layer.register_forward_pre_hook(lambda *_, top=top: seen.append(where.get(id(top), "?")))
    return seen


def test_every_model_reward_lists_its_torch_modules(options: dict, subject: Subject):
    reward = composite(options, subject, offload=False)
    counts = {name: len(component.torch_modules) for name, component in reward.components.items()}
    assert counts == {"aesthetic": 2, "clip_t": 1, "pickscore": 1, "image_reward": 2, "identity_dino": 1}
    assert all(isinstance(m, torch.nn.Module) for m in held_modules(reward))


@pytest.mark.parametrize("workers", [0, 1])
def test_offloaded_rewards_score_the_same(options: dict, subject: Subject, workers: int):
    images = tiny_images()
    with composite(options, subject, offload=False) as plain, \
            composite(options, subject, offload=True, workers=workers) as offloaded:
        expected_total, expected = plain(images, PROMPTS, METADATA)
        total, components = offloaded.submit(images, PROMPTS, METADATA).result()
    assert torch.equal(total, expected_total)
    assert components.keys() == expected.keys()
    for name in expected:
        assert torch.equal(components[name], expected[name]), name


@pytest.mark.parametrize("workers", [0, 1])
def test_models_are_on_the_device_only_while_they_score(options: dict, subject: Subject, placements: dict,
                                                        workers: int):
    with composite(options, subject, offload=True, workers=workers) as reward:
        modules = held_modules(reward)
        assert {placements[id(m)] for m in modules} == {"cpu"}  # built on the device, then moved out
        seen = record_forwards(modules, placements)
        for _ in range(2):
            reward.submit(tiny_images(), PROMPTS, METADATA).result()
            assert {placements[id(m)] for m in modules} == {"cpu"}
    assert seen and set(seen) == {DEVICE}


def test_without_the_option_the_models_stay_on_the_device(options: dict, subject: Subject, placements: dict):
    """The factories send their main model to the device by name (aesthetic's head follows the model's device,
    which a CPU tensor reports as "cpu"): what the other tests tell apart."""
    reward = composite(options, subject, offload=False)
    reward(tiny_images(), PROMPTS, METADATA)
    assert {placements[id(c.torch_modules[0])] for c in reward.components.values()} == {DEVICE}


def test_refl_backpropagates_through_the_models_on_the_device(options: dict, subject: Subject, placements: dict):
    """With reward feedback learning the models stay on the device until the backward pass has gone through them
    (LayerNorm and convolutions keep their weights by reference), and the gradient is unchanged."""
    plain, offloaded = composite(options, subject, offload=False), composite(options, subject, offload=True)
    x = tiny_images().requires_grad_(True)
    (expected,) = torch.autograd.grad(plain.differentiable_total(x, PROMPTS, METADATA)[0].sum(), x)
    modules = held_modules(offloaded)
    y = x.detach().clone().requires_grad_(True)
    total, _ = offloaded.differentiable_total(y, PROMPTS, METADATA)
    assert {placements[id(m)] for m in modules} == {DEVICE}  # kept there for the backward pass
    total.sum().backward()
    assert {placements[id(m)] for m in modules} == {"cpu"}  # and out once it has gone through them
    assert torch.equal(y.grad, expected)
    backward: list[str] = []  # hooks reorder the gradients' sums (float rounding): a second pass records
    for top in modules:
        for layer in (m for m in top.modules() if not list(m.children())):  # layers that return tensors
            layer.register_full_backward_pre_hook(lambda *_, top=top: backward.append(placements[id(top)]))
    offloaded.differentiable_total(y, PROMPTS, METADATA)[0].sum().backward()
    assert backward and set(backward) == {DEVICE}
