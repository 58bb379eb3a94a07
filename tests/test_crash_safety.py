"""Kill -9 at several moments and a full disk: rerunning the same command ends where an uninterrupted run ends.

The kills are real SIGKILLs of a forked `rlbooth run` (fork, not a fresh interpreter: the imports are
already paid for), placed by `RLBOOTH_TEST_KILL_AT=<site>:<n>` (see rlbooth.files.kill_point): inside a
class-image write, inside a checkpoint write, between a stage's model/ and its rlbooth.json, during
stage-two sampling, inside stage two's checkpoint write, inside the report.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import rlbooth.checkpoint
from rlbooth import cli
from rlbooth.checkpoint import check_checkpoint
from rlbooth.files import KILL_AT, DiskFullError, replacing, write_text_atomic
from tests.test_run import QUICK, write_spec

RUN = QUICK + ["personalize.checkpointing_steps=2", "personalize.checkpoints_total_limit=null",
               "align.checkpoints_total_limit=null"]
LORA = "model/pytorch_lora_weights.safetensors"


def run_argv(root: Path) -> list[str]:
    sets = RUN + [f"personalize.class_data_dir={root / 'class'}"]
    return ["run", str(root / "toy.yaml"), "-c", "tiny", "-o", str(root / "run"),
            *[arg for item in sets for arg in ("--set", item)]]


def _child(argv: list[str], kill_at: str | None) -> None:
    if kill_at:
        os.environ[KILL_AT] = kill_at
    else:
        os.environ.pop(KILL_AT, None)
    code = cli.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def forked_cli(argv: list[str], kill_at: str | None = None) -> int:
    """The CLI in a forked process; its exit code (-9 when the kill point fired)."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(argv, kill_at))
    proc.start()
    proc.join(timeout=600)
    return proc.exitcode


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("whole")
    write_spec(root)
    assert forked_cli(run_argv(root)) == 0
    return root / "run"


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-6, msg=key)


# kill point -> what the killed run must have left
LEFT = {
    "image-write:2": lambda r: (r / "class" / "00000.png").is_file() and (r / "class" / ".00001.png.tmp").is_file()
    and not (r / "class" / "00001.png").exists(),
    "checkpoint-write:2": lambda r: (r / "run/personalize/checkpoints/step-2").is_dir()
    and (r / "run/personalize/checkpoints/.tmp-step-4/trainable.safetensors").is_file(),
    "checkpoint-write:3": lambda r: (r / "run/personalize/rlbooth.json").is_file()  # resumed at step 2: 4, 1, then 2
    and (r / "run/align/checkpoints/step-1").is_dir() and (r / "run/align/checkpoints/.tmp-step-2").is_dir(),
    "publish:1": lambda r: (r / "run/personalize/model").is_dir() and not (r / "run/personalize/rlbooth.json").exists(),
    "rollout:3": lambda r: (r / "run/align/checkpoints/step-1").is_dir()
    and not (r / "run/align/checkpoints/step-2").exists(),
    "checkpoint-write:1": lambda r: (r / "run/align/checkpoints/.tmp-step-2").is_dir(),
    "image-write:1": lambda r: (r / "run/align/rlbooth.json").is_file() and not (r / "run/report/index.html").exists(),
}
CHAINS = {
    # inside a class-image write, inside stage one's and stage two's checkpoint writes: the default run
    "quick": ["image-write:2", "checkpoint-write:2", "checkpoint-write:3"],
    # also between model/ and rlbooth.json, during sampling, inside the report: RLBOOTH_KILL_SWEEP=1
    "sweep": ["image-write:2", "checkpoint-write:2", "publish:1", "rollout:3", "checkpoint-write:1", "image-write:1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("chain", [
    "quick", pytest.param("sweep", marks=pytest.mark.skipif(not os.environ.get("RLBOOTH_KILL_SWEEP"),
                                                            reason="the longer sweep: set RLBOOTH_KILL_SWEEP=1"))])
def test_killed_at_each_moment_rerun_ends_like_an_uninterrupted_run(whole_run: Path, tmp_path: Path, chain: str):
    write_spec(tmp_path)
    argv = run_argv(tmp_path)
    for kill_at in CHAINS[chain]:
        assert forked_cli(argv, kill_at) == -9, f"{kill_at} was not reached"
        assert LEFT[kill_at](tmp_path), f"after the kill at {kill_at}"
    assert forked_cli(argv) == 0
    run = tmp_path / "run"
    for stage in ("personalize", "align"):
        assert_same_weights(whole_run / stage / LORA, run / stage / LORA)
    assert (np.asarray(Image.open(run / "report" / "sheet.png")) ==
            np.asarray(Image.open(whole_run / "report" / "sheet.png"))).all()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name], "a partial file was left behind"


def test_disk_full_in_a_checkpoint_keeps_the_last_one_and_a_rerun_resumes(whole_run: Path, tmp_path: Path,
                                                                           monkeypatch, capsys):
    write_spec(tmp_path)
    argv = ["personalize", "-c", "tiny", "--subject", str(tmp_path / "toy.yaml"), "-o", str(tmp_path / "out"),
            *[arg for item in RUN + [f"personalize.class_data_dir={whole_run.parent / 'class'}"]
              for arg in ("--set", item)]]
    save_file, calls = rlbooth.checkpoint.save_file, []

    def fills_the_disk(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the step-4 checkpoint: half a file, then ENOSPC
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(rlbooth.checkpoint, "save_file", fills_the_disk)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    checkpoints = tmp_path / "out" / "checkpoints"
    assert "disk full" in err and str(checkpoints) in err and f"{checkpoints / 'step-2'}, is intact" in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2"]  # the partial step-4 is gone
    check_checkpoint(checkpoints / "step-2")
    assert_same_weights(whole_run / "personalize/checkpoints/step-2/trainable.safetensors",
                        checkpoints / "step-2" / "trainable.safetensors")

    monkeypatch.setattr(rlbooth.checkpoint, "save_file", save_file)  # space freed
    assert cli.main(argv + ["--resume"]) == 0
    assert_same_weights(whole_run / "personalize" / LORA, tmp_path / "out" / LORA)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     OSError(errno.EDQUOT, "Disk quota exceeded"),
                                     RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_a_full_disk_keeps_the_old_file_and_names_the_folder(tmp_path: Path, failure: Exception):
    target = tmp_path / "report" / "index.html"
    write_text_atomic(target, "old")
    with pytest.raises(DiskFullError, match=f"disk full: writing index.html in {tmp_path / 'report'}"):
        with replacing(target) as tmp:
            tmp.write_text("half a page")
            raise failure
    assert target.read_text() == "old"
    assert os.listdir(target.parent) == ["index.html"]


def test_other_write_errors_stay_what_they_are(tmp_path: Path):
    with pytest.raises(PermissionError):
        with replacing(tmp_path / "x.txt") as tmp:
            tmp.write_text("x")
            raise PermissionError(errno.EACCES, "Permission denied")
    assert os.listdir(tmp_path) == []


def test_a_damaged_class_image_is_drawn_again(tmp_path: Path):
    from rlbooth.personalize.class_images import missing_class_images

    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(tmp_path / f"{i:05d}.png")
    whole = (tmp_path / "00001.png").read_bytes()
    (tmp_path / "00001.png").write_bytes(whole[:len(whole) // 2])
    (tmp_path / ".00002.png.tmp").write_bytes(b"left by a kill")
    assert missing_class_images(tmp_path, 4) == [1, 3]
