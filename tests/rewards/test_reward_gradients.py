"""The model rewards' differentiable path (reward feedback learning), on the tiny models the reward tests build.

Called under grad mode with images that require grad, aesthetic, clip_t, pickscore, image_reward and
identity_dino resize with torch instead of PIL and return scores connected to the images; called any other
way they return what they always did (their own tests pin those values exactly).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlbooth.rewards import backpropagating, build_reward, reward_is_differentiable
from rlbooth.rewards import image_reward as ir
from rlbooth.rewards.clip_models import CLIP_STD, ClipPreprocess, load_aesthetic_head, load_clip_encoder
from rlbooth.rewards.grad_path import resize_smooth
from rlbooth.rewards.identity import IMAGENET_STD, dino_preprocess
from rlbooth.subject import Subject
from tests.conftest import draw_subject_photos, max_level_difference, pil_to_batch, real_photo_layouts
from tests.rewards.test_clip_models import head_file, tiny_clip  # noqa: F401  (module fixtures)
from tests.rewards.test_image_reward import TINY
from tests.rewards.test_image_reward import files as image_reward_files  # noqa: F401
from tests.rewards.test_identity import tiny_vit  # noqa: F401

MODEL_REWARDS = ["aesthetic", "clip_t", "pickscore", "image_reward", "identity_dino"]
PROMPTS = ["a photo of a cat", "a sks dog on the beach"]


@pytest.fixture(scope="module")
def rewards(tiny_clip: Path, head_file: Path, image_reward_files: dict, tiny_vit: Path,  # noqa: F811
            tmp_path_factory: pytest.TempPathFactory) -> dict:
    subject = Subject(images=draw_subject_photos(tmp_path_factory.mktemp("photos")), class_noun="toy")
    return {
        "aesthetic": build_reward("aesthetic", clip_model=str(tiny_clip), head=str(head_file)),
        "clip_t": build_reward("clip_t", clip_model=str(tiny_clip)),
        "pickscore": build_reward("pickscore", model=str(tiny_clip), processor=str(tiny_clip)),
        "image_reward": build_reward("image_reward", checkpoint=image_reward_files["checkpoint"],
                                     tokenizer=image_reward_files["tokenizer"], config=TINY),
        "identity_dino": build_reward("identity_dino", model=str(tiny_vit), subject=subject),
    }


def tiny_images(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Two 12 x 16 images in [0.2, 0.8] (away from the clamp): upscaled, and for CLIP and ImageReward cropped."""
    return 0.2 + 0.6 * torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def score(reward, images: torch.Tensor) -> torch.Tensor:
    return reward(images, PROMPTS, [{"with_identifier": True}] * len(PROMPTS))


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_registered_differentiable(name: str):
    assert reward_is_differentiable(name, {})


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_gradient_matches_finite_differences(rewards: dict, name: str):
    """d(w . reward)/d(images) along random directions equals central differences of the same path.

    float32 models (the rewards' dtype option stops at float32): step 1e-2 in [0, 1] units along unit
    directions; the two agree to within 1e-3 of the gradient's norm (seen: at most 9e-5, identity_dino).
    """
    reward, weights = rewards[name], torch.tensor([0.7, -1.3])
    x = tiny_images().requires_grad_(True)
    with backpropagating():
        scores = score(reward, x)
        assert scores.requires_grad and scores.shape == (2,) and scores.dtype == torch.float32
        (gradient,) = torch.autograd.grad((weights * scores).sum(), x)
    assert gradient.abs().sum() > 0
    generator, step = torch.Generator().manual_seed(1), 1e-2
    for _ in range(4):
        direction = torch.randn(x.shape, generator=generator)
        direction /= direction.norm()
        with backpropagating():  # the same (torch-resize) path as the gradient's
            ahead = score(reward, (x + step * direction).detach().requires_grad_(True)).detach()
            behind = score(reward, (x - step * direction).detach().requires_grad_(True)).detach()
        numeric = float((weights * (ahead - behind)).sum() / (2 * step))
        analytic = float((gradient * direction).sum())
        assert abs(numeric - analytic) <= 1e-3 * gradient.norm().item(), (numeric, analytic)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_without_grad_the_score_is_the_pil_path_and_close_to_the_torch_path(rewards: dict, name: str):
    """Without gradients (no_grad, or images that do not require grad) the score is the exact 8-bit/PIL one,
    on the CPU; the torch path's score is within 5% (+ 1e-3) of it on these 8-bit images (seen: 1.9% for the
    tiny random ImageReward, whose weights are large, 0.5% or less for the others)."""
    reward = rewards[name]
    x = torch.randint(0, 256, (2, 3, 24, 30), generator=torch.Generator().manual_seed(3)).float() / 255
    plain = score(reward, x)
    with torch.no_grad():
        asked = score(reward, x.clone().requires_grad_(True))
    assert torch.equal(plain, asked) and not plain.requires_grad and plain.device.type == "cpu"
    with backpropagating():
        smooth = score(reward, x.clone().requires_grad_(True))
    assert smooth.requires_grad
    assert not torch.equal(smooth.detach(), plain)  # a different resize ran
    torch.testing.assert_close(smooth.detach(), plain, atol=1e-3, rtol=0.05)
    with backpropagating():  # images a VAE decoded in bf16: resized in float32, scored in float32
        half = score(reward, x.bfloat16().requires_grad_(True))
    assert half.requires_grad and half.dtype == torch.float32
    torch.testing.assert_close(half.detach(), plain, atol=0.02, rtol=0.1)


def test_reward_weights_stay_frozen(rewards: dict, tiny_clip: Path, head_file: Path):  # noqa: F811
    """The models the rewards load have no trainable parameter, so a backward through them trains nothing."""
    encoder = load_clip_encoder(str(tiny_clip), "model", str(tiny_clip), "processor", "cpu", torch.float32, 4,
                                with_text=True)
    head = load_aesthetic_head(str(head_file), encoder.model.config.projection_dim)
    scorer, dino = rewards["image_reward"], rewards["identity_dino"]
    x = tiny_images().requires_grad_(True)
    with backpropagating():
        total = head(encoder.images(x)).sum() + score(scorer, x).sum() + score(dino, x).sum()
        total.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for module in (encoder.model, head, scorer.model, scorer.head, dino.model):
        assert not any(p.requires_grad or p.grad is not None for p in module.parameters())
        assert not module.training


@pytest.mark.parametrize("layout", ["photo", "mosaic", "wide"])
def test_torch_preprocessing_is_close_to_the_pil_path_on_a_real_photo(layout: str):
    """At 224 px, torch's antialiased bicubic (clamped) is within 6 pixel levels of PIL's 8-bit resize and 0.4 on
    average (seen: max 4.6 / 5.7 / 3.3, mean 0.29 / 0.28 / 0.30 for photo / mosaic / wide)."""
    x = pil_to_batch(real_photo_layouts()[layout])
    clip = ClipPreprocess(224, (224, 224))
    pairs = [(clip, CLIP_STD), (lambda images: ir.preprocess(images, 224), ir.CLIP_STD),
             (lambda images: dino_preprocess(images, 224), IMAGENET_STD)]
    for preprocess, std in pairs:
        exact = preprocess(x)
        with backpropagating():
            smooth = preprocess(x.clone().requires_grad_(True))
        assert smooth.requires_grad and smooth.shape == exact.shape
        assert max_level_difference(smooth.detach(), exact, std) < 6.0
        assert max_level_difference(smooth.detach(), exact, std) > 1.0  # not the PIL path
        mean_levels = float(((smooth.detach() - exact).abs() * torch.tensor(std).view(1, 3, 1, 1) * 255).mean())
        assert mean_levels < 0.4


def test_resize_smooth_is_pil_bicubic_without_rounding():
    """One value by hand: a 4-pixel ramp halved by PIL's antialiased bicubic (a = -0.5, stretched x2).

    Output pixel 0 is centred at input 1.0; input j (centred at j + 0.5) weighs k((j + 0.5 - 1) / 2) with
    k(t) = 1.5|t|^3 - 2.5|t|^2 + 1 (|t| < 1), -0.5|t|^3 + 2.5|t|^2 - 4|t| + 2 (1 <= |t| < 2), normalized:
    k(0.25) = 0.8671875 (inputs 0, 1), k(0.75) = 0.2265625 (input 2), k(1.25) = -0.0703125 (input 3).
    """
    ramp = torch.tensor([0.0, 0.2, 0.6, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    out = resize_smooth(ramp, (1, 2))[0, 0, 0]
    weights = [0.8671875, 0.8671875, 0.2265625, -0.0703125]
    expected = (0.2 * weights[1] + 0.6 * weights[2] + 1.0 * weights[3]) / sum(weights)  # 0.12644628...
    assert abs(float(out[0]) - expected) < 1e-6
