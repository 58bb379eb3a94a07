"""Stage one reads its statistics from the device every `TrainLoop.log_every` steps, and logs what it logged before."""

from __future__ import annotations

from accelerate import Accelerator

from rlbooth.config import load_config
from rlbooth.personalize.train import TrainLoop, personalize
from rlbooth.subject import Subject


def logged_run(photos, out, monkeypatch, log_every: int) -> list[tuple[int, dict[str, float]]]:
    logged: list[tuple[int, dict[str, float]]] = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None:
                        logged.append((step, dict(values))))
    monkeypatch.setattr(TrainLoop, "log_every", log_every)
    config = load_config("tiny", ["runtime.report_to=none", "personalize.validation_steps=0",
                                  "personalize.max_train_steps=12", "personalize.checkpointing_steps=10",
                                  "personalize.gradient_accumulation_steps=2"])
    personalize(config, Subject(images=photos, class_noun="toy"), out)
    return logged


def test_logs_every_step_the_values_a_per_step_read_gives_without_reading_each_step(tmp_path, monkeypatch,
                                                                                   subject_photos, item_calls):
    batched = logged_run(subject_photos, tmp_path / "batched", monkeypatch, log_every=5)
    assert item_calls == [], f"{len(item_calls)} .item() calls (host syncs) by rlbooth in the training loop"
    per_step = logged_run(subject_photos, tmp_path / "per-step", monkeypatch, log_every=1)
    assert [step for step, _ in batched] == list(range(1, 13))
    assert batched == per_step  # exactly: the same float32 values, read in one copy instead of twelve
    assert set(batched[0][1]) >= {"loss", "lr"} and all(isinstance(v, float) for _, row in batched for v in row.values())
