"""A LoRA target that names no layer of the denoiser is refused before any weights load, in both stages."""

from __future__ import annotations

import pytest

from rlbooth.align.train import align
from rlbooth.config import load_config
from rlbooth.models import ModelLoadError
from rlbooth.personalize.train import personalize
from rlbooth.subject import Subject
from tests.align.conftest import align_config


def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    fail = lambda *a, **k: pytest.fail("weights were loaded before the bad target was found")  # noqa: E731
    monkeypatch.setattr("rlbooth.personalize.train.load_pipeline", fail)
    monkeypatch.setattr("rlbooth.align.train.load_stage_pipeline", fail)


def test_stage_one_target_that_names_no_layer_is_refused_before_loading(tmp_path, subject_photos, monkeypatch):
    no_loading(monkeypatch)
    config = load_config("tiny-sd3", ["runtime.report_to=none", "personalize.lora_target_modules=[to_q, to_kk]"])
    with pytest.raises(ModelLoadError, match=r"personalize.lora_target_modules: 'to_kk' names no layer .*to_out\.0"):
        personalize(config, Subject(images=subject_photos, class_noun="toy"), tmp_path / "out")


def test_stage_two_target_that_names_no_layer_is_refused_before_loading(stage_one, tmp_path, monkeypatch):
    no_loading(monkeypatch)
    with pytest.raises(ModelLoadError, match=r"align.lora_target_modules: 'ff.net.9' names no layer of the unet"):
        align(align_config("align.lora_target_modules=[to_q, ff.net.9]"), stage_one, tmp_path / "out")


@pytest.mark.parametrize("targets", ["[to_q, to_out.0]", "[attn1.to_k, ff.net.2, conv1]"])
def test_targets_that_name_layers_pass(targets, tmp_path, subject_photos, monkeypatch):
    """Full names' last parts, as peft matches them; the run then gets as far as loading the weights."""
    monkeypatch.setattr("rlbooth.personalize.train.load_pipeline",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("loading")))
    config = load_config("tiny", ["runtime.report_to=none", f"personalize.lora_target_modules={targets}"])
    with pytest.raises(RuntimeError, match="loading"):
        personalize(config, Subject(images=subject_photos, class_noun="toy"), tmp_path / "out")
