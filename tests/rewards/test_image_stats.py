import pytest
import torch

from rlbooth.rewards import RewardError, build_reward

ALL = ["jpeg_compressibility", "jpeg_incompressibility", "brightness", "saturation"]
SIZE = 64


def score(name: str, images: torch.Tensor) -> torch.Tensor:
    batch = images.shape[0]
    return build_reward(name)(images, ["a photo"] * batch, [{}] * batch)


def grey(batch: int = 1, value: float = 0.5) -> torch.Tensor:
    return torch.full((batch, 3, SIZE, SIZE), value)


def noise(batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def test_flat_image_compresses_better_than_noise():
    assert score("jpeg_compressibility", grey()) > score("jpeg_compressibility", noise())
    assert score("jpeg_incompressibility", grey()) < score("jpeg_incompressibility", noise())
    assert score("jpeg_compressibility", noise()) == -score("jpeg_incompressibility", noise())
    assert score("jpeg_incompressibility", noise()).item() > 5  # kB, not bytes


def test_brightness_spans_zero_to_one():
    assert score("brightness", grey(value=0.0)).tolist() == [0.0]
    assert score("brightness", grey(value=1.0)).tolist() == [1.0]
    assert score("brightness", grey(value=0.25)).tolist() == [0.25]


def test_saturation_of_grey_is_zero_and_of_red_is_one():
    red = torch.zeros(1, 3, SIZE, SIZE)
    red[:, 0] = 1.0
    assert score("saturation", grey()).tolist() == [0.0]
    assert score("saturation", grey(value=0.0)).tolist() == [0.0]  # black: no 0/0
    assert score("saturation", red).tolist() == [1.0]


@pytest.mark.parametrize("name", ALL)
def test_output_contract(name):
    images = noise(3).requires_grad_(True)
    out = score(name, images)
    assert out.shape == (3,)
    assert out.dtype == torch.float32
    assert out.device.type == "cpu"
    assert not out.requires_grad
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_batching_invariance(name):
    images = torch.cat([noise(2), grey(), grey(value=0.9)])
    together = score(name, images)
    alone = torch.cat([score(name, image[None]) for image in images])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_half_precision_input(name):
    torch.testing.assert_close(score(name, noise(2).half()), score(name, noise(2).half().float()))


@pytest.mark.parametrize("images, message", [
    (torch.rand(2, 4, 8, 8), r"\(B, 3, H, W\)"),
    (torch.rand(3, 8, 8), r"\(B, 3, H, W\)"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "float"),
    (torch.rand(2, 3, 8, 8) * 2 - 1, r"\[0, 1\].*clamp"),
    (torch.full((2, 3, 8, 8), float("nan")), r"\[0, 1\]"),
])
def test_bad_images_are_rejected(images, message):
    with pytest.raises(RewardError, match=message):
        build_reward("brightness")(images, ["a", "b"], [{}, {}])


def test_prompt_count_must_match():
    with pytest.raises(RewardError, match="2 images, 1 prompts"):
        build_reward("saturation")(grey(2), ["a"], [{}, {}])
