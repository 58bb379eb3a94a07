"""Stage-two speed: epoch time with torch's default threads and with OMP_NUM_THREADS=1, alternating runs.

    python benchmarks/align_speed.py [--config tiny] [--epochs 3] [--repeats 3] [--set KEY=VALUE ...]

A tiny stage-one model is trained first (or pass --stage-one DIR). Each run is a fresh process that
times `--epochs` epochs after one warm-up epoch (sampling + decode + reward, then training); runs
alternate between the two thread settings and the medians are printed, with trajectories/s, trained
timesteps/s and peak memory; with `--flops`, model FLOPs per trajectory and the FLOP/s achieved, and with
`--peak-tflops` (the device's peak at the run's precision) MFU. Issue 20's check: with more threads an
epoch must not take longer (before the fix, the reward worker thread made 2 threads 2.3x slower than 1
on a 2-core machine).
`--single` times one run in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlbooth.accel import make_accelerator
from rlbooth.align.train import DDPOTrainer, reward_workers
from rlbooth.config import load_config
from rlbooth.personalize.train import personalize
from rlbooth.prompts import default_prompt_set, read_prompt_file
from rlbooth.rewards import CompositeReward
from rlbooth.stages import read_stage
from rlbooth.subject import Subject

REPO = Path(__file__).resolve().parent.parent
FIXED = ["runtime.report_to=none", "personalize.validation_steps=0", "personalize.max_train_steps=2",
         "align.grid_every=0"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def epoch_flops(trainer: DDPOTrainer, epoch: int) -> int:
    """Model FLOPs of one epoch (denoiser and VAE, sampling and training, forward and backward), counted by
    torch's FlopCounterMode with attention on the math kernel, whose matmuls it counts on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        samples = trainer.sample_epoch(epoch)
        trainer.train_epoch(epoch, samples, trainer.advantages(epoch, samples))
    return counter.get_total_flops()


def time_run(config, stage_one: Path, epochs: int, work: Path, count_flops: bool = False) -> dict[str, float]:
    """Seconds of sampling and of training over `epochs` epochs after a warm-up, in this process; with
    `count_flops`, then the model FLOPs of one more epoch (after the memory peaks are read: its math
    attention kernel holds whole attention matrices)."""
    stage = read_stage(stage_one, "personalize")
    cfg = config.align
    accelerator = make_accelerator(config.runtime, work, cfg.passes_per_optimizer_step)
    with CompositeReward(cfg.reward, executor_workers=reward_workers(cfg, accelerator.device)) as reward:
        trainer = DDPOTrainer(config, accelerator, stage, read_prompt_file(default_prompt_set(stage.subject)),
                              reward, work)
        sample_s = train_s = 0.0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for epoch in range(epochs + 1):
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
        n = cfg.sample_batch_size * cfg.num_batches_per_epoch * epochs
        figures = {
            "threads": torch.get_num_threads(), "epoch_s": (sample_s + train_s) / epochs,
            "trajectories_per_s": n / sample_s,
            "trained_timesteps_per_s": n * cfg.num_train_timesteps * cfg.num_inner_epochs / train_s,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if count_flops:
            flops = epoch_flops(trainer, epochs + 1)
            figures["tflop_per_trajectory"] = flops * epochs / n / 1e12
            figures["achieved_tflops"] = flops / figures["epoch_s"] / 1e12
    return figures


def child_run(args: argparse.Namespace, stage_one: Path, single_thread: bool) -> dict[str, float]:
    """One timed run in a fresh process, so each thread setting starts from a clean OpenMP state."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if single_thread:
        env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, __file__, "--single", "--config", args.config, "--epochs", str(args.epochs),
               "--stage-one", str(stage_one), *(f"--set={item}" for item in args.overrides)]
    if getattr(args, "flops", False):
        command.append("--flops")
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run, after one warm-up epoch")
    parser.add_argument("--repeats", type=int, default=3, help="runs per thread setting, alternating")
    parser.add_argument("--stage-one", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--single", action="store_true", help="one run in this process; prints its figures as JSON")
    parser.add_argument("--flops", action="store_true", help="count model FLOPs in one more, untimed epoch")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak dense TFLOP/s at the run's precision, to print MFU (implies --flops)")
    args = parser.parse_args(argv)
    args.flops = args.flops or args.peak_tflops is not None
    config = load_config(args.config, [*FIXED, *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        stage_one = args.stage_one
        if stage_one is None:
            stage_one = Path(tmp) / "stage-one"
            personalize(config, Subject.from_yaml(REPO / "examples" / "tiny" / "subject.yaml"), stage_one)
        if args.single:
            print(json.dumps(time_run(config, stage_one, args.epochs, Path(tmp) / "align", count_flops=args.flops)))
            return
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(args.repeats):
            for single_thread in (False, True):
                runs[single_thread].append(child_run(args, stage_one, single_thread))
    cfg = config.align
    print(f"config={args.config} steps={cfg.num_steps} trained_steps={cfg.num_train_timesteps} "
          f"sample_batch={cfg.sample_batch_size} x {cfg.num_batches_per_epoch} train_batch={cfg.train_batch_size} "
          f"precision={config.runtime.mixed_precision}; medians of {args.repeats} alternating runs")
    median = {key: {one: statistics.median(r[key] for r in runs[one]) for one in runs} for key in runs[True][0]}
    for one in (False, True):
        label = "OMP_NUM_THREADS=1" if one else f"default ({int(median['threads'][one])} threads)"
        each = ", ".join(f"{r['epoch_s']:.3f}" for r in runs[one])
        print(f"  {label:22s} epoch {median['epoch_s'][one]:.3f} s  (runs: {each}); trajectories/s "
              f"{median['trajectories_per_s'][one]:.2f}, trained timesteps/s "
              f"{median['trained_timesteps_per_s'][one]:.2f}, peak RSS {median['peak_rss_mib'][one]:.0f} MiB"
              + (f", peak CUDA {median['peak_cuda_mib'][one]:.0f} MiB" if torch.cuda.is_available() else ""))
    if "achieved_tflops" in median:
        achieved = median["achieved_tflops"][False]
        print(f"model FLOPs: {median['tflop_per_trajectory'][False] * 1e3:.3f} GFLOP per trajectory (sampling and "
              f"training), {achieved * 1e3:.2f} GFLOP/s achieved with the default threads"
              + (f"; MFU {achieved / args.peak_tflops:.1%} of {args.peak_tflops} TFLOP/s" if args.peak_tflops else
                 "; pass --peak-tflops for MFU"))
    ratio = median["epoch_s"][False] / median["epoch_s"][True]
    verdict = "ok" if ratio <= 1.05 else "SLOWER with more threads (an idle machine is needed to judge)"
    print(f"default / 1 thread epoch time: {ratio:.2f}x: {verdict}")


if __name__ == "__main__":
    main()
