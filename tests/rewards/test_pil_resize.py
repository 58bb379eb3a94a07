"""The shared 8-bit PIL resize of the model rewards (its match with the original processors on real photos is
tested where each processor is: test_clip_models, test_image_reward, test_identity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rlbooth.rewards import RewardError
from rlbooth.rewards.pil_resize import normalize, resize_bicubic, to_8bit
from tests.conftest import pil_to_batch, real_photo_layouts


def test_images_are_rounded_to_8_bits_even_when_the_size_is_kept():
    x = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 1.0, 100.4 / 255, 100.6 / 255]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    assert to_8bit(x)[0, 0].flatten().tolist() == [0, 0, 1, 255, 100, 101]
    kept = resize_bicubic(x, (2, 3))
    assert kept.dtype == torch.float32 and torch.equal(kept * 255, to_8bit(x).float())


def test_resize_is_pils_bicubic_per_image_in_a_batch():
    photos = [real_photo_layouts()["mosaic"], real_photo_layouts()["mosaic"].rotate(90)]
    batch = torch.cat([pil_to_batch(p) for p in photos])
    out = resize_bicubic(batch, (224, 160))
    for row, photo in zip(out, photos):
        expected = np.asarray(photo.resize((160, 224), Image.Resampling.BICUBIC))
        assert np.array_equal((row * 255).round().byte().permute(1, 2, 0).numpy(), expected)
    assert resize_bicubic(batch[:0], (224, 160)).shape == (0, 3, 224, 160)


def test_bad_shapes_are_refused_and_normalize_is_per_channel():
    with pytest.raises(RewardError, match=r"\(B, 3, H, W\).*\(1, 4, 8, 8\)"):
        resize_bicubic(torch.zeros(1, 4, 8, 8), (4, 4))
    x = torch.ones(1, 3, 2, 2)
    out = normalize(x, (0.5, 0.0, 1.0), (0.5, 2.0, 1.0))
    assert out[0, :, 0, 0].tolist() == [1.0, 0.5, 0.0]
