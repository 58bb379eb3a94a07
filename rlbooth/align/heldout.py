"""Stage two watches held-out prompts: the evaluation, the best epoch, early stop and the hacking alarm.

The training reward is measured on the prompts and noise that training optimizes, so it rises when the
policy learns to exploit the reward as surely as when it improves. Every `align.eval_every` epochs the
model draws a fixed held-out prompt set from fixed seeds with the pipeline's deterministic sampler, and
the evaluation rewards score it; their weighted sum of means is the selection metric that picks the
kept epoch, stops the run early and, falling while the training reward rises, raises the alarm.

An evaluation row: `epoch` (epochs done), `train_reward` (that epoch's training reward mean),
`heldout/<reward>` (mean over the held-out images), `selection` and `alarm` (bool).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlbooth.config import AlignConfig
from rlbooth.prompts import Prompt, read_prompt_file
from rlbooth.rewards import CompositeReward
from rlbooth.subject import Subject

if TYPE_CHECKING:
    from rlbooth.sampling import Encoded

Row = dict[str, Any]


def selection_metric(means: dict[str, float], weights: dict[str, float]) -> float:
    """The weighted sum of the evaluation rewards' held-out means."""
    return float(sum(weight * means[name] for name, weight in weights.items()))


def best_row(table: list[Row]) -> Row | None:
    """The evaluation with the highest selection metric; the earliest of equals."""
    return max(table, key=lambda row: row["selection"], default=None) if table else None


def evaluations_since_best(table: list[Row]) -> int:
    """Evaluations after the best one: the early stop's count of evaluations without improvement."""
    best = best_row(table)
    return 0 if best is None else len(table) - 1 - table.index(best)


def hacking_alarm(table: list[Row], window: int) -> str | None:
    """A warning when, over the last `window` evaluations, the training reward rose and the selection metric fell."""
    if len(table) < window:
        return None
    first, last = table[-window], table[-1]
    rose, fell = last["train_reward"] - first["train_reward"], last["selection"] - first["selection"]
    if rose > 0 and fell < 0:
        return (f"possible reward hacking: from epoch {first['epoch']} to {last['epoch']} the training reward rose "
                f"by {rose:.4g} while the held-out selection metric fell by {-fell:.4g}")
    return None


class HeldoutEvaluator:
    """Draws the held-out prompts x seeds with the current weights and scores them with the evaluation rewards."""

    def __init__(self, cfg: AlignConfig, subject: Subject, prompt_file: str, reward: CompositeReward) -> None:
        templates = read_prompt_file(prompt_file)[:cfg.eval_num_prompts]
        self.prompts = [Prompt(subject.prompt(t), True, t) for t in templates]
        self.subject, self.seeds, self.reward = subject, list(cfg.eval_seeds), reward
        self.num_steps = cfg.eval_num_steps or cfg.num_steps
        self.guidance_scale = cfg.guidance_scale

    @torch.no_grad()
    def __call__(self, pipe, autocast_dtype: torch.dtype | None, resolution: int | None,
                 encoded: Encoded | None = None) -> dict[str, float]:
        """Held-out mean of each evaluation reward, `heldout/<name>`, and the selection metric."""
        from rlbooth.sampling import draw

        texts = [p.text for p in self.prompts]
        images = draw(pipe, texts, self.seeds, self.num_steps, self.guidance_scale, autocast_dtype, resolution,
                      encoded)
        pixels = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 255 for im in images])).permute(0, 3, 1, 2)
        rows = [p for p in self.prompts for _ in self.seeds]
        metadata = [{"subject": self.subject, "with_identifier": True, "template": p.template} for p in rows]
        _, components = self.reward(pixels, [p.text for p in rows], metadata)
        means = {name: values.nanmean().item() for name, values in components.items()}
        return {f"heldout/{name}": mean for name, mean in means.items()} | {
            "selection": selection_metric(means, self.reward.weights)}


class Watch:
    """The evaluation table, the best epoch (with its LoRA where it is to be kept) and the early stop.

    The best LoRA lives in memory; a checkpoint writes it to `<folder>/epoch-<N>.safetensors` first, so
    the checkpoint's state (which names the epoch) always finds it on resume.
    """

    def __init__(self, cfg: AlignConfig, folder: Path) -> None:
        self.cfg, self.folder = cfg, folder
        self.table: list[Row] = []
        self.best_weights: dict[str, torch.Tensor] | None = None

    @property
    def best_epoch(self) -> int | None:
        best = best_row(self.table)
        return None if best is None else best["epoch"]

    def due(self, done: int) -> bool:
        every = self.cfg.eval_every
        return every > 0 and (done % every == 0 or done == self.cfg.num_epochs)

    def record(self, row: Row, weights: dict[str, torch.Tensor]) -> str | None:
        """Adds an evaluation; keeps a copy of the weights if it is the new best; returns the alarm, if any."""
        self.table.append(row)
        if self.cfg.keep == "best" and self.best_epoch == row["epoch"]:
            self.best_weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}
        alarm = hacking_alarm(self.table, self.cfg.hacking_window)
        row["alarm"] = alarm is not None
        return alarm

    def should_stop(self) -> bool:
        patience = self.cfg.early_stop_patience
        return patience > 0 and evaluations_since_best(self.table) >= patience

    def state_dict(self, main_process: bool = True) -> dict[str, Any]:
        """For the checkpoint's JSON; writes the best LoRA's file (main process) and removes stale ones."""
        if self.best_weights is not None and main_process:
            path = self.folder / f"epoch-{self.best_epoch}.safetensors"
            if not path.is_file():
                self.folder.mkdir(parents=True, exist_ok=True)
                save_file(self.best_weights, str(path.with_suffix(".tmp")))
                path.with_suffix(".tmp").replace(path)
        return {"table": self.table}

    def prune(self) -> None:
        """Removes best-LoRA files that the latest checkpoint no longer names."""
        for stale in self.folder.glob("epoch-*.safetensors"):
            if stale.name != f"epoch-{self.best_epoch}.safetensors":
                stale.unlink(missing_ok=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.table = state["table"]
        if self.cfg.keep == "best" and self.best_epoch is not None:
            self.best_weights = load_file(str(self.folder / f"epoch-{self.best_epoch}.safetensors"))

    def summary(self) -> dict[str, Any]:
        """What rlbooth.json records: the table, the kept epoch and by what it was chosen."""
        return {"table": self.table, "keep": self.cfg.keep, "best_epoch": self.best_epoch,
                "selection_weights": self.cfg.eval_rewards or self.cfg.reward,
                "alarms": [row["epoch"] for row in self.table if row["alarm"]]}
