"""Model families behind one interface (`Family`): Stable Diffusion 1.x/2.x (`sd`), SDXL (`sdxl`), and the
flow-matching transformers SD3/SD3.5 (`sd3`), FLUX.1 (`flux`), Qwen-Image (`qwenimage`) and Z-Image
(`zimage`), which share `FlowMatchingFamily`.

The family is `model.family` in the config, or read from the base model's `model_index.json`
(its pipeline class). Stage one, stage two, sampling, the report and evaluation reach the model's
specifics only through the family, so adding one is adding a module here.
"""

from __future__ import annotations

from typing import Any

from rlbooth.families.base import Conditioning, Family
from rlbooth.families.flowmatch import FlowMatchingFamily
from rlbooth.families.flux import Flux
from rlbooth.families.qwenimage import QwenImage
from rlbooth.families.sd import StableDiffusion
from rlbooth.families.sd3 import StableDiffusion3
from rlbooth.families.sdxl import StableDiffusionXL
from rlbooth.families.zimage import ZImage

FAMILIES: dict[str, Family] = {f.name: f for f in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux(),
                                               QwenImage(), ZImage())}
"""Every family by its `model.family` name."""


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of_class(class_name: str) -> Family | None:
    """The family whose pipeline class is `class_name` (a `model_index.json` `_class_name`), if any."""
    return next((f for f in FAMILIES.values() if f.pipeline_class_name == class_name), None)


def family_of(pipe: Any) -> Family:
    """The family of a loaded pipeline."""
    family = family_of_class(type(pipe).__name__)
    if family is None:
        raise TypeError(f"{type(pipe).__name__} is not a pipeline of a supported family ({', '.join(FAMILIES)})")
    return family


__all__ = ["Conditioning", "FAMILIES", "Family", "FlowMatchingFamily", "family_of", "family_of_class", "get_family"]
