"""An example of your own reward for stage two, registered without editing rlbooth.

Use it from a config or the command line (the path is taken from the current directory):

    rlbooth run examples/tiny/subject.yaml --config tiny \
        --set "align.reward_modules=[examples/custom_reward/my_rewards.py]" \
        --set "align.reward={warmth: 1.0}" --set "align.reward_options={warmth: {blue_weight: 0.5}}"

A reward is a factory registered under a name: its keyword options (with type hints, checked before
any model loads) come from `align.reward_options`; it returns a callable that scores a batch of images
in [0, 1], shape (B, 3, H, W), with one prompt and one metadata dict per image, and gives (B,) float32
on the CPU, higher is better. A factory may also take `device`, `dtype` or `subject` (the run's Subject):
rlbooth passes them when the signature names them. Put heavy imports inside the factory.
"""

from __future__ import annotations

import torch

from rlbooth.rewards import register, validate_batch


@register("warmth")
def warmth(blue_weight: float = 1.0):
    """Mean red minus `blue_weight` x mean blue: pushes the images towards warm colours."""

    def score(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        validate_batch(images, prompts, metadata)
        red, blue = images[:, 0].float().mean(dim=(1, 2)), images[:, 2].float().mean(dim=(1, 2))
        return (red - blue_weight * blue).cpu()

    return score
