"""What the families' checks against diffusers' own pipelines share: prompts, the pipeline's timesteps, the LoRA
round trip through `load_lora_weights`."""

from __future__ import annotations

from pathlib import Path

import torch

from rlbooth.config import TinyModelConfig
from rlbooth.families import get_family
from rlbooth.models import add_lora, save_lora

PROMPTS = ["a sks dog on the beach", "A dog, 2 cats!"]


def capture_timesteps(pipe, steps: int, **kwargs) -> torch.Tensor:
    """The timesteps the pipeline's own loop visits."""
    seen = []

    def record(_pipe, _i, t, tensors):
        seen.append(t)
        return tensors

    pipe("a dog", num_inference_steps=steps, height=32, width=32, output_type="latent",
         callback_on_step_end=record, **kwargs)
    return torch.stack(seen)


def assert_saved_lora_reloads(name: str, folder: Path, guidance_scale: float) -> None:
    """A transformer LoRA with non-zero B, saved by the family, loaded by plain diffusers into a fresh tiny
    pipeline: the same pixels through the pipeline, different from the base model's."""
    family, cfg = get_family(name), TinyModelConfig()
    trained, fresh = family.build_tiny(cfg), family.build_tiny(cfg)
    assert family.lora_components == ["transformer"] and "transformer" in fresh._lora_loadable_modules
    add_lora(trained.transformer, 4, 4, ["to_k", "to_q", "to_v", "to_out.0"])
    g = torch.Generator().manual_seed(1)
    for param_name, param in trained.transformer.named_parameters():
        if "lora_B" in param_name:
            param.data.copy_(torch.randn(param.shape, generator=g) * 0.1)
    save_lora(folder, family, {"transformer": trained.transformer})

    def draw(pipe):
        return pipe(PROMPTS[0], num_inference_steps=2, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0), **family.guidance_kwargs(guidance_scale),
                    **family.call_kwargs(pipe)).images

    base = draw(fresh)
    fresh.load_lora_weights(folder)
    torch.testing.assert_close(draw(fresh), draw(trained))
    assert not torch.allclose(draw(fresh), base, atol=1e-3)
