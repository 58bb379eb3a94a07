"""What the stage-two tests share: finished stage-one outputs (tiny, LoRA) of every family, and a kill-and-resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlbooth.align.train import DDPOTrainer, align
from rlbooth.config import load_config
from rlbooth.personalize.train import personalize
from rlbooth.stages import OutputError
from rlbooth.subject import Subject
from tests.conftest import draw_subject_photos


def align_config(*overrides: str):
    """The tiny preset, made quicker: 4 DDIM steps, no logs, no grids."""
    return load_config("tiny", ["runtime.report_to=none", "align.num_steps=4", "align.grid_every=0",
                                "align.reward={brightness: 1.0}", *overrides])


def make_stage_one(root: Path, resolution: int, preset: str = "tiny", overrides: tuple[str, ...] | None = None
                   ) -> Path:
    """8 steps of stage one on the drawn subject. `overrides` stand in for the defaults for a tiny model (learning
    rate 1e-2, the model built at `resolution`)."""
    subject = Subject(images=draw_subject_photos(root / "photos"), class_noun="toy", description="triangular")
    if overrides is None:
        overrides = ("personalize.learning_rate=1e-2", f"model.tiny.resolution={resolution}",
                     f"personalize.resolution={resolution}")
    config = load_config(preset, ["runtime.report_to=none", "personalize.validation_steps=0",
                                  "personalize.max_train_steps=8", *overrides])
    personalize(config, subject, root / "out")
    return root / "out"


class Killed(Exception):
    """Raised where a killed run would stop."""


def kill_and_resume(config, stage_one: Path, folder: Path, die_in_epoch: int, monkeypatch: pytest.MonkeyPatch
                    ) -> Path:
    """Runs stage two until it dies as `die_in_epoch` starts (the epochs since its last checkpoint are lost),
    checks a rerun without --resume is refused, then resumes it; returns the resumed model folder."""
    run_epoch = DDPOTrainer.run_epoch

    def dies(self, epoch):
        if epoch == die_in_epoch:
            raise Killed
        run_epoch(self, epoch)

    monkeypatch.setattr(DDPOTrainer, "run_epoch", dies)
    with pytest.raises(Killed):
        align(config, stage_one, folder)
    monkeypatch.setattr(DDPOTrainer, "run_epoch", run_epoch)
    with pytest.raises(OutputError, match="--resume"):
        align(config, stage_one, folder)
    return align(config, stage_one, folder, resume=True)


def assert_same_lora(a_folder: Path, b_folder: Path) -> None:
    """The two model folders hold the same LoRA tensors (a resumed run's, to float rounding)."""
    a = load_file(str(a_folder / "pytorch_lora_weights.safetensors"))
    b = load_file(str(b_folder / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="session")
def stage_one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stage_one(tmp_path_factory.mktemp("stage-one"), 32)


@pytest.fixture(scope="session")
def stage_one_8px(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 px images, 4x4x4 latents: few enough action dimensions for the policy gradient to be seen on a CPU."""
    return make_stage_one(tmp_path_factory.mktemp("stage-one-8px"), 8)


@pytest.fixture(scope="session", params=["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-qwenimage",
                                         "tiny-zimage"])
def any_stage_one_8px(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 px stage ones of every family, for the sign test."""
    if request.param == "tiny":
        return request.getfixturevalue("stage_one_8px")
    return make_stage_one(tmp_path_factory.mktemp(f"stage-one-8px-{request.param}"), 8, request.param)


@pytest.fixture(scope="session")
def stage_one_toyworld(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy world's shipped UNet (an SD 1.x-class model trained to denoise its world, 32 px), after 8 steps of
    its preset's full fine-tune at the preset's learning rate: a tiny SD 1.x that draws what it predicts, which
    the randomly initialized tiny models do not."""
    return make_stage_one(tmp_path_factory.mktemp("stage-one-toyworld"), 32, "toy",
                          ("personalize.num_class_images=4", "personalize.class_generation_steps=4"))


@pytest.fixture(scope="session")
def stage_one_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stage_one(tmp_path_factory.mktemp("stage-one-sdxl"), 32, "tiny-sdxl")


@pytest.fixture(scope="session")
def stage_one_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stage_one(tmp_path_factory.mktemp("stage-one-sd3"), 32, "tiny-sd3")


@pytest.fixture(scope="session")
def stage_one_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stage_one(tmp_path_factory.mktemp("stage-one-flux"), 32, "tiny-flux")


@pytest.fixture(scope="session")
def stage_one_qwenimage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stage_one(tmp_path_factory.mktemp("stage-one-qwenimage"), 32, "tiny-qwenimage")


@pytest.fixture(scope="session")
def stage_one_zimage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stage_one(tmp_path_factory.mktemp("stage-one-zimage"), 32, "tiny-zimage")


@pytest.fixture(params=["sd", "sdxl", "sd3", "flux", "qwenimage", "zimage"])
def any_stage_one(request: pytest.FixtureRequest) -> Path:
    """Stage one of each model family (32 px)."""
    return request.getfixturevalue(f"stage_one_{request.param}" if request.param != "sd" else "stage_one")

