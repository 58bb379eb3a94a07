"""Reward names and options are checked before stage one or any model loads; the registry imports no toy world."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlbooth.cli import main
from rlbooth.personalize import train as personalize_train
from tests.test_run import QUICK, write_spec


@pytest.mark.parametrize("overrides, message", [
    (["align.reward_options={brightness: {gain: 2.0}}"], "unexpected keyword argument 'gain'"),
    (["align.reward={jpeg_compressibility: 1.0}", "align.reward_options={jpeg_compressibility: {quality: high}}"],
     "bad option 'quality' for reward 'jpeg_compressibility': expected int, got str 'high'"),
    (["align.reward={brightnes: 1.0}"], "unknown reward 'brightnes'"),
    (["align.reward_modules=[no_such_reward_module]"], "module 'no_such_reward_module' not found"),
])
def test_bad_reward_in_run_fails_before_stage_one(tmp_path, monkeypatch, capsys, overrides, message):
    def must_not_run(*args, **kwargs):
        raise AssertionError("stage one ran before the rewards were checked")

    monkeypatch.setattr(personalize_train, "personalize", must_not_run)
    args = ["run", str(write_spec(tmp_path)), "-c", "tiny", "-o", str(tmp_path / "run")]
    for item in QUICK + overrides:
        args += ["--set", item]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_reward_option_in_align_fails_before_the_stage_is_read(tmp_path, capsys):
    assert main(["align", "-c", "tiny", "--stage-one", str(tmp_path / "nothing"), "-o", str(tmp_path / "out"),
                 "--set", "align.reward_options={jpeg_compressibility: {qualty: 90}}"]) == 2
    err = capsys.readouterr().err
    assert "qualty" in err and "it accepts: quality" in err
    assert not (tmp_path / "out").exists()


def test_options_are_checked_against_the_factory_types():
    from rlbooth.rewards import RewardError, check_reward_options

    check_reward_options("jpeg_compressibility", {"quality": 90})
    check_reward_options("identity_face", {"recognition": None, "no_face_score": -2})  # int for float, None for str | None
    check_reward_options("clip_t", {"clip_model": "/local/clip"})
    with pytest.raises(RewardError, match="expected float, got bool"):
        check_reward_options("identity_face", {"no_face_score": True})
    with pytest.raises(RewardError, match="expected str, got int"):
        check_reward_options("aesthetic", {"clip_model": 3})


def test_the_registry_does_not_import_the_toy_world():
    code = ("import sys, rlbooth.rewards; loaded = [m for m in sys.modules if 'toyworld' in m or "
            "m.startswith('rlbooth.rewards.') and m != 'rlbooth.rewards.composite']; assert not loaded, loaded")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
