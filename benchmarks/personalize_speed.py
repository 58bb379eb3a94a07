"""Stage-one throughput on a config (default: tiny): optimizer steps per second and peak memory.

    python benchmarks/personalize_speed.py [--config tiny] [--steps 20] [--set KEY=VALUE ...]

Figures are for comparing changes on the same machine; the training loop alone is timed
(model loading, class images and encoding are reported separately).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlbooth.config import load_config
from rlbooth.personalize import train
from rlbooth.subject import Subject

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    config = load_config(args.config, ["runtime.report_to=none", "personalize.validation_steps=0",
                                       f"personalize.max_train_steps={args.steps}",
                                       f"personalize.checkpointing_steps={args.steps}", *args.overrides])
    subject = Subject.from_yaml(REPO / "examples" / "tiny" / "subject.yaml")
    timings: dict[str, float] = {}
    run = train.TrainLoop.run

    def timed_run(self, start_step):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run(self, start_step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings["loop"] = time.perf_counter() - t0

    train.TrainLoop.run = timed_run
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train.personalize(config, subject, Path(out) / "run")
    total = time.perf_counter() - t0
    p = config.personalize
    print(f"config={args.config} mode={p.mode} resolution={p.resolution} batch={p.train_batch_size}"
          f"{'+prior' if p.with_prior_preservation else ''} accumulation={p.gradient_accumulation_steps}"
          f" precision={config.runtime.mixed_precision} device={'cuda' if torch.cuda.is_available() else 'cpu'}"
          f" threads={torch.get_num_threads()}")
    print(f"steps/s: {args.steps / timings['loop']:.2f}  (loop {timings['loop']:.1f} s, whole run {total:.1f} s)")
    if torch.cuda.is_available():
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak host memory (RSS): {peak_rss:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
