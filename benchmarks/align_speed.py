"""Stage-two throughput: trajectories sampled per second, trained timesteps per second, peak memory.

    python benchmarks/align_speed.py [--config tiny] [--epochs 3] [--set KEY=VALUE ...]

A tiny stage-one model is trained first (or pass --stage-one DIR). The first epoch is a warm-up
and is not counted.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from rlbooth.accel import make_accelerator
from rlbooth.align.train import DDPOTrainer
from rlbooth.config import load_config
from rlbooth.personalize.train import personalize
from rlbooth.prompts import default_prompt_set, read_prompt_file
from rlbooth.rewards import CompositeReward
from rlbooth.stages import read_stage
from rlbooth.subject import Subject

REPO = Path(__file__).resolve().parent.parent


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--stage-one", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    config = load_config(args.config, ["runtime.report_to=none", "personalize.validation_steps=0",
                                       "personalize.max_train_steps=2", "align.grid_every=0", *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        stage_one = args.stage_one
        if stage_one is None:
            stage_one = Path(tmp) / "stage-one"
            personalize(config, Subject.from_yaml(REPO / "examples" / "tiny" / "subject.yaml"), stage_one)
        stage = read_stage(stage_one, "personalize")
        accelerator = make_accelerator(config.runtime, Path(tmp) / "align",
                                       config.align.gradient_accumulation_steps * config.align.num_train_timesteps)
        cfg = config.align
        with CompositeReward(cfg.reward, executor_workers=1) as reward:
            trainer = DDPOTrainer(config, accelerator, stage, read_prompt_file(default_prompt_set(stage.subject)),
                                  reward, Path(tmp) / "align")
            sample_s = train_s = 0.0
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            for epoch in range(args.epochs + 1):
                sync()
                t0 = time.perf_counter()
                samples = trainer.sample_epoch(epoch)
                sync()
                t1 = time.perf_counter()
                trainer.train_epoch(epoch, samples, trainer.advantages(epoch, samples))
                sync()
                if epoch > 0:
                    sample_s += t1 - t0
                    train_s += time.perf_counter() - t1
    n = cfg.sample_batch_size * cfg.num_batches_per_epoch * args.epochs
    print(f"config={args.config} steps={cfg.num_steps} trained_steps={cfg.num_train_timesteps} "
          f"sample_batch={cfg.sample_batch_size} train_batch={cfg.train_batch_size} "
          f"precision={config.runtime.mixed_precision} device={accelerator.device} threads={torch.get_num_threads()}")
    print(f"trajectories/s (sampling + decode + reward): {n / sample_s:.2f}")
    print(f"trained timesteps/s (sample-steps): {n * cfg.num_train_timesteps * cfg.num_inner_epochs / train_s:.2f}")
    if torch.cuda.is_available():
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"peak host memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
