"""The toy-world experiment's command refuses bad arguments before any stage trains."""

from __future__ import annotations

import pytest

from rlbooth.config import ConfigError
from rlbooth.toyworld.experiment import main


def test_an_override_for_an_arm_not_run_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--arms", "identifier-only", "--arm-set", "nft", "align.num_epochs=4"])
    assert "--arm-set names ['nft'], which --arms does not run" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_bad_arm_override_names_its_field_before_stage_one_trains(tmp_path):
    with pytest.raises(ConfigError, match="align.num_epochs"):
        main(["--out", str(tmp_path), "--config", "toy-flow", "--arms", "identifier-only", "nft",
              "--arm-set", "nft", "align.num_epochs=0"])
    assert not (tmp_path / "personalize").exists()


@pytest.mark.parametrize("option", ["--base-seeds", "--train-prompt-seeds"])
def test_a_negative_number_of_seeds_is_refused(tmp_path, capsys, option):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), option, "-1"])
    assert f"{option} -1: give a number of seeds" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
