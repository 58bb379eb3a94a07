"""Stage two watches held-out prompts: evaluation on schedule, the best epoch kept, early stop, the alarm,
resume, and the per-reward advantages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlbooth.align.heldout import Watch, evaluations_since_best, hacking_alarm
from rlbooth.align.ppo import group_advantages, per_reward_advantages
from rlbooth.align.train import DDPOTrainer, align
from rlbooth.config import ConfigError
from rlbooth.prompts import read_prompt_file
from rlbooth.report import heldout_curves, heldout_section, plot_curves
from rlbooth.sampling import sample_stage
from rlbooth.stages import read_stage
from tests.align.conftest import align_config, assert_same_lora, kill_and_resume

# Trained on brightness, selected by minus the held-out brightness. On the random tiny model the scores move
# by chance (seed 0: selection -0.527, -0.506, -0.513), but they differ, and the best epoch (2) is not the last.
HACKED = ("align.num_epochs=3", "align.eval_every=1", "align.eval_num_prompts=2", "align.eval_seeds=[0, 1]",
          "align.eval_rewards={brightness: -1.0}", "align.learning_rate=1e-1", "align.checkpointing_epochs=1",
          "align.checkpoints_total_limit=null", "align.hacking_window=2")


def rows(*pairs: tuple[float, float]) -> list[dict]:
    return [{"epoch": e + 1, "train_reward": t, "selection": s} for e, (t, s) in enumerate(pairs)]


def test_per_reward_advantages_equal_a_hand_computation():
    """Groups [0, 0, 1, 1]; a and b standardized in their groups (c is absent in group 0), weighted, summed, then
    standardized: a -> [-1, 1, -1, 1], b -> [-1, 1, 1, -1], c -> [0, 0, -1, 1]; a + 2b + c = [-3, 3, 0, 0], whose
    std is sqrt(18 / 4)."""
    components = {"a": np.array([1.0, 3.0, 10.0, 30.0]), "b": np.array([0.1, 0.2, 0.2, 0.1]),
                  "c": np.array([np.nan, np.nan, 5.0, 7.0])}
    adv = per_reward_advantages(components, {"a": 1.0, "b": 2.0, "c": 1.0}, np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(adv, [-1.4142136, 1.4142136, 0.0, 0.0], atol=1e-4)  # eps 1e-6 in the stds
    # the sum's advantages let a's scale decide group 1 (30 > 10) against b's twice larger weight
    summed = group_advantages(np.array([1.2, 3.4, 10.4, 30.2]), np.array([0, 0, 1, 1]))
    assert summed[3] > summed[2]


def test_alarm_fires_only_when_training_rises_and_heldout_falls():
    assert hacking_alarm(rows((0.1, 0.5), (0.2, 0.7), (0.3, 0.6)), window=3) is None  # held out 0.5 -> 0.6: up
    assert "reward hacking" in hacking_alarm(rows((0.1, 0.5), (0.2, 0.7), (0.3, 0.6)), window=2)  # 0.7 -> 0.6
    assert "epoch 1 to 3" in hacking_alarm(rows((0.1, 0.6), (0.2, 0.5), (0.3, 0.4)), window=3)
    assert hacking_alarm(rows((0.1, 0.4), (0.2, 0.5), (0.3, 0.6)), window=3) is None  # both rise
    assert hacking_alarm(rows((0.3, 0.6), (0.2, 0.5), (0.1, 0.4)), window=3) is None  # both fall
    assert hacking_alarm(rows((0.1, 0.6), (0.3, 0.4)), window=3) is None  # too few evaluations


def test_evaluations_fall_due_every_eval_every_epochs_and_at_the_end(tmp_path):
    watch = Watch(align_config("align.eval_every=2", "align.num_epochs=5").align, tmp_path)
    assert [done for done in range(1, 6) if watch.due(done)] == [2, 4, 5]
    assert not any(Watch(align_config().align, tmp_path).due(done) for done in range(1, 6))  # off by default


def test_evaluations_since_best_counts_from_the_earliest_best():
    assert evaluations_since_best([]) == 0
    assert evaluations_since_best(rows((0, 0.1), (0, 0.3), (0, 0.2), (0, 0.3))) == 2
    assert evaluations_since_best(rows((0, 0.1), (0, 0.2))) == 0


@pytest.fixture(scope="module")
def hacked_run(stage_one, tmp_path_factory) -> Path:
    out = align(align_config(*HACKED, "align.keep=best"), stage_one, tmp_path_factory.mktemp("hacked") / "out")
    return out.parent


def heldout(folder: Path) -> dict:
    return json.loads((folder / "rlbooth.json").read_text())["heldout"]


def test_evaluation_equals_scoring_the_kept_lora_by_hand(hacked_run, stage_one):
    """The table's row of the kept epoch equals drawing its LoRA with plain diffusers and scoring by hand."""
    watched = heldout(hacked_run)
    table = watched["table"]
    assert [r["epoch"] for r in table] == [1, 2, 3]
    assert watched["best_epoch"] == max(table, key=lambda r: r["selection"])["epoch"]
    subject = read_stage(stage_one).subject
    prompts = [subject.prompt(t) for t in read_prompt_file("heldout-object")[:2]]
    images = sample_stage(read_stage(hacked_run, "align"), prompts, [0, 1], 4, 5.0)
    by_hand = -np.mean([np.asarray(im, np.float64).mean() / 255 for im in images])
    kept = next(r for r in table if r["epoch"] == watched["best_epoch"])
    assert by_hand == pytest.approx(kept["selection"], abs=2e-4)
    assert kept["heldout/brightness"] == pytest.approx(-kept["selection"])
    others = [r["selection"] for r in table if r is not kept]
    assert all(abs(by_hand - s) > 1e-3 for s in others), "the epochs' held-out scores do not tell them apart"


def test_keep_best_outputs_the_best_epochs_lora(hacked_run):
    """The output LoRA is the one the best epoch's checkpoint holds, not the last one's."""
    best = heldout(hacked_run)["best_epoch"]
    assert best != 3, "the constructed hack did not make an earlier epoch best; the test cannot tell keep from last"
    output = load_file(str(hacked_run / "model" / "pytorch_lora_weights.safetensors"))
    flat = lambda tensors: torch.cat([t.flatten() for _, t in sorted(tensors.items())])
    checkpoint = lambda n: load_file(str(hacked_run / "checkpoints" / f"step-{n}" / "trainable.safetensors"))
    ours = flat(output).sort().values
    torch.testing.assert_close(ours, flat(checkpoint(best)).sort().values, rtol=0, atol=0)
    assert not torch.equal(ours, flat(checkpoint(3)).sort().values)


def test_alarm_flags_in_the_table_follow_the_rule(hacked_run):
    """Window 2: an evaluation is flagged when the training reward rose and the selection fell since the last."""
    table = heldout(hacked_run)["table"]
    rising = [b["train_reward"] > a["train_reward"] and b["selection"] < a["selection"]
              for a, b in zip(table, table[1:])]
    assert [r["alarm"] for r in table] == [False] + rising
    assert heldout(hacked_run)["alarms"] == [r["epoch"] for r in table if r["alarm"]]


def test_early_stop_stops_after_patience_evaluations(stage_one, hacked_run, tmp_path):
    best = heldout(hacked_run)["best_epoch"]
    out = align(align_config(*HACKED, "align.num_epochs=6", "align.early_stop_patience=1"), stage_one, tmp_path / "o")
    meta = json.loads((out.parent / "rlbooth.json").read_text())
    assert len(meta["history"]) == best + 1 < 6
    assert [r["epoch"] for r in meta["heldout"]["table"]] == list(range(1, best + 2))


def test_resume_keeps_the_table_and_the_best_lora(stage_one, hacked_run, tmp_path, monkeypatch):
    config = align_config(*HACKED, "align.keep=best", "align.checkpoints_total_limit=1")
    resumed = kill_and_resume(config, stage_one, tmp_path / "resumed", 2, monkeypatch).parent
    assert heldout(resumed) == heldout(hacked_run)
    assert_same_lora(hacked_run / "model", resumed / "model")


@pytest.mark.parametrize("overrides, message", [
    (["align.keep=best"], "align.keep"),
    (["align.early_stop_patience=2"], "align.early_stop_patience"),
    (["align.eval_every=-1"], "align.eval_every"),
    (["align.hacking_window=1"], "align.hacking_window"),
    (["align.eval_rewards={}"], "align.eval_rewards"),
    (["align.eval_reward_options={aesthetic: {}}"], "align.eval_reward_options"),
])
def test_bad_evaluation_settings_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        align_config(*overrides)


def test_unknown_evaluation_reward_fails_before_any_model_loads(stage_one, tmp_path, monkeypatch):
    monkeypatch.setattr(DDPOTrainer, "__init__", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(Exception, match="no_such_reward"):
        align(align_config("align.eval_every=1", "align.eval_rewards={no_such_reward: 1.0}"), stage_one, tmp_path)


def test_report_names_the_kept_epoch_and_plots_the_curves(hacked_run):
    watched = heldout(hacked_run)
    section = heldout_section(watched)
    best = watched["best_epoch"]
    assert f"Kept: epoch {best} of 3 (align.keep: best)" in section and "-1 x brightness" in section
    assert 'src="heldout.png"' in section
    series = heldout_curves(watched["table"])
    assert list(series) == ["train_reward", "selection", "heldout/brightness"]
    assert series["selection"] == [r["selection"] for r in watched["table"]]
    assert plot_curves(series, panel=100, epochs=[1, 2, 3]).size == (640, 300)
    assert heldout_section(None) == ""


def test_per_reward_mode_in_the_trainer_standardizes_each_reward_within_its_noise_group(stage_one, tmp_path):
    """Groups of 2: a component standardized within its pair is (d / 2) / (|d| / 2 + 1e-6), d the difference to
    the partner: about +1 for the larger, -1 for the smaller."""
    from tests.align.test_train import make_trainer

    config = align_config("align.reward={brightness: 1.0, saturation: 0.5}", "align.advantage_mode=per_reward",
                          "align.samples_per_noise=2")
    trainer = make_trainer(config, stage_one, tmp_path)
    samples = trainer.sample_epoch(0)
    advantages = trainer.advantages(0, samples).numpy()
    index = samples.indices.numpy()
    partner = np.array([int(np.flatnonzero(index == (i ^ 1))[0]) for i in index])
    values = {name: samples.components[name].numpy().astype(np.float64) for name in ("brightness", "saturation")}
    half = {name: (v - v[partner]) / 2 for name, v in values.items()}
    z = {name: h / (np.abs(h) + 1e-6) for name, h in half.items()}
    total = 1.0 * z["brightness"] + 0.5 * z["saturation"]
    np.testing.assert_allclose(advantages, (total - total.mean()) / (total.std() + 1e-6), atol=1e-5)


@pytest.mark.parametrize(("stage", "algorithm"), [("stage_one", "ppo"), ("stage_one_sd3", "nft")])
def test_evaluating_held_out_prompts_leaves_training_unchanged(stage, algorithm, request, tmp_path):
    """The evaluation changes nothing training reads (weights, adapters, schedulers, random streams): a run that
    evaluates after every epoch trains the LoRA a run without evaluations trains (the toy worlds' guards train
    their ppo runs with `--curves`)."""
    stage_one = request.getfixturevalue(stage)
    common = ("align.num_epochs=2", "align.learning_rate=1e-2", f"align.algorithm={algorithm}",
              "align.samples_per_noise=1")
    plain = align(align_config(*common), stage_one, tmp_path / "plain")
    watched = align(align_config(*common, "align.eval_every=1", "align.eval_num_prompts=2", "align.eval_seeds=[0, 1]",
                                 "align.eval_num_steps=3"), stage_one, tmp_path / "watched")
    assert [r["epoch"] for r in heldout(watched.parent)["table"]] == [1, 2]
    trained = load_file(str(plain / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k or ".up." in k), "nothing was trained"
    assert_same_lora(plain, watched)
