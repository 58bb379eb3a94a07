"""One run per output folder: a finished stage, its checkpoints or the report are reused only for the config
and subject that made them, README's commands never share a folder across configs, and a second writer of
a folder is refused while the first finishes."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlbooth import cli
from rlbooth.config import load_config
from rlbooth.lock import LOCK, OutputLockedError, output_lock
from rlbooth.personalize import train as personalize_train
from rlbooth.stages import METADATA, OutputError, claim_output, stage_request
from rlbooth.subject import Subject
from tests.conftest import REPO
from tests.test_run import QUICK, write_spec

TOY_SUBJECT = REPO / "examples" / "toyworld" / "subject.yaml"


def finish_stage_one(folder: Path, preset: str, subject: Subject) -> None:
    """A stage-one folder as `rlbooth run --config <preset>` leaves it (metadata only: nothing here loads it)."""
    folder.mkdir(parents=True)
    (folder / "model").mkdir()
    (folder / METADATA).write_text(json.dumps({"stage": "personalize", "mode": "full", "subject": subject.to_dict(),
                                               "config": load_config(preset).to_dict()}))


def test_readme_sequence_toy_then_toy_flow_never_reuses_the_unet_stages(tmp_path: Path, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(personalize_train, "personalize", must_not_run)
    subject = Subject.from_yaml(TOY_SUBJECT)
    finish_stage_one(tmp_path / "run" / "personalize", "toy", subject)
    assert cli.main(["run", str(TOY_SUBJECT), "--config", "toy-flow", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained: 'toyworld' there, 'toyworld-flow' now" in err
    assert "personalize.learning_rate" in err and "--output" in err and str(tmp_path / "run" / "personalize") in err


def readme_runs() -> list[tuple[str, Path]]:
    """(preset, run folder) of every `rlbooth run` of the toy world's subject in README, in order."""
    runs = []
    for line in (REPO / "README.md").read_text().splitlines():
        if not line.startswith("rlbooth run examples/toyworld/subject.yaml"):
            continue
        args = shlex.split(line.split("#")[0])
        preset = args[args.index("--config") + 1]
        output = Path(args[args.index("--output") + 1]) if "--output" in args else Path("runs/toyworld-quarters")
        runs.append((preset, output))
    return runs


def test_readme_commands_in_order_share_a_folder_only_with_the_same_config(tmp_path: Path):
    runs = readme_runs()
    assert [preset for preset, _ in runs][:2] == ["toy", "toy-flow"]
    subject = Subject.from_yaml(TOY_SUBJECT)
    made: dict[Path, str] = {}
    for preset, output in runs:  # each command claims its folder as `rlbooth run` does, after those before it
        folder = tmp_path / output / "personalize"
        if output in made:
            claim_output(folder, "personalize", stage_request("personalize", load_config(preset), subject))
        else:
            finish_stage_one(folder, preset, subject)
            made[output] = preset
    assert len(made) == 2


def test_checkpoints_of_another_request_are_not_resumed(tmp_path: Path):
    subject = Subject.from_yaml(TOY_SUBJECT)
    folder = tmp_path / "align"
    request = stage_request("align", load_config("toy"), subject, tmp_path / "personalize")
    claim_output(folder, "align", request)
    (folder / "checkpoints" / "step-4").mkdir(parents=True)
    claim_output(folder, "align", request)  # the same request resumes
    other = stage_request("align", load_config("toy", ["align.learning_rate=0.5"]), subject, tmp_path / "personalize")
    with pytest.raises(OutputError, match=r"unfinished stage \(align\).*align.learning_rate: 0.01 there, 0.5 now"):
        claim_output(folder, "align", other)
    moved = stage_request("align", load_config("toy"), subject, tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="stage_one"):
        claim_output(folder, "align", moved)


def test_report_fields_do_not_block_a_stage(tmp_path: Path):
    subject = Subject.from_yaml(TOY_SUBJECT)
    finish_stage_one(tmp_path / "personalize", "toy", subject)
    claim_output(tmp_path / "personalize", "personalize",
                 stage_request("personalize", load_config("toy", ["report.num_prompts=2", "align.num_epochs=1"]),
                               subject))


HOLDER = """
import sys, time
from pathlib import Path
from rlbooth.lock import output_lock
with output_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputLockedError, match=rf"{tmp_path} is being written by another process \(pid "
                                                rf"{holder.pid} on .*started"):
        with output_lock(tmp_path):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with caplog.at_level("INFO", logger="rlbooth.lock"):
        with output_lock(tmp_path):
            assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert f"last owner (pid {holder.pid}" in caplog.text
    assert (tmp_path / LOCK).read_text() == ""  # released


@pytest.mark.slow
def test_two_processes_one_folder_the_second_is_refused_the_first_finishes(tmp_path: Path, capsys):
    spec = write_spec(tmp_path)
    argv = ["personalize", "-c", "tiny", "--subject", str(spec), "-o", str(tmp_path / "out"),
            *[arg for item in QUICK + [f"personalize.class_data_dir={tmp_path / 'class'}"] for arg in ("--set", item)]]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "rlbooth.cli", *argv], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "out" / LOCK
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text()) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cli.main(argv) == 2  # the second command, while the first holds the folder
    err = capsys.readouterr().err
    assert re.search(rf"{tmp_path / 'out'} is being written by another process \(pid {first.pid} ", err)
    out, err_first = first.communicate(timeout=600)
    assert first.returncode == 0, err_first
    assert (tmp_path / "out" / METADATA).is_file() and "stage one finished" in out


def test_logging_and_checkpointing_fields_do_not_block_a_resume(tmp_path: Path):
    subject = Subject.from_yaml(TOY_SUBJECT)
    folder = tmp_path / "personalize"
    claim_output(folder, "personalize", stage_request("personalize", load_config("toy"), subject))
    (folder / "checkpoints" / "step-400").mkdir(parents=True)
    resumed = load_config("toy", ["personalize.checkpointing_steps=100", "personalize.validation_steps=0",
                                  "personalize.validation_seeds=[5]", "align.grid_every=0"])
    claim_output(folder, "personalize", stage_request("personalize", resumed, subject))
    with pytest.raises(OutputError, match="personalize.max_train_steps: 1200 there, 1300 now"):
        claim_output(folder, "personalize",
                     stage_request("personalize", load_config("toy", ["personalize.max_train_steps=1300"]), subject))
