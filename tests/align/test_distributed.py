"""Two CPU processes under torchrun (gloo): global rewards, synchronized LoRA, the same result as one process."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import threading
import warnings

import pytest
import torch
from safetensors.torch import load_file

from rlbooth.align.train import align
from tests.align.conftest import align_config

COMMON = ["runtime.report_to=none", "align.num_steps=4", "align.grid_every=0", "align.reward={brightness: 1.0}",
          "align.num_epochs=2", "align.learning_rate=1e-2",
          "align.stat_min_count=1", "align.checkpointing_epochs=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_worker(argv: list[str]) -> None:
    """One worker of `run_two_processes`, forked from the test's process: accelerate's state, which the test's own
    single-process run set up, is dropped, so the worker sets up its process group from torchrun's environment."""
    from accelerate.state import AcceleratorState

    from rlbooth.cli import main

    os.environ["HF_HUB_OFFLINE"] = "1"
    AcceleratorState._reset_state(reset_partial_state=True)
    if main(argv) != 0:
        raise SystemExit(f"rlbooth {argv[0]} failed")


def run_two_processes(stage_one, output, extra: tuple[str, ...] = ()) -> None:
    """`rlbooth align` as two torchrun workers (torch's elastic launcher, which `torchrun` runs, with the c10d
    rendezvous) forked from this process, so they start without importing torch again; fails with the workers'
    stderr. Run a second time, on a fresh port and folder, if the first hangs (seen once in about fifteen
    runs, on the SD3 case, and not explained: a real deadlock hangs both runs and still fails the test) or a
    worker aborts in teardown (TEARDOWN_ABORT)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    argv = ["align", "-c", "tiny", "--stage-one", str(stage_one), "-o", str(output)]
    for item in COMMON + ["align.sample_batch_size=2", "align.num_batches_per_epoch=1", "align.train_batch_size=2",
                          *extra]:
        argv += ["--set", item]

    def run(attempt: int) -> str | None:
        """None if both workers finished, else their stderr."""
        logs = output.parent / f"{output.name}-torchrun-{attempt}"
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=f"{output.name}-{attempt}",
                              rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                              start_method="fork", logs_specs=DefaultLogsSpecs(log_dir=str(logs), redirects=Std.ALL))
        watchdog = threading.Timer(240, lambda: [p.kill() for p in multiprocessing.active_children()])
        watchdog.start()
        try:
            elastic_launch(config, _torchrun_worker)(argv)
            return None
        except ChildFailedError as failure:
            stderr = "".join(f.read_text() for f in sorted(logs.rglob("stderr.log")))
            killed = " (killed after 240 s)" if not watchdog.is_alive() else ""
            return f"the torchrun workers failed{killed}; their stderr ends:\n{stderr[-2500:]}\n{failure}"
        finally:
            watchdog.cancel()

    failed = run(0)
    if failed is not None and ("killed after 240 s" in failed or TEARDOWN_ABORT in failed):
        warnings.warn(f"a torchrun worker hung or aborted in teardown; running it once more: {failed[-500:]}")
        shutil.rmtree(output, ignore_errors=True)
        failed = run(1)
    assert failed is None, failed


TEARDOWN_ABORT = "terminate called without an active exception"
"""A worker's std::terminate after its last epoch, seen once in a full-suite run on the SD3 case (2026-12-06,
the machine loaded by a second suite run), not reproduced in six runs alone; a real failure fails twice."""


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(any_stage_one, tmp_path):
    """One process draws and trains the same 4 samples per epoch in two batches of 2 (gradients accumulated
    over both), two processes one batch of 2 each (gradients averaged): the same forwards, shapes included,
    so only the gradient's summation order differs. (With one batch of 4 instead, the tiny SDXL UNet's
    floats differ from batches of 2 at ~1e-7, and Adam turns that into lr-sized steps on near-zero gradients.)"""
    single = align(align_config(*COMMON, "align.sample_batch_size=2", "align.num_batches_per_epoch=2",
                                "align.train_batch_size=2", "align.gradient_accumulation_steps=2"),
                   any_stage_one, tmp_path / "single")

    run_two_processes(any_stage_one, tmp_path / "two")

    meta = json.loads((tmp_path / "two" / "rlbooth.json").read_text())
    checksums = torch.tensor(meta["replica_checksums"])
    assert checksums.shape == (2, 2) and torch.equal(checksums[0], checksums[1]), "ranks ended with different LoRAs"
    single_history = json.loads((single.parent / "rlbooth.json").read_text())["history"]
    assert [h["reward_mean"] for h in meta["history"]] == \
        [h["reward_mean"] for h in single_history], "the two runs did not draw the same samples"

    a = load_file(str(single / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert any(v.abs().sum() > 0 for k, v in a.items() if ".up." in k), "nothing was trained"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
