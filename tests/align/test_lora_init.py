"""Stage two's LoRA init (align.lora_init): A drawn as chosen, B zero, the field validated."""

from __future__ import annotations

import math

import pytest
import torch

from rlbooth.config import AlignConfig, ConfigError, load_config
from rlbooth.stages import ALIGN_ADAPTER
from tests.align.conftest import align_config
from tests.align.test_train import make_trainer


def expected_std(init: str, rank: int, fan_in: int) -> float:
    """ddpo-pytorch's LoRALinearLayer: N(0, 1/rank^2); peft's default: kaiming-uniform(a=sqrt(5)), 1/sqrt(3 fan_in)."""
    return 1 / rank if init == "ddpo" else 1 / math.sqrt(3 * fan_in)


@pytest.mark.parametrize("init", ["ddpo", "peft"])
def test_stage_two_lora_a_has_the_chosen_std_and_b_is_zero(stage_one, tmp_path, init):
    from peft.tuners.lora import LoraLayer

    trainer = make_trainer(align_config(f"align.lora_init={init}"), stage_one, tmp_path)
    layers = [m for m in trainer.pipe.unet.modules() if isinstance(m, LoraLayer) and ALIGN_ADAPTER in m.lora_A]
    assert len(layers) >= 8
    normalized = []
    for layer in layers:
        a, b = layer.lora_A[ALIGN_ADAPTER].weight.detach(), layer.lora_B[ALIGN_ADAPTER].weight.detach()
        rank, fan_in = a.shape
        normalized.append(a.flatten() / expected_std(init, rank, fan_in))
        assert not b.any(), "B must start at zero"
    pooled = torch.cat(normalized)
    assert pooled.numel() > 2000
    assert pooled.std().item() == pytest.approx(1.0, rel=0.06)
    assert pooled.mean().item() == pytest.approx(0.0, abs=0.06)


def test_the_presets_choose_deliberately():
    assert load_config("sd15").align.lora_init == "ddpo"  # and what extends it: LoRA, SDXL, tiny
    assert load_config("sdxl-lora").align.lora_init == "ddpo"
    assert load_config("toy").align.lora_init == "peft"  # its learning rate was tuned with peft's init


def test_unknown_lora_init_names_the_field():
    with pytest.raises(ConfigError, match=r"^align\.lora_init: must be one of \['ddpo', 'peft'\]"):
        load_config("tiny", ["align.lora_init=kaiming"])
    with pytest.raises(ConfigError, match=r"^align\.lora_init: must be one of"):
        AlignConfig(lora_init="kaiming")  # type: ignore[arg-type]
