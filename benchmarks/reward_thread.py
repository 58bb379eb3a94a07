"""Does a live reward worker thread slow the main thread's torch ops? Median tiny-UNet forward time, per case.

    python benchmarks/reward_thread.py [--repeats 3]

Cases, each in a fresh process and alternated: no worker; a plain worker thread that ran a parallel matmul
(what stage two had before issue 20); CompositeReward's worker after scoring a batch the same way.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

CASES = ("none", "plain-worker", "composite-worker")


def tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=4, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32).eval()


def parallel_op(*_: object) -> torch.Tensor:
    """Large enough for torch to split it across its threads (and so give the calling thread a pool)."""
    a = torch.randn(256, 256)
    return (a @ a).mean(dim=0)[:4]


@torch.no_grad()
def forward_ms(unet: torch.nn.Module, calls: int) -> float:
    x, t, h = torch.randn(8, 4, 4, 4), torch.tensor(500), torch.randn(8, 77, 32)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        unet(x, t, h)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_case(case: str, calls: int) -> float:
    """Forward time on the main thread while the case's worker thread is alive and idle."""
    from rlbooth.rewards import CompositeReward, register

    unet = tiny_unet()
    forward_ms(unet, 5)
    if case == "plain-worker":
        worker = ThreadPoolExecutor(1)
        worker.submit(parallel_op).result()
    elif case == "composite-worker":
        register("bench_parallel_op")(lambda: lambda images, prompts, metadata: parallel_op())
        worker = CompositeReward({"bench_parallel_op": 1.0}, executor_workers=1)
        worker.submit(torch.rand(4, 3, 8, 8), ["a"] * 4, [{}] * 4).result()
    ms = forward_ms(unet, calls)
    if case != "none":
        (worker.shutdown if case == "plain-worker" else worker.close)()
    return ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per case")
    parser.add_argument("--calls", type=int, default=40, help="forwards timed per run")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args(argv)
    if args.case:
        print(f"{run_case(args.case, args.calls):.3f}")
        return
    results: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(args.repeats):
        for case in CASES:
            out = subprocess.run([sys.executable, __file__, "--case", case, "--calls", str(args.calls)],
                                 check=True, capture_output=True, text=True).stdout
            results[case].append(float(out.split()[-1]))
    print(f"torch threads {torch.get_num_threads()}; median UNet forward on the main thread (ms):")
    for case, values in results.items():
        print(f"  {case:17s} {statistics.median(values):7.1f}   runs: {', '.join(f'{v:.1f}' for v in values)}")


if __name__ == "__main__":
    main()
