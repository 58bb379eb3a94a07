"""Sample grids reach the tracker that is on, each stage's model/ gets a model card, and `--push-to-hub` uploads it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from rlbooth import hub_upload
from rlbooth.accel import log_grid
from rlbooth.align.train import align
from rlbooth.cli import main
from rlbooth.config import load_config
from rlbooth.personalize import train as personalize_train
from rlbooth.subject import Subject
from tests.conftest import draw_subject_photos

QUICK = ["personalize.max_train_steps=2", "personalize.validation_steps=2", "personalize.validation_seeds=[0]",
         "personalize.validation_prompts=['a {identifier} {class_noun}']", "align.num_epochs=1", "align.num_steps=3",
         "align.grid_every=1", "align.grid_seeds=[0]", "align.reward={saturation: 0.5, brightness: 1.0}"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cards")
    subject = Subject(images=draw_subject_photos(root / "photos"), class_noun="toy", identifier="zwx", name="toy")
    config = load_config("tiny", QUICK)
    personalize_train.personalize(config, subject, root / "one")
    align(config, root / "one", root / "two")
    return root / "one", root / "two"


def read_card(stage: Path) -> tuple[dict, str]:
    _, header, body = (stage / "model" / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(header), body


def test_model_cards_carry_the_stage_metadata(stages):
    one, two = stages
    card, body = read_card(one)
    assert card["instance_prompt"] == "a zwx toy" and card["trigger_word"] == "zwx"
    assert card["rlbooth_base_model"] == "tiny" and "base_model" not in card  # not a Hub id: the Hub would refuse it
    assert {"rlbooth", "dreambooth", "lora", "diffusers"} <= set(card["tags"]) and "ddpo" not in card["tags"]
    assert card["widget"] == [{"text": "a zwx toy", "output": {"url": "sample.png"}}]
    assert Image.open(one / "model" / "sample.png").size == Image.open(one / "samples" / "step-2.png").size
    assert "`zwx`" in body
    card, body = read_card(two)
    assert card["rewards"] == {"saturation": 0.5, "brightness": 1.0} and "ddpo" in card["tags"]
    assert card["instance_prompt"] == "a zwx toy" and (two / "model" / "sample.png").is_file()
    assert "`brightness`: weight 1.0" in body


def test_hub_id_becomes_base_model():
    from rlbooth.model_card import card_metadata

    card = card_metadata({"stage": "personalize", "mode": "full", "base_model": "runwayml/stable-diffusion-v1-5",
                          "instance_prompt": "a sks dog", "subject": {"identifier": "sks"}})
    assert card["base_model"] == "runwayml/stable-diffusion-v1-5" and "lora" not in card["tags"]


def test_grids_are_logged_to_tensorboard(stages):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage, tag in zip(stages, ("validation", "samples")):
        tags = set()
        for path in (stage / "logs").rglob("events.out.tfevents.*"):
            tags |= set(EventAccumulator(str(path), size_guidance={"images": 0}).Reload().Tags()["images"])
        assert tag in tags, (stage, tags)


def test_grids_go_to_wandb_as_its_images():
    calls = []
    tracker = SimpleNamespace(name="wandb", log_images=lambda values, step: calls.append((values, step)))
    log_grid(SimpleNamespace(trackers=[tracker]), "samples", Image.new("RGB", (8, 4), (255, 0, 0)), 3)
    ((values, step),) = calls
    assert step == 3 and values["samples"][0].shape == (4, 8, 3) and values["samples"][0][0, 0].tolist() == [255, 0, 0]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_chosen_but_missing_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["personalize", "-c", "tiny", "--images", str(draw_subject_photos(tmp_path / "photos")),
                 "--class-noun", "toy", "-o", str(out), "--set", "runtime.report_to=wandb"]) == 2
    assert "wandb is not installed" in capsys.readouterr().err
    assert not out.exists()


class FakeHub:
    """Records what would go to the Hub; holds a copy of the uploaded folder's file names."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        if self.fail:
            raise OSError("401 Unauthorized")

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs | {"files": files}))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc")


def test_push_to_hub_after_stage_one(stages, monkeypatch, capsys):
    one, _ = stages
    hub = FakeHub()
    monkeypatch.setattr(hub_upload, "hub_api", lambda: hub)
    monkeypatch.setattr(personalize_train, "personalize", lambda *args, **kwargs: one / "model")
    assert main(["personalize", "-c", "tiny", "--images", "x", "--class-noun", "toy", "-o", str(one),
                 "--push-to-hub", "me/zwx-toy", "--private"]) == 0
    (_, create), (_, upload) = hub.calls
    assert create == {"repo_id": "me/zwx-toy", "repo_type": "model", "private": True, "exist_ok": True}
    assert upload["repo_id"] == "me/zwx-toy" and Path(upload["folder_path"]) == one / "model"
    assert {"README.md", "sample.png", "pytorch_lora_weights.safetensors"} <= set(upload["files"])
    assert "https://huggingface.co/me/zwx-toy/commit/abc" in capsys.readouterr().out


def test_push_failure_is_a_clear_error(stages, monkeypatch, capsys):
    monkeypatch.setattr(hub_upload, "hub_api", lambda: FakeHub(fail=True))
    assert main(["push", str(stages[1]), "me/zwx-toy"]) == 2
    err = capsys.readouterr().err
    assert "401 Unauthorized" in err and "hf auth login" in err
