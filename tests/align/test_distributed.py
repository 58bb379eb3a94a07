"""Two CPU processes under torchrun (gloo): global rewards, synchronized LoRA, the same result as one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
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


def run_two_processes(stage_one, output, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`rlbooth align` under torchrun with 2 processes; run a second time, on a fresh port and folder, if
    the first hangs (seen once in about fifteen runs, on the SD3 case, and not explained: a real deadlock
    hangs both runs and still fails the test) or a worker aborts in teardown (TEARDOWN_ABORT)."""
    def run() -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "rlbooth.cli", "align", "-c", "tiny", "--stage-one", str(stage_one),
                "-o", str(output)]
        for item in COMMON + ["align.sample_batch_size=2", "align.num_batches_per_epoch=1",
                              "align.train_batch_size=2", *extra]:
            args += ["--set", item]
        env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)

    try:
        result = run()
    except subprocess.TimeoutExpired:
        warnings.warn("torchrun hung for 240 s; running it once more")
        shutil.rmtree(output, ignore_errors=True)
        return run()
    if result.returncode != 0 and TEARDOWN_ABORT in result.stderr:
        warnings.warn("a torchrun worker aborted in C++ teardown; running it once more")
        shutil.rmtree(output, ignore_errors=True)
        return run()
    return result


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

    result = run_two_processes(any_stage_one, tmp_path / "two")
    assert result.returncode == 0, result.stderr[-3000:]

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
