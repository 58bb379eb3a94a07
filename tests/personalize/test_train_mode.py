"""Stage one trains in train mode (transformers checkpoints a text encoder's layers only then) and samples in eval."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from rlbooth.config import load_config
from rlbooth.personalize import train as train_module
from rlbooth.personalize.train import personalize
from rlbooth.subject import Subject


def test_text_encoder_checkpointing_runs_and_validation_samples_in_eval(tmp_path, subject_photos: Path,
                                                                         monkeypatch):
    config = load_config("tiny", ["runtime.report_to=none", "personalize.max_train_steps=2",
                                  "personalize.validation_steps=1", "personalize.validation_inference_steps=2",
                                  "personalize.train_text_encoder=true", "personalize.gradient_checkpointing=true"])
    instrumented: list[str] = []
    checkpointed: list[str] = []
    modes: dict[str, set[tuple[bool, bool]]] = {"unet": set(), "text_encoder": set()}
    setup = train_module.setup_trainable

    def instrumented_setup(pipe, family, cfg, *args):
        params = setup(pipe, family, cfg, *args)
        for name, layer in pipe.text_encoder.named_modules():
            if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
                layer._gradient_checkpointing_func = counted(layer._gradient_checkpointing_func, name)
                instrumented.append(name)
        for component, records in modes.items():  # (training, grad enabled) of every forward
            getattr(pipe, component).register_forward_pre_hook(
                lambda module, _, records=records: records.add((module.training, torch.is_grad_enabled())))
        return params

    def counted(func, name):
        def checkpoint(*args, **kwargs):
            checkpointed.append(name)
            return func(*args, **kwargs)
        return checkpoint

    monkeypatch.setattr(train_module, "setup_trainable", instrumented_setup)
    personalize(config, Subject(images=subject_photos, class_noun="toy"), tmp_path / "out")

    layers = config.model.tiny.text_layers
    assert len(instrumented) == layers  # checkpointing is enabled on each text-encoder layer
    assert len(checkpointed) == layers * 2, checkpointed  # every layer, at each of the two training steps
    for component, records in modes.items():
        # training forwards (with grad) in train mode; validation sampling (no grad) in eval mode
        assert records == {(True, True), (False, False)}, (component, records)
    assert sorted((tmp_path / "out" / "samples").glob("step-*.png"))
