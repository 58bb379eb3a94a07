"""The advantages that reach the PPO term are clipped to +- align.adv_clip_max, whichever normalization made them."""

from __future__ import annotations

import pytest
import torch

from tests.align.conftest import align_config
from tests.align.test_train import make_trainer

CLIP = 1.5
OUTLIER = 7  # global index of the one sample with reward 1 among eight with reward 0


@pytest.mark.parametrize("normalization", [
    "align.per_prompt_stat_tracking=true",   # per prompt (batch statistics until a buffer fills)
    "align.per_prompt_stat_tracking=false",  # the batch: the outlier's z-score is 2.6
    "align.samples_per_noise=2",             # groups sharing x_T: the outlier's advantage is 2.0
])
def test_outlier_advantage_is_clipped_before_training(stage_one, tmp_path, normalization):
    trainer = make_trainer(align_config(f"align.adv_clip_max={CLIP}", normalization), stage_one, tmp_path)
    sample = trainer.sample_epoch

    def sample_with_outlier(epoch: int):
        samples = sample(epoch)
        samples.rewards = (samples.indices == OUTLIER).float()
        return samples

    seen: dict[int, float] = {}

    def record(samples, rows, step, advantages):
        for row, advantage in zip(rows.tolist(), advantages.tolist()):
            seen[int(samples.indices[row])] = advantage
        return {name: torch.zeros(()) for name in ("loss", "approx_kl", "clipfrac")}

    trainer.sample_epoch, trainer.train_step = sample_with_outlier, record
    trainer.run_epoch(0)

    assert sorted(seen) == list(range(8))
    assert seen[OUTLIER] == pytest.approx(CLIP)  # clipped to the bound, not rescaled
    assert max(abs(a) for a in seen.values()) <= CLIP + 1e-6
