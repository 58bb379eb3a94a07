"""The second wave's inputs, wrong as a new user gets them wrong: the real CLI exits 2 before any model loads,
with a message that names the field (or file) and what to do, and no traceback.

Model folders of another family, incomplete or missing; VAE folders that are not a VAE; a family's switches
set on a family that never reads them; push targets that are no Hub repository; an export target in the way.
(Damaged files are tests/test_damaged_files.py; reward names, modules and options tests/test_reward_checks.py.)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from rlbooth import cli
from rlbooth.config import load_config
from rlbooth.families import get_family
from rlbooth.models import tiny_pipeline_folder
from tests.conftest import draw_subject_photos
from tests.test_cli import no_model_load  # noqa: F401  (fixture: loading any pipeline fails the test)

QUICK = ["runtime.report_to=none", "personalize.max_train_steps=1", "personalize.validation_steps=0",
         "personalize.with_prior_preservation=false"]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    """The tiny SD and SD3 pipelines as diffusers folders (what `hf download` leaves), built once."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for preset, family in (("tiny", "sd"), ("tiny-sd3", "sd3")):
        folders[family] = root / family
        shutil.copytree(tiny_pipeline_folder(load_config(preset).model.tiny, get_family(family)), folders[family])
    return folders


def personalize_argv(tmp: Path, *sets: str, preset: str = "tiny") -> list[str]:
    photos = draw_subject_photos(tmp / "photos")
    return ["personalize", "-c", preset, "--images", str(photos), "--class-noun", "toy", "-o", str(tmp / "out"),
            *[arg for item in QUICK + list(sets) for arg in ("--set", item)]]


def _family_mismatch(tmp: Path, folders: dict[str, Path]) -> list[str]:
    return personalize_argv(tmp, f"model.pretrained={folders['sd']}", "model.family=sdxl")


def _unsupported_pipeline(tmp: Path, folders: dict[str, Path]) -> list[str]:
    folder = tmp / "kandinsky"
    shutil.copytree(folders["sd"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "KandinskyV22Pipeline"}))
    return personalize_argv(tmp, f"model.pretrained={folder}")


def _incomplete_folder(tmp: Path, folders: dict[str, Path]) -> list[str]:
    folder = tmp / "partial"
    shutil.copytree(folders["sd"], folder)
    shutil.rmtree(folder / "text_encoder")  # a download stopped half-way
    return personalize_argv(tmp, f"model.pretrained={folder}")


def _missing_folder(tmp: Path, folders: dict[str, Path]) -> list[str]:
    return personalize_argv(tmp, f"model.pretrained={tmp / 'models' / 'sd15'}")


def _vae_is_a_pipeline(tmp: Path, folders: dict[str, Path]) -> list[str]:
    return personalize_argv(tmp, f"model.pretrained={folders['sd']}", f"model.vae={folders['sd']}")


def _vae_is_a_unet(tmp: Path, folders: dict[str, Path]) -> list[str]:
    return personalize_argv(tmp, f"model.pretrained={folders['sd']}", f"model.vae={folders['sd'] / 'unet'}")


def _vae_config_damaged(tmp: Path, folders: dict[str, Path]) -> list[str]:
    vae = tmp / "vae"
    shutil.copytree(folders["sd"] / "vae", vae)
    (vae / "config.json").write_text('{"_class_name": "AutoencoderKL", ')
    return personalize_argv(tmp, f"model.pretrained={folders['sd']}", f"model.vae={vae}")


def _flow_switch_on_unet(tmp: Path, folders: dict[str, Path]) -> list[str]:
    return personalize_argv(tmp, "personalize.flow_loss_weighting=cosmap")


def _sde_switch_on_unet(tmp: Path, folders: dict[str, Path]) -> list[str]:
    return ["run", str(tmp / "spec.yaml"), "-c", "tiny", "-o", str(tmp / "run"), "--set", "align.flow_noise_level=0.5"]


def _guidance_input_on_sd3(tmp: Path, folders: dict[str, Path]) -> list[str]:
    return personalize_argv(tmp, "personalize.training_guidance=2.0", preset="tiny-sd3")


def _push_target_url(tmp: Path, folders: dict[str, Path]) -> list[str]:
    return personalize_argv(tmp) + ["--push-to-hub", "https://huggingface.co/me/my-dog"]


def _push_target_path(tmp: Path, folders: dict[str, Path]) -> list[str]:
    return personalize_argv(tmp) + ["--push-to-hub", "me/dogs/v2"]


Case = Callable[[Path, dict[str, Path]], list[str]]
CASES: list[tuple[Case, list[str]]] = [  # (set-up, words the message must hold)
    (_family_mismatch, ["model.family='sdxl'", "StableDiffusionPipeline", "set model.family='sd'"]),
    (_unsupported_pipeline, ["KandinskyV22Pipeline", "does not support", "model.family"]),
    (_incomplete_folder, ["model.pretrained=", "lacks ['text_encoder']", "hf download"]),
    (_missing_folder, ["model.pretrained=", "no such folder"]),
    (_vae_is_a_pipeline, ["model.vae=", "whole pipeline", "/vae"]),
    (_vae_is_a_unet, ["model.vae=", "UNet2DConditionModel, not an AutoencoderKL"]),
    (_vae_config_damaged, ["model.vae's config", "not valid JSON"]),
    (_flow_switch_on_unet, ["personalize.flow_loss_weighting='cosmap'", "no effect on the sd family", "sd3, flux"]),
    (_sde_switch_on_unet, ["align.flow_noise_level=0.5", "no effect on the sd family"]),
    (_guidance_input_on_sd3, ["personalize.training_guidance=2.0", "no effect on the sd3 family", "flux"]),
    (_push_target_url, ["push target 'https://huggingface.co/me/my-dog'", "owner/name"]),
    (_push_target_path, ["push target 'me/dogs/v2'", "owner/name"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_bad_input_is_refused_before_any_model_loads(case, tiny_folders, no_model_load, tmp_path: Path,  # noqa: F811
                                                     capsys):
    make, words = case
    draw_subject_photos(tmp_path / "spec-photos")
    (tmp_path / "spec.yaml").write_text("images: spec-photos\nclass_noun: toy\n")
    argv = make(tmp_path, tiny_folders)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rlbooth {argv[0]}: error: "), err
    for word in words:
        assert word in err, (word, err)
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_push_and_export_targets_are_checked_before_reading_the_stage(tmp_path: Path, capsys):
    assert cli.main(["push", str(tmp_path / "no-stage"), "me--dog/x"]) == 2
    assert "push target 'me--dog/x' is not a Hub model repository id" in capsys.readouterr().err
    (tmp_path / "dog.safetensors").mkdir()
    assert cli.main(["export", str(tmp_path / "no-stage"), "-o", str(tmp_path / "dog.safetensors")]) == 2
    assert "a folder of that name is in the way" in capsys.readouterr().err


def test_a_good_model_folder_and_vae_pass(tiny_folders):
    from rlbooth.models import check_model

    config = load_config("tiny", [f"model.pretrained={tiny_folders['sd']}", f"model.vae={tiny_folders['sd'] / 'vae'}"])
    assert check_model(config).name == "sd"
    config = load_config("tiny-sd3", [f"model.pretrained={tiny_folders['sd3']}", "align.flow_noise_level=0.5"])
    assert check_model(config).name == "sd3"
