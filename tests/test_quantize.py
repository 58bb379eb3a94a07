"""A quantized frozen base (model.quantization=int8, torchao on the CPU): the LoRA on top learns, the base
stays as loaded, and the LoRA file loads on the unquantized base with plain diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlbooth.config import ConfigError, ModelConfig, load_config
from rlbooth.families import family_of
from rlbooth.models import load_pipeline
from rlbooth.personalize.train import personalize
from rlbooth.subject import Subject

pytest.importorskip("torchao")


def test_lora_on_int8_base_learns_and_loads_on_the_unquantized_base(tmp_path: Path, subject_photos: Path) -> None:
    """Same seeds on the fp32 and the int8 base: both LoRAs lower the loss, and loaded on the plain fp32 base the
    int8-trained LoRA scores within 0.5% of the fp32-trained one (int8 rounding is the only difference)."""
    from tests.personalize.test_train import instance_loss

    subject = Subject(images=subject_photos, class_noun="toy", description="triangular")
    photos = sorted(subject.images.iterdir())
    losses = {}
    for kind in ("none", "int8"):
        config = load_config("tiny", ["runtime.report_to=none", "personalize.validation_steps=0",
                                      "personalize.mode=lora", f"model.quantization={kind}",
                                      "personalize.learning_rate=1e-2", "personalize.max_train_steps=15",
                                      "personalize.with_prior_preservation=false"])
        base = load_pipeline(config.model)
        before = {k: _plain(v) for k, v in base.unet.state_dict().items()}
        model_dir = personalize(config, subject, tmp_path / kind)
        plain = load_pipeline(ModelConfig(pretrained="tiny"))  # unquantized, plain diffusers loading
        untrained = instance_loss(plain, plain.unet, photos)
        plain.load_lora_weights(model_dir)
        losses[kind] = instance_loss(plain, plain.unet, photos)
        assert losses[kind] < 0.97 * untrained
        if kind == "int8":
            linear = base.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
            assert "Int8" in type(linear).__name__  # the frozen base really is int8
            reloaded = load_pipeline(config.model).unet.state_dict()  # int8 rounding is deterministic
            assert all(torch.equal(_plain(reloaded[k]), v) for k, v in before.items())
    assert losses["int8"] == pytest.approx(losses["none"], rel=0.005)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.dequantize() if hasattr(t, "dequantize") else t


def test_quantization_needs_lora() -> None:
    with pytest.raises(ConfigError, match="model.quantization"):
        load_config("tiny", ["model.quantization=int8", "personalize.mode=full"])


def test_stage_two_trains_on_the_int8_base_of_a_quantized_stage_one(tmp_path: Path, subject_photos: Path) -> None:
    """Stage two loads stage one's base as stage one trained on it (int8), stage one's LoRA folded in, and
    trains its own LoRA on top; the int8 weights stay as they were."""
    from tests.align.conftest import align_config
    from tests.align.test_train import make_trainer

    subject = Subject(images=subject_photos, class_noun="toy", description="triangular")
    config = load_config("tiny", ["runtime.report_to=none", "personalize.validation_steps=0", "personalize.mode=lora",
                                  "model.quantization=int8", "personalize.max_train_steps=4"])
    personalize(config, subject, tmp_path / "one")
    trainer = make_trainer(align_config("align.learning_rate=1e-2"), tmp_path / "one", tmp_path / "two")
    frozen = {k: v.dequantize() for k, v in trainer.denoiser.state_dict().items() if "Int8" in type(v).__name__}
    assert len(frozen) >= 8  # the base is int8: the attention projections at least
    samples = trainer.sample_epoch(0)
    trainer.train_epoch(0, samples, trainer.advantages(0, samples))
    after = trainer.denoiser.state_dict()
    assert all(torch.equal(after[k].dequantize(), v) for k, v in frozen.items())
    assert any(v.abs().sum() > 0 for k, v in trainer.denoiser.named_parameters() if "lora_B" in k)


def test_a_missing_package_is_named_before_any_weight_is_read() -> None:
    import importlib.util

    from rlbooth.quantize import QuantizationError

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(QuantizationError, match=r"model.quantization=nf4 needs bitsandbytes: pip install 'rlbooth\[8bit\]'"):
        load_pipeline(ModelConfig(pretrained="tiny", quantization="nf4"))


def test_large_text_encoder_quantized_encodes_trains_and_the_lora_loads_unquantized(tmp_path: Path,
                                                                                   subject_photos: Path) -> None:
    """`model.quantize_text_encoders` stores SD3's T5 in int8 (transformers' torchao config): it encodes close to
    the fp32 T5, stage one trains through it, it stays as loaded, and the LoRA loads on the plain base."""
    from rlbooth.plan import linear_weights, plan

    config = load_config("tiny-sd3", ["runtime.report_to=none", "personalize.validation_steps=0",
                                      "model.quantization=int8", "model.quantize_text_encoders=true",
                                      "personalize.max_train_steps=2", "personalize.with_prior_preservation=false"])
    pipe, plain = load_pipeline(config.model), load_pipeline(ModelConfig(pretrained="tiny", family="sd3"))
    t5 = pipe.text_encoder_3
    assert "Int8" in type(t5.encoder.block[0].layer[0].SelfAttention.q.weight).__name__
    assert "Int8" not in type(pipe.text_encoder.text_model.encoder.layers[0].self_attn.q_proj.weight).__name__
    family = family_of(pipe)
    with torch.no_grad():
        ours, full = (family.encode_prompts(p, ["a sks dog on the beach"]).hidden for p in (pipe, plain))
    assert (ours - full).norm() < 0.1 * full.norm()  # int8 rounding of a random tiny T5
    before = {k: _plain(v).clone() for k, v in t5.state_dict().items()}
    model_dir = personalize(config, Subject(images=subject_photos, class_noun="toy"), tmp_path / "one")
    after = load_pipeline(config.model).text_encoder_3.state_dict()
    assert all(torch.equal(_plain(after[k]), v) for k, v in before.items())
    plain.load_lora_weights(model_dir)  # plain diffusers, unquantized base
    assert any("lora" in k for k in plain.transformer.state_dict())
    rows = {r.name: r for r in plan(config)[0].rows}
    n, linear = sum(p.numel() for p in plain.text_encoder_3.parameters()), linear_weights(plain.text_encoder_3)
    assert rows["text_encoder_3"].bytes == linear + 4 * (n - linear)  # int8 Linear weights, the rest fp32


def test_text_encoder_quantization_needs_a_scheme_and_a_large_encoder() -> None:
    from rlbooth.models import check_model

    with pytest.raises(ConfigError, match="model.quantize_text_encoders.*int8 or nf4"):
        load_config("tiny-sd3", ["model.quantize_text_encoders=true"])
    with pytest.raises(ConfigError, match="model.quantize_text_encoders: the sd family has no large text encoder"):
        check_model(load_config("tiny", ["model.quantization=int8", "model.quantize_text_encoders=true"]))


def test_the_int8_base_stores_what_plan_counts() -> None:
    """The int8 base's weights, measured by the tensors they hold, are plan's count plus a scale and a zero point
    per output row, and under three quarters of the fp32 base's (the tiny UNet; its Linear weights alone at 27%).
    Fails if the base is not quantized or plan counts int8 wrongly."""
    from rlbooth.plan import plan
    from rlbooth.quantize import stored_bytes

    overrides = ["runtime.mixed_precision=no", "personalize.mode=lora"]
    measured = {kind: load_pipeline(load_config("tiny", overrides + [f"model.quantization={kind}"]).model).unet
                for kind in ("none", "int8")}
    planned = {r.name: r.bytes for r in plan(load_config("tiny", overrides + ["model.quantization=int8"]))[0].rows}
    rows = sum(m.out_features for m in measured["int8"].modules() if isinstance(m, torch.nn.Linear))
    assert planned["unet"] <= stored_bytes(measured["int8"]) <= planned["unet"] + 5 * rows
    assert stored_bytes(measured["int8"]) < 0.75 * stored_bytes(measured["none"])
