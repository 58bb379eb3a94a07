"""Every kind of file rlbooth reads, damaged: the real CLI exits 2, names the file and the fix, no traceback.

Each case damages one file of a working set-up (a finished tiny stage one, its checkpoints, photos, a spec)
and runs the command that reads it; no model may be loaded first (`no_model_load`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from rlbooth import cli
from rlbooth.personalize.train import personalize
from rlbooth.config import load_config
from rlbooth.subject import Subject
from tests.conftest import draw_subject_photos
from tests.test_cli import no_model_load  # noqa: F401  (fixture: loading any pipeline fails the test)

TINY = ["runtime.report_to=none", "personalize.validation_steps=0", "personalize.max_train_steps=2",
        "personalize.checkpointing_steps=1", "personalize.checkpoints_total_limit=null",
        "personalize.with_prior_preservation=false"]
SETS = [arg for item in TINY for arg in ("--set", item)]


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory) -> Path:
    """A finished tiny stage one with checkpoints step-1 and step-2."""
    root = tmp_path_factory.mktemp("stage")
    subject = Subject(images=draw_subject_photos(root / "photos"), class_noun="toy")
    personalize(load_config("tiny", TINY), subject, root / "out")
    return root / "out"


@pytest.fixture
def no_compute(no_model_load, monkeypatch):  # noqa: F811
    import rlbooth.align.train

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the damaged file was reported")

    monkeypatch.setattr(rlbooth.align.train, "load_stage_pipeline", forbidden)


def damage(path: Path, how: str) -> None:
    text = "a {identifier} {class_noun} in a café\n"
    data = path.read_bytes() if path.is_file() else text.encode()
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "utf16":
        path.write_bytes((data.decode("utf-8") + "# café\n").encode("utf-16"))
    elif how == "latin1":
        path.write_bytes((data.decode("utf-8") + "# café\n").encode("latin-1"))
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        raise ValueError(how)


# Each case: (tmp, stage_one) -> (argv, the damaged file); its id is `<file class>-<damage>`.
Case = Callable[[Path, Path], tuple[list[str], Path]]


def _spec(tmp: Path, stage: Path) -> tuple[list[str], Path]:
    spec = tmp / "subject.yaml"
    spec.write_text(f"images: {draw_subject_photos(tmp / 'photos')}\nclass_noun: toy\ndescription: grün\n",
                    encoding="utf-8")
    return ["personalize", "-c", "tiny", "--subject", str(spec), "-o", str(tmp / "out"), *SETS], spec


def _preset(tmp: Path, stage: Path) -> tuple[list[str], Path]:
    preset = tmp / "preset.yaml"
    preset.write_text("extends: tiny\n# grün\npersonalize:\n  max_train_steps: 2\n", encoding="utf-8")
    return ["personalize", "-c", str(preset), "--images", str(draw_subject_photos(tmp / "photos")),
            "--class-noun", "toy", "-o", str(tmp / "out")], preset


def _prompt_file(tmp: Path, stage: Path) -> tuple[list[str], Path]:
    prompts = tmp / "prompts.txt"
    prompts.write_text("a {identifier} {class_noun} in a café\n", encoding="utf-8")
    return ["sample", str(stage), "--prompt-file", str(prompts), "-o", str(tmp / "images")], prompts


def _copy_stage(tmp: Path, stage: Path) -> Path:
    shutil.copytree(stage, tmp / "stage", ignore=shutil.ignore_patterns("checkpoints", "logs"))
    return tmp / "stage"


def _stage_metadata_by_sample(tmp: Path, stage: Path) -> tuple[list[str], Path]:
    copy = _copy_stage(tmp, stage)
    return ["sample", str(copy), "-p", "a {identifier} {class_noun}", "-o", str(tmp / "images")], copy / "rlbooth.json"


def _stage_metadata_by_align(tmp: Path, stage: Path) -> tuple[list[str], Path]:
    copy = _copy_stage(tmp, stage)
    return ["align", "-c", "tiny", "--stage-one", str(copy), "-o", str(tmp / "two"), *SETS], copy / "rlbooth.json"


def _stage_weights(tmp: Path, stage: Path) -> tuple[list[str], Path]:
    argv, _ = _stage_metadata_by_align(tmp, stage)
    return argv, tmp / "stage" / "model" / "pytorch_lora_weights.safetensors"


def _checkpoint(name: str) -> Case:
    def make(tmp: Path, stage: Path) -> tuple[list[str], Path]:
        shutil.copytree(stage / "checkpoints", tmp / "out" / "checkpoints")
        photos = draw_subject_photos(tmp / "photos")
        return (["personalize", "-c", "tiny", "--images", str(photos), "--class-noun", "toy", "-o", str(tmp / "out"),
                 "--resume", *SETS], tmp / "out" / "checkpoints" / "step-2" / name)
    make.__name__ = f"checkpoint {name}"
    return make


def _photo(tmp: Path, stage: Path) -> tuple[list[str], Path]:
    photos = draw_subject_photos(tmp / "photos")
    return (["personalize", "-c", "tiny", "--images", str(photos), "--class-noun", "toy", "-o", str(tmp / "out"),
             *SETS], photos / "01.png")


def _class_image(tmp: Path, stage: Path) -> tuple[list[str], Path]:
    (tmp / "class").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (90 * i, 60, 30)).save(tmp / "class" / f"{i:05d}.png")
    argv, _ = _photo(tmp, stage)
    return argv + ["--set", "personalize.with_prior_preservation=true",
                   "--set", f"personalize.class_data_dir={tmp / 'class'}"], tmp / "class" / "00001.png"


def _eval_args(tmp: Path, model: Path) -> list[str]:
    return ["eval", "--models", f"m={model}", "--dreambench-root", str(tmp / "bench"), "--subjects", "dog",
            "--num-prompts", "1", "--num-images", "1", "--steps", "1", "--metrics", "dino", "-o", str(tmp / "eval")]


def _bench_photos(tmp: Path) -> Path:
    return draw_subject_photos(tmp / "bench" / "dog", count=2)


def _eval_mapping(suffix: str) -> Case:
    def make(tmp: Path, stage: Path) -> tuple[list[str], Path]:
        _bench_photos(tmp)
        mapping = tmp / f"models{suffix}"
        mapping.write_text(f'{{"dog": "{stage}"}}\n' if suffix == ".json" else f"dog: {stage}  # grün\n",
                           encoding="utf-8")
        return _eval_args(tmp, mapping), mapping
    make.__name__ = f"eval mapping {suffix}"
    return make


def _dreambench_photo(tmp: Path, stage: Path) -> tuple[list[str], Path]:
    return _eval_args(tmp, stage), _bench_photos(tmp) / "01.png"


def _scores_table(tmp: Path, stage: Path) -> tuple[list[str], Path]:
    _bench_photos(tmp)
    (tmp / "eval").mkdir()
    (tmp / "eval" / "scores.csv").write_text("model,subject,prompt_index,seed,dino\n" + "m,dog,0,0,0.5\n" * 5)
    return _eval_args(tmp, stage), tmp / "eval" / "scores.csv"


CASES: list[tuple[Case, str, str]] = [  # (set-up, damage, words the message must hold besides the path)
    (_spec, "missing", "not found"),
    (_spec, "truncated", "is required"),  # cut at a line end: still YAML, but incomplete
    (_spec, "utf16", "UTF-16"),
    (_spec, "latin1", "not UTF-8"),
    (_spec, "garbage", "not UTF-8"),
    (_preset, "truncated", "not valid YAML"),
    (_preset, "utf16", "UTF-16"),
    (_preset, "latin1", "iconv"),
    (_prompt_file, "utf16", "save it as UTF-8"),
    (_prompt_file, "latin1", "line 1"),
    (_stage_metadata_by_sample, "empty", "is empty"),
    (_stage_metadata_by_sample, "truncated", "not valid JSON"),
    (_stage_metadata_by_sample, "utf16", "UTF-16"),
    (_stage_metadata_by_align, "truncated", "rerun the stage"),
    (_stage_metadata_by_align, "garbage", "not UTF-8"),
    (_stage_weights, "missing", "not found"),
    (_stage_weights, "empty", "is empty"),
    (_stage_weights, "truncated", "damaged or cut short"),
    (_stage_weights, "garbage", "damaged or cut short"),
    (_checkpoint("trainable.safetensors"), "truncated", "step-1"),
    (_checkpoint("optimizer.pt"), "truncated", "step-1"),
    (_checkpoint("lr_scheduler.pt"), "missing", "not found"),
    (_checkpoint("optimizer.pt"), "garbage", "damaged"),
    (_checkpoint("state.json"), "empty", "is empty"),
    (_checkpoint("state.json"), "truncated", "not valid JSON"),
    (_photo, "truncated", "cannot be read as an image"),
    (_photo, "empty", "cannot be read as an image"),
    (_class_image, "truncated", "replace or remove it"),
    (_eval_mapping(".yaml"), "utf16", "UTF-16"),
    (_eval_mapping(".yaml"), "latin1", "not UTF-8"),
    (_eval_mapping(".json"), "truncated", "not valid JSON"),
    (_eval_mapping(".json"), "empty", "is empty"),
    (_dreambench_photo, "truncated", "cannot be read as an image"),
    (_dreambench_photo, "garbage", "cannot be read as an image"),
    (_scores_table, "truncated", "remove it"),
]


def _id(case: tuple[Case, str, str]) -> str:
    return f"{case[0].__name__.strip('_').replace(' ', '-')}-{case[1]}"


def run_cli(argv: list[str]) -> int:
    """`rlbooth.cli.main`; `rlbooth eval` reports its exit status through SystemExit, as the console script does."""
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_damaged_file_is_named_with_exit_2(case, stage_one, no_compute, tmp_path: Path, capsys):
    make, how, words = case
    argv, path = make(tmp_path, stage_one)
    damage(path, how)
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rlbooth {argv[0]}: error: "), err
    assert str(path) in err, err
    assert words in err, err
    assert "Traceback" not in err


def test_the_damages_reach_the_readers(stage_one, tmp_path: Path, capsys):
    """Undamaged, the same set-ups get past their file: the cases above fail for the damage, not the set-up."""
    for name in "abc":
        (tmp_path / name).mkdir()
    argv, path = _checkpoint("optimizer.pt")(tmp_path / "a", stage_one)
    argv += ["--set", "personalize.max_train_steps=3"]
    assert run_cli(argv) == 0
    argv, path = _spec(tmp_path / "b", stage_one)
    assert Subject.from_yaml(path).description == "grün"
    argv, path = _prompt_file(tmp_path / "c", stage_one)
    assert run_cli(argv + ["--steps", "1"]) == 0
    assert (tmp_path / "c" / "images" / "p0-seed0.png").is_file()
