"""The toy-world experiment's command refuses bad arguments before any stage trains, and scores each model and
prompt set on the seeds its options give."""

from __future__ import annotations

import pytest

from rlbooth.config import ConfigError
from rlbooth.toyworld.experiment import Results, main


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


def test_each_model_and_prompt_set_is_scored_on_the_shorter_of_its_seed_lists():
    seeds = list(range(32))
    results = Results(prompts={}, seeds=seeds, base_seeds=seeds[:8], train_prompt_seeds=seeds[:16])
    assert results.seeds_for("stage one", "heldout") == seeds
    assert results.seeds_for("stage one", "train") == seeds[:16]
    assert results.seeds_for("base", "heldout") == results.seeds_for("base", "train") == seeds[:8]
    wide = Results(prompts={}, seeds=seeds, base_seeds=seeds[:20], train_prompt_seeds=seeds[:16])
    assert wide.seeds_for("base", "train") == seeds[:16]
