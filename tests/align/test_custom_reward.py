"""Stage two with a reward defined outside rlbooth: the example module, named by `align.reward_modules`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rlbooth.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_reward" / "my_rewards.py"


def test_stage_two_runs_with_a_reward_from_the_users_own_module(stage_one, tmp_path, capsys):
    base = ["align", "-c", "tiny", "--stage-one", str(stage_one), "--set", "runtime.report_to=none",
            "--set", "align.num_epochs=1", "--set", "align.num_steps=3", "--set", "align.grid_every=0",
            "--set", "align.reward={warmth: 1.0}", "--set", "align.reward_options={warmth: {blue_weight: 0.5}}"]
    assert main([*base, "-o", str(tmp_path / "without")]) == 2  # not registered until its module is named
    assert "unknown reward 'warmth'" in capsys.readouterr().err

    assert main([*base, "-o", str(tmp_path / "out"), "--set", f"align.reward_modules=[{EXAMPLE}]"]) == 0
    assert sys.modules["my_rewards"].__file__ == str(EXAMPLE)
    (epoch,) = json.loads((tmp_path / "out" / "rlbooth.json").read_text())["history"]
    assert -0.5 <= epoch["reward/warmth"] <= 1.0 and epoch["reward/warmth"] != 0.0
    assert epoch["reward_mean"] == epoch["reward/warmth"]  # the only component, weight 1
