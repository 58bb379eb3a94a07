"""Stage two end to end with a composite of the model-based rewards, on tiny models built in code."""

from __future__ import annotations

import json
import math

from rlbooth.align.train import align
from tests.align.conftest import align_config
from tests.rewards.test_clip_models import head_file, tiny_clip  # noqa: F401  (module fixtures)
from tests.rewards.test_identity import tiny_vit  # noqa: F401


def test_stage_two_with_aesthetic_clip_t_and_identity(stage_one, tmp_path, tiny_clip, head_file, tiny_vit):  # noqa: F811
    options = {"aesthetic": {"clip_model": str(tiny_clip), "head": str(head_file)},
               "clip_t": {"clip_model": str(tiny_clip)}, "identity_dino": {"model": str(tiny_vit)}}
    config = align_config("align.num_epochs=2", "align.reward={aesthetic: 0.1, clip_t: 1.0, identity_dino: 1.0}",
                          f"align.reward_options={json.dumps(options)}", "align.reward_standardize=[clip_t]")
    out = align(config, stage_one, tmp_path / "out")
    history = json.loads((out.parent / "rlbooth.json").read_text())["history"]
    assert len(history) == 2
    for epoch in history:
        for name in ("aesthetic", "clip_t", "identity_dino"):
            assert math.isfinite(epoch[f"reward/{name}"]), (name, epoch)
        assert -1.0 <= epoch["reward/identity_dino"] <= 1.0
