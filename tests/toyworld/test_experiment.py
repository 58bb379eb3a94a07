"""The toy world's claim, guarded in CI: on held-out prompts, stage two follows the prompt where stage one did not.

A shortened run of `python -m rlbooth.toyworld.experiment` (fixed seeds, a few minutes on one CPU
thread): stage one on the shipped subject, stage two with mixed prompts, every model scored on
the held-out scenes with the same noise. Stage two switched off (a zero learning rate) or with its
update sign flipped fails the alignment assertion.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlbooth.config import load_config
from rlbooth.subject import Subject
from rlbooth.toyworld.experiment import EXAMPLE_SUBJECT, Results, run_experiment

SHORT = ["runtime.report_to=none", "personalize.validation_steps=0", "align.grid_every=0", "align.num_epochs=6"]
ALIGNMENT_MARGIN = 0.1
IDENTITY_TOLERANCE = 0.1


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    config = load_config("toy", SHORT)
    out = tmp_path_factory.mktemp("toyworld-experiment")
    return run_experiment(config, Subject.from_yaml(EXAMPLE_SUBJECT), out, {"mixed": []}, seeds=list(range(8)))


def test_stage_one_learned_the_subject_but_ignores_the_scene(results: Results) -> None:
    base, one = results.scores["base"], results.scores["stage one"]
    assert one.identity > base.identity + 0.3
    assert one.alignment < base.alignment


def test_stage_two_beats_stage_one_on_heldout_alignment(results: Results) -> None:
    one, two = results.scores["stage one"], results.scores["stage two (mixed)"]
    assert two.alignment > one.alignment + ALIGNMENT_MARGIN, results.table()


def test_stage_two_keeps_the_subject(results: Results) -> None:
    one, two = results.scores["stage one"], results.scores["stage two (mixed)"]
    assert two.identity > one.identity - IDENTITY_TOLERANCE, results.table()


def test_training_reward_rose(results: Results) -> None:
    history = results.curves["mixed"]
    assert history[-1]["reward/toy_alignment"] > history[0]["reward/toy_alignment"]
