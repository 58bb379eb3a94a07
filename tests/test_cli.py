"""The `rlbooth` console script: fast help without torch, and user errors reported before any model loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from rlbooth import __version__, cli
from rlbooth.config import Config

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_SPEC = REPO / "examples" / "tiny" / "subject.yaml"
MISSING_HUB_ID = "rlbooth-test-no-such-org/no-such-model"


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *( ["-c", code] if code else []), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env)


# --------------------------------------------------------------------------- help is fast and light


COMMANDS = [pytest.param([sys.executable, "-m", "rlbooth.cli"], id="python-m")]
if shutil.which("rlbooth"):
    COMMANDS.append(pytest.param([shutil.which("rlbooth")], id="console-script"))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("argv, expected", [
    (["--help"], ["usage: rlbooth", "personalize"]),
    (["personalize", "--help"], ["usage: rlbooth personalize", "--class-noun", "--subject", "--set", "--output",
                                 "--resume", "KEY=VALUE"]),
    (["--version"], [f"rlbooth {__version__}"]),
])
def test_help_subprocess(command: list[str], argv: list[str], expected: list[str]):
    start = time.monotonic()
    proc = subprocess.run([*command, *argv], capture_output=True, text=True, timeout=60, cwd=REPO)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    for word in expected:
        assert word in proc.stdout
    assert elapsed < 5, f"`rlbooth {' '.join(argv)}` took {elapsed:.1f}s; something heavy is imported"


def test_help_does_not_import_torch():
    code = textwrap.dedent("""
        import sys
        from rlbooth import cli
        cli.build_parser()
        for argv in (["--help"], ["personalize", "--help"]):
            try:
                cli.main(argv)
            except SystemExit as exit:
                assert exit.code == 0, exit.code
            else:
                raise AssertionError("--help did not exit")
        heavy = sorted(m for m in ("torch", "diffusers", "transformers", "accelerate", "peft") if m in sys.modules)
        assert not heavy, heavy
        print("LIGHT")
    """)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("LIGHT")


@pytest.mark.parametrize("argv", [[], ["personalize"], ["personalize", "--images", "x"], ["frobnicate"],
                                  ["personalize", "--output", "o", "--kind", "robot"]])
def test_usage_errors_exit_2(argv: list[str], capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    assert "usage: rlbooth" in capsys.readouterr().err


# --------------------------------------------------------------------------- subject from flags


def test_subject_from_flags(tmp_path: Path):
    args = cli.build_parser().parse_args(["personalize", "--images", str(tmp_path / "dog"), "--class-noun", "dog",
                                          "--output", str(tmp_path / "out")])
    subject = cli.subject_from_args(args)
    assert (subject.images, subject.class_noun, subject.identifier, subject.kind, subject.name) == (
        tmp_path / "dog", "dog", "sks", "object", "dog")


def test_flags_override_spec(tmp_path: Path):
    args = cli.build_parser().parse_args(["personalize", "--subject", str(EXAMPLE_SPEC), "--class-noun", "plushie",
                                          "--identifier", "zwx", "--kind", "live", "--output", str(tmp_path)])
    subject = cli.subject_from_args(args)
    assert subject.images == EXAMPLE_SPEC.parent.resolve() / "photos"  # from the spec, relative to it
    assert (subject.class_noun, subject.identifier, subject.kind, subject.description) == (
        "plushie", "zwx", "live", "triangular")


# --------------------------------------------------------------------------- errors before any model loads


@pytest.fixture
def no_model_load(monkeypatch, tmp_path: Path):
    """Any attempt to load a pipeline fails the test: these errors must come first."""
    import rlbooth.models
    import rlbooth.personalize.train

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the input error was reported")

    monkeypatch.setattr(rlbooth.models, "load_pipeline", forbidden)
    monkeypatch.setattr(rlbooth.personalize.train, "load_pipeline", forbidden)
    monkeypatch.setenv("RLBOOTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def photos(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (48, 48), (50 * i, 100, 150)).save(folder / f"{i}.png")
    return folder


def _missing_images(tmp):
    return ["--images", str(tmp / "nope"), "--class-noun", "dog"], [str(tmp / "nope"), "does not exist"]


def _spec_with_missing_images(tmp):
    (tmp / "spec").mkdir()
    (tmp / "spec" / "subject.yaml").write_text("images: gone\nclass_noun: dog\n")
    return ["--subject", str(tmp / "spec" / "subject.yaml")], [str(tmp / "spec" / "gone"), "does not exist"]


def _missing_spec(tmp):
    return ["--subject", str(tmp / "nope.yaml")], [str(tmp / "nope.yaml"), "not found"]


def _missing_class_noun(tmp):
    return ["--images", str(photos(tmp / "photos"))], ["--class-noun", "--subject"]


def _missing_images_flag(tmp):
    return ["--class-noun", "dog"], ["--images", "--subject"]


def _unknown_set_key(tmp):
    return (["--images", str(photos(tmp / "photos")), "--class-noun", "dog",
             "--set", "personalize.lerning_rate=1e-4"], ["personalize.lerning_rate", "unknown key"])


def _bad_set_syntax(tmp):
    return (["--images", str(photos(tmp / "photos")), "--class-noun", "dog", "--set", "personalize.max_train_steps"],
            ["KEY=VALUE", "personalize.max_train_steps"])


def _wrong_type_set(tmp):
    return (["--images", str(photos(tmp / "photos")), "--class-noun", "dog", "--set", "personalize.lora_rank=four"],
            ["personalize.lora_rank", "integer"])


def _invalid_value_set(tmp):
    return (["--images", str(photos(tmp / "photos")), "--class-noun", "dog", "--set", "personalize.max_train_steps=0"],
            ["personalize.max_train_steps", "positive"])


def _non_image_in_folder(tmp):
    folder = photos(tmp / "photos")
    (folder / "notes.txt").write_text("shot on a phone")
    return ["--images", str(folder), "--class-noun", "dog"], [str(folder / "notes.txt"), "not an image"]


def _corrupt_image(tmp):
    folder = photos(tmp / "photos")
    (folder / "bad.jpg").write_bytes(os.urandom(1000))
    return ["--images", str(folder), "--class-noun", "dog"], [str(folder / "bad.jpg"), "cannot be read"]


def _empty_folder(tmp):
    (tmp / "photos").mkdir()
    return ["--images", str(tmp / "photos"), "--class-noun", "dog"], ["holds no images"]


def _finished_output(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "rlbooth.json").write_text("{}")
    return ["--images", str(photos(tmp / "photos")), "--class-noun", "dog"], [str(tmp / "out"), "already holds"]


def _bad_identifier(tmp):
    return (["--images", str(photos(tmp / "photos")), "--class-noun", "dog", "--identifier", "two words"],
            ["subject.identifier"])


@pytest.mark.parametrize("make", [
    _missing_images, _spec_with_missing_images, _missing_spec, _missing_class_noun, _missing_images_flag,
    _unknown_set_key, _bad_set_syntax, _wrong_type_set, _invalid_value_set, _non_image_in_folder, _corrupt_image,
    _empty_folder, _finished_output, _bad_identifier,
], ids=lambda f: f.__name__.strip("_"))
def test_input_errors_before_model_load(no_model_load, tmp_path: Path, capsys, make):
    extra, expected = make(tmp_path)
    argv = ["personalize", "--config", "tiny", "--output", str(tmp_path / "out"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlbooth personalize: error: "), err
    for text in expected:
        assert text in err, (text, err)
    assert "Traceback" not in err


@pytest.mark.parametrize("preset", ["no-such-preset", "nope/x.yaml"])
def test_unknown_preset(no_model_load, tmp_path: Path, capsys, preset: str):
    argv = ["personalize", "--config", preset, "--images", str(photos(tmp_path / "p")), "--class-noun", "dog",
            "--output", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert preset in err and "tiny" in err and "sd15" in err


def test_fp16_without_gpu(no_model_load, tmp_path: Path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed with a GPU")
    argv = ["personalize", "--config", "sd15", "--images", str(photos(tmp_path / "p")), "--class-noun", "dog",
            "--output", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "runtime.mixed_precision" in err and "--set" in err


def test_error_exit_code_in_subprocess(tmp_path: Path):
    """The real console entry point: exit status 2, one error line, no traceback."""
    env = {**os.environ, "RLBOOTH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "rlbooth.cli", "personalize", "--config", "tiny",
                           "--images", str(tmp_path / "nope"), "--class-noun", "dog", "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"rlbooth personalize: error: images folder {tmp_path / 'nope'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- a hub id that does not exist


@pytest.fixture
def offline_hub(monkeypatch, tmp_path: Path):
    """No network: HF_HUB_OFFLINE=1 (also patched into huggingface_hub, which reads it at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("RLBOOTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def _assert_helpful(message: str, model_id: str) -> None:
    assert model_id in message
    assert "model.pretrained" in message
    assert "local" in message or "--set" in message
    assert "--set model.pretrained=" in message  # the fix, spelled out


def test_missing_hub_id_model_load_error(offline_hub):
    from rlbooth.models import ModelLoadError, load_pipeline

    cfg = Config().model
    cfg.pretrained = MISSING_HUB_ID
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(cfg)
    _assert_helpful(str(err.value), MISSING_HUB_ID)


def test_missing_hub_id_through_cli(offline_hub, tmp_path: Path, capsys):
    argv = ["personalize", "--config", "tiny", "--subject", str(EXAMPLE_SPEC), "--output", str(tmp_path / "out"),
            "--set", f"model.pretrained={MISSING_HUB_ID}", "--set", "runtime.report_to=none"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlbooth personalize: error: ")
    _assert_helpful(err, MISSING_HUB_ID)
    assert not (tmp_path / "out" / "rlbooth.json").exists()


def test_empty_local_folder_model_load_error(offline_hub, tmp_path: Path):
    from rlbooth.models import ModelLoadError, load_pipeline

    cfg = Config().model
    cfg.pretrained = str(tmp_path / "empty-model")
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(cfg)
    assert str(tmp_path / "empty-model") in str(err.value) and "model.pretrained" in str(err.value)
