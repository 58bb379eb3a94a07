"""`rlbooth plan`: parameter counts against models built in full and the published sizes; the memory
arithmetic; activation estimates that respond to what changes them."""

from __future__ import annotations

import pytest
import torch

from rlbooth.cli import main
from rlbooth.config import load_config
from rlbooth.families import get_family
from rlbooth.models import add_lora
from rlbooth.plan import ARCHITECTURES, architecture, build_meta, count, lora_parameters, plan


@pytest.mark.parametrize("preset,family", [("tiny", "sd"), ("tiny-sdxl", "sdxl"), ("tiny-sd3", "sd3"),
                                           ("tiny-flux", "flux")])
def test_meta_counts_equal_the_model_built_in_full(preset: str, family: str) -> None:
    config = load_config(preset, [])
    pipe = get_family(family).build_tiny(config.model.tiny)  # weights in memory, built by the family's own code
    stage_one, _ = plan(config)
    planned = {row.name: row.params for row in stage_one.rows}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            stored = {t.data_ptr(): t.numel() for t in component.state_dict().values()}  # T5's tied table once
            assert planned[name] == sum(stored.values()), name


def test_lora_count_equals_peft_adapter_on_the_full_model() -> None:
    config = load_config("tiny-sdxl", [])
    unet = get_family("sdxl").build_tiny(config.model.tiny).unet
    targets = ["to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj"]  # the feed-forward's is not square
    expected = lora_parameters(unet, 4, targets)
    add_lora(unet, 4, None, targets)
    assert expected == sum(p.numel() for p in unet.parameters() if p.requires_grad) > 0


# Published sizes (model cards, papers); the SD3.5 count includes its position-embedding table.
PUBLISHED = {("stable-diffusion-v1-5/stable-diffusion-v1-5", "unet"): 0.86e9,
             ("stabilityai/stable-diffusion-xl-base-1.0", "unet"): 2.57e9,
             ("stabilityai/stable-diffusion-xl-base-1.0", "text_encoder_2"): 0.695e9,
             ("stabilityai/stable-diffusion-3.5-medium", "transformer"): 2.47e9,
             ("black-forest-labs/FLUX.1-dev", "transformer"): 11.9e9,
             ("black-forest-labs/FLUX.1-dev", "text_encoder_2"): 4.76e9}


@pytest.mark.parametrize("key", list(PUBLISHED), ids=lambda k: f"{k[0].split('/')[1]}-{k[1]}")
def test_real_architectures_match_published_counts(key: tuple[str, str]) -> None:
    repo, component = key
    n = count(build_meta(*architecture(repo)[component]))
    assert abs(n - PUBLISHED[key]) / PUBLISHED[key] < 0.01, n


def test_every_real_preset_has_a_known_architecture() -> None:
    for preset in ("sd15-lora", "sdxl-lora", "sd35-lora", "flux-lora"):
        assert load_config(preset, []).model.pretrained in ARCHITECTURES


@pytest.fixture(scope="module")
def tiny_plans() -> dict[str, list]:
    sets = {"base": [], "ckpt": ["personalize.gradient_checkpointing=true", "align.gradient_checkpointing=true"],
            "batch": ["personalize.train_batch_size=2", "align.train_batch_size=8"],
            "int8": ["model.quantization=int8", "personalize.mode=lora"],
            "adam8": ["personalize.use_8bit_adam=true"],
            "offload": ["personalize.offload_encoders=true", "align.offload_text_encoders=true"]}
    return {k: plan(load_config("tiny", ["runtime.mixed_precision=no", "personalize.mode=lora"] + v))
            for k, v in sets.items()}


def test_memory_arithmetic(tiny_plans: dict[str, list]) -> None:
    one, two = tiny_plans["base"]
    rows = {r.name: r for r in one.rows}
    lora = rows["LoRA weights"].params
    assert rows["LoRA weights"].bytes == rows["gradients"].bytes == 4 * lora
    assert rows["AdamW state"].bytes == 8 * lora
    assert {r.name: r for r in tiny_plans["adam8"][0].rows}["AdamW state"].bytes == 2 * lora
    assert rows["unet"].bytes == 4 * rows["unet"].params  # fp32 frozen weights
    int8 = {r.name: r for r in tiny_plans["int8"][0].rows}["unet"]
    linear = sum(m.weight.numel() for m in build_meta(*architecture("tiny", lambda: _tiny_folder())["unet"]).modules()
                 if isinstance(m, torch.nn.Linear))
    assert int8.bytes == rows["unet"].bytes - 3 * linear  # 4 bytes -> 1 byte per Linear weight
    assert one.peak == one.training == sum(r.bytes for r in one.rows) + one.activations
    off_one, off_two = tiny_plans["offload"]
    for off, on in ((off_one, one), (off_two, two)):  # the encoders leave the training phase
        gone = [r.name for r in off.rows if not r.resident]
        assert off.training == on.training - sum(r.bytes for r in on.rows if r.name in gone)
    # Both stages encode before the denoiser and its training state come, and draw from the embeddings: stage
    # one with the text encoders alone on the device, stage two with the VAE beside them.
    assert off_one.setup == sum(r.bytes for r in one.rows if r.name == "text_encoder")
    assert off_two.setup == sum(r.bytes for r in two.rows if r.name in ("vae", "text_encoder"))
    assert off_one.peak == off_one.training and off_two.peak == off_two.training
    assert {r.name for r in off_one.rows if not r.resident} == {"vae", "text_encoder"}
    assert {r.name for r in off_two.rows if not r.resident} == {"text_encoder"}
    assert [r.bytes for r in two.rows] == [r.bytes for r in one.rows]  # LoRA of the same rank in both stages


def _tiny_folder():
    from rlbooth.config import TinyModelConfig
    from rlbooth.models import tiny_pipeline_folder

    return tiny_pipeline_folder(TinyModelConfig(), get_family("sd"))


def test_activation_estimate_responds_to_batch_and_checkpointing(tiny_plans: dict[str, list]) -> None:
    for stage in (0, 1):
        base, ckpt, batch = (tiny_plans[k][stage].activations for k in ("base", "ckpt", "batch"))
        assert ckpt < base
        assert batch == pytest.approx(2 * base, rel=0.05)  # activations scale with the rows of a pass


def test_cli_plan_prints_both_stages(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", "tiny", "--set", "align.gradient_checkpointing=true"]) == 0
    out = capsys.readouterr().out
    assert "stage one" in out and "stage two" in out and "gradient checkpointing on" in out and "peak" in out


def test_full_fine_tune_plans_fp32_weights_and_more_activations(tiny_plans: dict[str, list]) -> None:
    full = plan(load_config("tiny", ["runtime.mixed_precision=no", "personalize.mode=full"]))[0]
    rows = {r.name: r for r in full.rows}
    assert "LoRA weights" not in rows and rows["unet"].dtype == "fp32 (trained)"
    assert rows["gradients"].params == rows["unet"].params
    assert full.activations > tiny_plans["base"][0].activations  # every layer's input is kept, not only LoRA's
