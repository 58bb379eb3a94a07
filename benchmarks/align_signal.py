"""Stage two's gradient signal: is there one at this many samples, and which timesteps carry it?

    python benchmarks/align_signal.py --stage-one runs/toy/personalize --config toy [--group 8] [--repeats 3]

Samples one epoch of trajectories in groups that share a prompt and initial noise (`--group`), then
prints:
- how much of the reward's variance the initial noise decides (between groups) and how much the
  policy's actions do (within groups): only the second share can carry a policy gradient;
- each reward component's variance within groups (the part the policy's steps decide);
- the split-half cosine of the policy-gradient estimate (even samples against odd ones, both from the
  same update): near 0, the update at this sample count is noise; near 1, it is all signal. Once with
  batch-normalized advantages (DDPO's), once with a baseline per initial noise (`align.samples_per_noise`);
  over all steps, over `align.timestep_window`'s steps, and per step, with each step's gradient norm (a
  step whose norm dwarfs the others decides the sum's direction).
Repeats use other epochs' draws; means and standard deviations over them are printed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from rlbooth.accel import make_accelerator
from rlbooth.align.ppo import batch_advantages, group_advantages
from rlbooth.align.train import DDPOTrainer, Samples
from rlbooth.config import load_config
from rlbooth.prompts import default_prompt_set, read_prompt_file
from rlbooth.rewards import CompositeReward
from rlbooth.stages import read_stage


def policy_gradient(trainer: DDPOTrainer, samples: Samples, rows: torch.Tensor, advantages: torch.Tensor,
                    steps: list[int]) -> torch.Tensor:
    """Flattened gradient of sum(advantage x log-prob) over `rows` and `steps`, at the sampling weights."""
    for p in trainer.params:
        p.grad = None
    batch = trainer.cfg.train_batch_size
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        for step in steps:
            _, log_prob = trainer.step_log_prob(samples, part, torch.full_like(part, step))
            (advantages[part] * log_prob).sum().backward()
    return torch.cat([p.grad.flatten().clone() for p in trainer.params])


def within_group_variance(values: np.ndarray, groups: np.ndarray) -> float:
    means = np.bincount(groups, weights=values) / np.bincount(groups)
    return float(np.mean((values - means[groups]) ** 2))


def measure(trainer: DDPOTrainer, epoch: int, group: int) -> dict[str, float]:
    samples = trainer.sample_epoch(epoch)
    rewards = samples.rewards.double().numpy()
    groups = samples.indices.numpy() // group
    figures = {"reward variance": float(rewards.var()),
               "share decided by the start": 1 - within_group_variance(rewards, groups) / rewards.var()}
    for name, values in samples.components.items():  # within groups: the only part a gradient can use
        values = values.double().numpy()
        present = ~np.isnan(values)
        figures[f"{name}: variance within groups"] = within_group_variance(values[present], groups[present])
    n, num_steps = samples.log_probs.shape
    window = trainer.cfg.train_steps
    advantages = {"batch": batch_advantages(rewards), "per start": group_advantages(rewards, groups)}
    for name, adv in advantages.items():
        adv = torch.tensor(adv, dtype=torch.float32)
        # Even against odd samples (every group has members in both), one gradient per half and step.
        halves = [[policy_gradient(trainer, samples, torch.arange(half, n, 2), adv, [step])
                   for step in range(num_steps)] for half in (0, 1)]

        def cosine(steps: list[int]) -> float:
            even, odd = (sum(halves[half][step] for step in steps) for half in (0, 1))
            return torch.nn.functional.cosine_similarity(even, odd, dim=0).item()

        figures[f"cosine, {name}, all steps"] = cosine(list(range(num_steps)))
        figures[f"cosine, {name}, window {window}"] = cosine(window)
        for step in range(num_steps):
            figures[f"cosine, {name}, step {step}"] = cosine([step])
            figures[f"gradient norm, {name}, step {step}"] = (halves[0][step] + halves[1][step]).norm().item()
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage-one", type=Path, required=True, help="output folder of `rlbooth personalize`")
    parser.add_argument("--config", default="toy")
    parser.add_argument("--group", type=int, default=8, help="trajectories per initial noise")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    config = load_config(args.config, ["runtime.report_to=none", "align.grid_every=0", *args.overrides,
                                       f"align.samples_per_noise={args.group}"])
    stage = read_stage(args.stage_one, "personalize")
    cfg = config.align
    print(f"{cfg.sample_batch_size * cfg.num_batches_per_epoch} samples of {cfg.num_steps} steps, groups of "
          f"{args.group}, rewards {cfg.reward}, LoRA on {cfg.lora_target_modules}")
    with tempfile.TemporaryDirectory() as tmp:
        accelerator = make_accelerator(config.runtime, Path(tmp), 1)
        context = {"device": str(accelerator.device), "dtype": "float32", "subject": stage.subject}
        with CompositeReward(cfg.reward, cfg.reward_options, executor_workers=1, context=context) as reward:
            trainer = DDPOTrainer(config, accelerator, stage,
                                  read_prompt_file(cfg.prompt_file or default_prompt_set(stage.subject)), reward,
                                  Path(tmp))
            runs = [measure(trainer, epoch, args.group) for epoch in range(args.repeats)]
    for key in runs[0]:
        values = np.array([run[key] for run in runs])
        print(f"{key:>40}: {values.mean():7.3f} +- {values.std():.3f}")


if __name__ == "__main__":
    main()
