"""How much of stage two's update does the last, near-deterministic step of a flow trajectory carry?

    python benchmarks/last_step.py --stage-one runs/tiny-sd3/personalize --config tiny-sd3 [--set align.num_steps=10]

Samples one epoch, then prints per step: sigma, the step's std, its share of the PPO loss's gradient norm
(of the sum over steps of each step's norm, at the sampling weights, with the run's advantages), and its
share of |PPO loss| and its clip fraction after training on the samples (align.num_inner_epochs passes; in
the first the ratios are 1). DDPO's random selection (align.train_step_selection: random) trains the last step whenever
it is drawn; Flow-GRPO's (`first`, fraction 0.99 at 10 steps) never does.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from rlbooth.accel import make_accelerator
from rlbooth.align.ppo import ppo_clip_loss
from rlbooth.align.train import DDPOTrainer
from rlbooth.config import load_config
from rlbooth.prompts import default_prompt_set, read_prompt_file
from rlbooth.rewards import CompositeReward
from rlbooth.stages import read_stage


def per_step(trainer: DDPOTrainer, samples, advantages: torch.Tensor, grad: bool) -> list[dict[str, float]]:
    rows, figures = torch.arange(len(samples.indices)), []
    for step in range(samples.log_probs.shape[1]):
        for p in trainer.params:
            p.grad = None
        steps = torch.full_like(rows, step)
        with torch.set_grad_enabled(grad):
            _, log_prob = trainer.step_log_prob(samples, rows, steps)
            loss, info = ppo_clip_loss(log_prob, samples.log_probs[:, step], advantages, trainer.cfg.clip_range)
        norm = 0.0
        if grad:
            loss.backward()
            norm = torch.cat([p.grad.flatten() for p in trainer.params]).norm().item()
        figures.append({"grad": norm, "loss": abs(loss.item()), "clipfrac": info["clipfrac"].item()})
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage-one", type=Path, required=True, help="output folder of `rlbooth personalize`")
    parser.add_argument("--config", default="tiny-sd3")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    config = load_config(args.config, ["runtime.report_to=none", "align.grid_every=0", *args.overrides])
    stage, cfg = read_stage(args.stage_one, "personalize"), config.align
    with tempfile.TemporaryDirectory() as tmp:
        accelerator = make_accelerator(config.runtime, Path(tmp), config.align.passes_per_optimizer_step)
        context = {"device": str(accelerator.device), "dtype": "float32", "subject": stage.subject}
        with CompositeReward(cfg.reward, cfg.reward_options, context=context) as reward:
            trainer = DDPOTrainer(config, accelerator, stage,
                                  read_prompt_file(cfg.prompt_file or default_prompt_set(stage.subject)), reward,
                                  Path(tmp))
            samples = trainer.sample_epoch(0)
            advantages = trainer.advantages(0, samples)
            before = per_step(trainer, samples, advantages, grad=True)
            trainer.train_epoch(0, samples, advantages)
            after = per_step(trainer, samples, advantages, grad=False)
    sigmas = trainer.policy.sigmas
    stds = [trainer.policy.mean_std(torch.zeros(1, 1), torch.tensor(i), torch.zeros(1, 1))[1].item()
            for i in range(len(before))] if trainer.family.flow_matching else [float("nan")] * len(before)
    total_grad, total_loss = sum(f["grad"] for f in before), sum(f["loss"] for f in after)
    print(f"{len(samples.indices)} samples of {cfg.num_steps} steps, clip_range {cfg.clip_range}, "
          f"lr {cfg.learning_rate}, {cfg.num_inner_epochs} training pass(es) of {cfg.train_step_selection} steps "
          f"(fraction {cfg.timestep_fraction})")
    print(f"{'step':>4} {'sigma':>7} {'std':>7} {'grad share':>10} {'|loss| share':>12} {'clipfrac':>8}")
    for i, (b, a) in enumerate(zip(before, after)):
        print(f"{i:>4} {float(sigmas[i]):7.4f} {stds[i]:7.4f} {b['grad'] / total_grad:10.3f} "
              f"{a['loss'] / total_loss:12.3f} {a['clipfrac']:8.3f}")


if __name__ == "__main__":
    main()
