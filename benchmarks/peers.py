"""Peer benchmark (issue 20): rlbooth against TRL 0.23.1's DDPOTrainer and diffusers' train_dreambooth_lora.py.

    python benchmarks/peers.py --peer-python /work/peers-venv/bin/python \\
        --diffusers-script /work/peers-venv/train_dreambooth_lora.py [--repeats 3] [--epochs 3] [--steps 50]

Why: speed claims need a peer on the same machine, model and work. Both sides load one tiny SD folder
(rlbooth's `model.pretrained: tiny`, copied with the files transformers 4 reads) and do the same work.
Stage two: `--epochs` epochs after a warm-up epoch, each 2 batches x 4 samples of 10 DDIM steps with
guidance, every timestep trained, LoRA rank 4 on to_q/to_k/to_v/to_out.0, brightness reward (mean pixel);
rlbooth's side is benchmarks/align_speed.py's timed run. Stage one: `--steps` LoRA steps with prior
preservation at the config's resolution, batch and rank, timed from the loop's start to the end of the
checkpoint written at the last step (benchmarks/personalize_speed.py; the peer gets --checkpointing_steps
so it writes one too); each program runs once untimed first, so that class images exist. Runs alternate
(rlbooth, peer, rlbooth, peer, ...), each a fresh process, with torch's default threads and with
OMP_NUM_THREADS=1; medians of `--repeats` runs are printed as a markdown table for README.

The peers live in their own environment (TRL 0.23.1 wants transformers 4; rlbooth runs on 5), made once:

    python -m venv /work/peers-venv
    /work/peers-venv/bin/pip install "torch==2.13.0" "trl==0.23.1" "transformers==4.57.6" \\
        "diffusers==0.39.0" "peft==0.21.2" "accelerate==1.16.0"
    curl -fL -o /work/peers-venv/train_dreambooth_lora.py \\
        https://raw.githubusercontent.com/huggingface/diffusers/v0.39.0/examples/dreambooth/train_dreambooth_lora.py

The script must match the installed diffusers (it calls check_min_version). torchvision is left out: the
PyPI wheels are built against CUDA torch and fail to import beside the CPU one ("operator torchvision::nms
does not exist"), which also breaks transformers. Without torchvision the driver gives the script a
stand-in for the four transforms it uses (Resize, CenterCrop, ToTensor, Normalize, on PIL and torch) and
says so; a working torchvision (a CPU build, or the PyPI one with CUDA torch) is used instead when present.
Without --peer-python, or when the peers do not import, only rlbooth's side runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import align_speed  # noqa: E402  (benchmarks/ is no package)

from rlbooth.config import Config, load_config  # noqa: E402
from rlbooth.models import resolve_family, tiny_pipeline_folder  # noqa: E402
from rlbooth.personalize.train import personalize  # noqa: E402
from rlbooth.prompts import default_prompt_set, read_prompt_file  # noqa: E402
from rlbooth.subject import Subject  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SUBJECT = REPO / "examples" / "tiny" / "subject.yaml"
WORK = ["align.num_steps=10", "align.sample_batch_size=4", "align.num_batches_per_epoch=2",
        "align.train_batch_size=4", "align.timestep_fraction=1.0", "align.timestep_window=[0.0, 1.0]",
        "align.num_inner_epochs=1", "align.gradient_accumulation_steps=1", "align.lora_rank=4",
        "align.lora_alpha=null", "align.lora_target_modules=[to_k, to_q, to_v, to_out.0]",
        "align.reward={brightness: 1.0}", "align.kl_coef=0.0", "personalize.mode=lora",
        "personalize.with_prior_preservation=true"]
"""Issue 20's work, the same on both sides; `--set` comes after and may change it (TRL's LoRA stays rank 4)."""

PROBE = """
import json
out = {}
for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "trl"):
    try:
        out[name] = __import__(name).__version__
    except Exception as err:
        out[name] = "import failed: " + type(err).__name__ + ": " + str(err).splitlines()[0][:200]
try:
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline  # noqa: F401
except Exception as err:
    out["ddpo"] = "import failed: " + type(err).__name__ + ": " + str(err).splitlines()[0][:200]
print(json.dumps(out))
"""

TRL_DRIVER = """
import json, random, resource, sys, tempfile, time
import torch
from accelerate import PartialState
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

spec = json.loads(sys.argv[1])
rng = random.Random(0)

def reward(images, prompts, metadata):
    return images.float().mean(dim=(1, 2, 3)), {}

def prompt():
    return rng.choice(spec["prompts"]), {}

with tempfile.TemporaryDirectory() as tmp:
    config = DDPOConfig(**spec["config"], project_kwargs={"project_dir": tmp, "logging_dir": tmp})
    PartialState()  # TRL's pipeline logs through accelerate before any Accelerator exists
    trainer = DDPOTrainer(config, reward, prompt, DefaultDDPOStableDiffusionPipeline(spec["model"], use_lora=True))
    step, times = 0, []
    for epoch in range(spec["epochs"] + 1):
        t0 = time.perf_counter()
        step = trainer.step(epoch, step)
        times.append(time.perf_counter() - t0)
print(json.dumps({"threads": torch.get_num_threads(), "value": sum(times[1:]) / spec["epochs"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
"""Times TRL's epoch (`DDPOTrainer.step`: sampling, reward, advantages, training) after a warm-up epoch."""

DREAMBOOTH_DRIVER = """
import enum, importlib.machinery, json, resource, runpy, sys, time, types
import diffusers, transformers  # noqa: F401  (their optional-package checks run before any stand-in exists)
import accelerate, numpy as np, torch, tqdm.auto
from PIL import Image

spec = json.loads(sys.argv[1])
try:
    import torchvision.transforms  # noqa: F401
    standin = False
except ImportError:
    standin = True
    modes = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
    Mode = enum.Enum("InterpolationMode", {m.upper(): m for m in modes})

    class Compose:
        def __init__(self, steps): self.steps = steps
        def __call__(self, x):
            for step in self.steps:
                x = step(x)
            return x

    class Resize:
        def __init__(self, size, interpolation=Mode.BILINEAR): self.size, self.mode = size, interpolation
        def __call__(self, im):
            w, h = im.size
            size = (self.size, int(self.size * h / w)) if w <= h else (int(self.size * w / h), self.size)
            return im.resize(size, getattr(Image.Resampling, self.mode.name))

    class CenterCrop:
        def __init__(self, size): self.size = size
        def __call__(self, im):
            left, top = round((im.size[0] - self.size) / 2), round((im.size[1] - self.size) / 2)
            return im.crop((left, top, left + self.size, top + self.size))

    class ToTensor:
        def __call__(self, im):
            return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1).contiguous()

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
        def __call__(self, x): return (x - self.mean) / self.std

    tv, tf = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)  # find_spec() needs one
    tf.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
    tf.InterpolationMode, tf.Compose, tf.Resize, tf.CenterCrop, tf.ToTensor, tf.Normalize = (
        Mode, Compose, Resize, CenterCrop, ToTensor, Normalize)
    tv.transforms = tf
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tf})

marks = {}

class Bar(tqdm.auto.tqdm):
    def __init__(self, *args, **kwargs):
        if kwargs.get("desc") == "Steps":  # the script's training loop starts right after its Steps bar
            marks["start"] = time.perf_counter()
        super().__init__(*args, **kwargs)

tqdm.auto.tqdm = Bar
save_state = accelerate.Accelerator.save_state

def timed_save_state(self, *args, **kwargs):
    out = save_state(self, *args, **kwargs)
    marks["end"] = time.perf_counter()
    return out

accelerate.Accelerator.save_state = timed_save_state
sys.argv = [spec["script"], *spec["args"]]
runpy.run_path(spec["script"], run_name="__main__")
print(json.dumps({"threads": torch.get_num_threads(), "value": spec["steps"] / (marks["end"] - marks["start"]),
                  "torchvision_standin": standin,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
"""Runs diffusers' script unchanged and times its loop: from its Steps bar to the end of the last checkpoint."""

Run = dict[str, Any]


def shared_folder(config: Config, work: Path) -> Path:
    """The tiny SD pipeline as a folder both sides load: rlbooth's, plus what transformers 4 needs.

    transformers 5 writes only tokenizer.json and text-encoder keys without the `text_model.` prefix;
    transformers 4's slow CLIPTokenizer wants vocab.json and merges.txt (the tiny one has no merges) and its
    CLIPTextModel would silently re-initialize unprefixed weights. Both read the rewritten folder the same.
    """
    from safetensors.torch import load_file, save_file

    if config.model.pretrained != "tiny":
        return Path(config.model.pretrained)  # a real local pipeline folder: both sides load it as it is
    folder = work / "tiny-sd"
    shutil.copytree(tiny_pipeline_folder(config.model.tiny, resolve_family(config.model)), folder)
    tokenizer = folder / "tokenizer"
    vocab = json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
    (tokenizer / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer / "merges.txt").write_text("#version: 0.2\n")
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, weights,
              metadata={"format": "pt"})
    return folder


def probe(peer_python: Path) -> dict[str, str]:
    """The peer environment's package versions, or why an import failed."""
    try:
        done = subprocess.run([str(peer_python), "-c", PROBE], env=peer_env(False), capture_output=True, text=True,
                              timeout=600)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as err:
        return {"python": f"failed: {type(err).__name__}: {err}"}


def peer_env(single_thread: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONPATH")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return env | ({"OMP_NUM_THREADS": "1"} if single_thread else {})


def timed(command: list[str], env: dict[str, str], cwd: Path, parse: Callable[[str], Run]) -> Run:
    """One fresh process; its figures plus the whole process's wall time."""
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{Path(command[1]).name if command[1] != '-c' else 'peer driver'} failed "
                           f"(exit {done.returncode}):\n" + "\n".join((done.stderr or done.stdout).splitlines()[-25:]))
    return parse(done.stdout) | {"process_s": wall}


def last_json(stdout: str) -> Run:
    return json.loads(stdout.strip().splitlines()[-1])


def personalize_speed_figures(stdout: str) -> Run:
    """Reads benchmarks/personalize_speed.py's printout."""
    return {"threads": int(re.search(r"threads=(\d+)", stdout)[1]),
            "value": float(re.search(r"steps/s: ([\d.]+)", stdout)[1]),
            "peak_rss_mib": float(re.search(r"RSS\): ([\d.]+) MiB", stdout)[1])}


def rlbooth_align(args: argparse.Namespace, overrides: list[str], stage_one: Path, single: bool) -> Run:
    t0 = time.perf_counter()
    try:
        out = align_speed.child_run(SimpleNamespace(config=args.config, epochs=args.epochs, overrides=overrides),
                                    stage_one, single)
    except subprocess.CalledProcessError as err:
        raise RuntimeError("align_speed.py failed:\n" + "\n".join(err.stderr.splitlines()[-25:])) from err
    return out | {"value": out["epoch_s"], "process_s": time.perf_counter() - t0}


def trl_spec(config: Config, folder: Path, epochs: int, subject: Subject) -> dict[str, Any]:
    a = config.align
    prompts = [subject.prompt(t) for t in read_prompt_file(a.prompt_file or default_prompt_set(subject))]
    return {"model": str(folder), "epochs": epochs, "prompts": prompts, "config": {
        "sample_num_steps": a.num_steps, "sample_eta": a.eta, "sample_guidance_scale": a.guidance_scale,
        "sample_batch_size": a.sample_batch_size, "sample_num_batches_per_epoch": a.num_batches_per_epoch,
        "train_batch_size": a.train_batch_size, "train_gradient_accumulation_steps": a.gradient_accumulation_steps,
        "train_num_inner_epochs": a.num_inner_epochs, "train_timestep_fraction": a.timestep_fraction,
        "train_learning_rate": a.learning_rate, "train_adam_weight_decay": a.adam_weight_decay,
        "train_max_grad_norm": a.max_grad_norm, "train_clip_range": a.clip_range, "train_adv_clip_max": a.adv_clip_max,
        "per_prompt_stat_tracking": a.per_prompt_stat_tracking,
        "per_prompt_stat_tracking_buffer_size": a.stat_buffer_size,
        "per_prompt_stat_tracking_min_count": a.stat_min_count, "train_cfg": a.guidance_scale > 1.0,
        "mixed_precision": config.runtime.mixed_precision, "log_with": None, "save_freq": 10**9,
        "async_reward_computation": False}}


def dreambooth_args(config: Config, folder: Path, subject: Subject, steps: int, work: Path) -> list[str]:
    """The script's flags for the work rlbooth's stage one does with `config`."""
    p = config.personalize
    return [f"--pretrained_model_name_or_path={folder}", f"--instance_data_dir={subject.images}",
            f"--instance_prompt={subject.prompt(p.instance_prompt)}", "--with_prior_preservation",
            f"--prior_loss_weight={p.prior_loss_weight}", f"--class_data_dir={work / 'peer-class-images'}",
            f"--class_prompt={subject.prompt(p.class_prompt)}", f"--num_class_images={p.num_class_images}",
            f"--sample_batch_size={p.class_batch_size}", f"--resolution={p.resolution}",
            *(["--center_crop"] if p.center_crop else []), f"--train_batch_size={p.train_batch_size}",
            f"--gradient_accumulation_steps={p.gradient_accumulation_steps}", f"--max_train_steps={steps}",
            f"--checkpointing_steps={steps}", f"--learning_rate={p.learning_rate}",
            f"--lr_scheduler={p.lr_scheduler}", f"--lr_warmup_steps={p.lr_warmup_steps}",
            f"--adam_weight_decay={p.adam_weight_decay}", f"--max_grad_norm={p.max_grad_norm}",
            f"--rank={p.lora_rank}", "--seed=0", f"--mixed_precision={config.runtime.mixed_precision}",
            f"--output_dir={work / 'peer-run'}", "--report_to=all"]  # "all" = none here: no tracker installed


def medians(runs: list[Run]) -> Run:
    return {k: statistics.median(r[k] for r in runs) for k in ("value", "process_s", "peak_rss_mib", "threads")}


def table(results: dict[tuple[str, bool], dict[str, list[Run]]], peer_names: dict[str, str], repeats: int) -> str:
    units = {"align": ("stage two, s per epoch (lower is better)", 3),
             "personalize": ("stage one, steps/s (higher is better)", 2)}
    lines = ["| work | threads | rlbooth | peer | rlbooth / peer | process s (rlbooth / peer) | "
             "peak RSS MiB (rlbooth / peer) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for (stage, single), runs in results.items():
        label, digits = units[stage]
        mine = medians(runs["rlbooth"])
        peer = medians(runs["peer"]) if runs["peer"] else None
        threads = "1 (OMP_NUM_THREADS=1)" if single else f"{int(mine['threads'])} (torch default)"
        if peer is None:
            lines.append(f"| {label} | {threads} | {mine['value']:.{digits}f} | not run | | "
                         f"{mine['process_s']:.1f} / | {mine['peak_rss_mib']:.0f} / |")
            continue
        lines.append(f"| {label} | {threads} | {mine['value']:.{digits}f} | {peer['value']:.{digits}f} "
                     f"({peer_names[stage]}) | {mine['value'] / peer['value']:.2f}x | "
                     f"{mine['process_s']:.1f} / {peer['process_s']:.1f} | "
                     f"{mine['peak_rss_mib']:.0f} / {peer['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + f"\n\nMedians of {repeats} alternating runs, each a fresh process."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", type=Path, default=None, help="python of the peers' environment")
    parser.add_argument("--diffusers-script", type=Path, default=None,
                        help="diffusers' examples/dreambooth/train_dreambooth_lora.py, of the installed version")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--repeats", type=int, default=3, help="runs per program and thread setting, alternating")
    parser.add_argument("--epochs", type=int, default=3, help="stage two: timed epochs per run, after a warm-up one")
    parser.add_argument("--steps", type=int, default=50, help="stage one: optimizer steps per run")
    parser.add_argument("--stages", nargs="+", choices=["align", "personalize"], default=["align", "personalize"])
    parser.add_argument("--threads", nargs="+", choices=["default", "1"], default=["default", "1"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    peers = {"align": "", "personalize": ""}
    if args.peer_python is None:
        print("No --peer-python: running rlbooth's side only (the module docstring says how to make the peers' venv).")
    else:
        versions = probe(args.peer_python)
        print(f"peer environment {args.peer_python}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        if "ddpo" in versions or any("failed" in versions.get(k, "failed") for k in ("torch", "trl")):
            print("TRL's DDPOTrainer does not import there: stage two runs rlbooth's side only.")
        else:
            peers["align"] = f"TRL {versions['trl']} DDPOTrainer"
            if versions["trl"] != "0.23.1":
                print(f"note: issue 20 compares against TRL 0.23.1, this is {versions['trl']}")
        if any("failed" in versions.get(k, "failed") for k in ("torch", "diffusers", "peft", "accelerate")):
            print("diffusers does not import there: stage one runs rlbooth's side only.")
        elif args.diffusers_script is None or not args.diffusers_script.is_file():
            print(f"No diffusers script at {args.diffusers_script}: stage one runs rlbooth's side only "
                  "(--diffusers-script; the docstring says where to get it).")
        else:
            peers["personalize"] = f"diffusers {versions['diffusers']} train_dreambooth_lora.py"

    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        work = Path(tmp)
        os.environ["RLBOOTH_CACHE"] = str(work / "cache")  # class images and the tiny model, this run's own
        config = load_config(args.config, [*WORK, *args.overrides])
        folder = shared_folder(config, work)
        overrides = [*WORK, f"model.pretrained={folder}", *args.overrides]
        config = load_config(args.config, overrides)
        subject = Subject.from_yaml(SUBJECT)
        a = config.align
        if peers["align"] and (a.lora_rank != 4 or sorted(a.lora_target_modules) != sorted(
                ["to_k", "to_q", "to_v", "to_out.0"]) or a.lora_alpha not in (None, 4)):
            print("note: TRL's LoRA is always rank 4, alpha 4 on to_k/to_q/to_v/to_out.0; rlbooth's differs here")
        print(f"work: {folder.name}, stage two {a.num_steps} DDIM steps, {a.num_batches_per_epoch} x "
              f"{a.sample_batch_size} samples, guidance {a.guidance_scale}, trained timesteps "
              f"{a.num_train_timesteps}, train batch {a.train_batch_size}, reward {a.reward}, LoRA rank {a.lora_rank}; "
              f"stage one {config.personalize.mode} rank {config.personalize.lora_rank}, resolution "
              f"{config.personalize.resolution}, batch {config.personalize.train_batch_size}+prior, {args.steps} steps")

        stage_one = work / "stage-one"

        def run(stage: str, program: str, single: bool, steps: int = args.steps) -> Run:
            """One fresh process of `program` ("rlbooth" or "peer") on `stage`'s work."""
            if program == "peer":
                spec = (trl_spec(config, folder, args.epochs, subject) if stage == "align" else
                        {"script": str(args.diffusers_script.resolve()), "steps": steps,
                         "args": dreambooth_args(config, folder, subject, steps, work)})
                driver = TRL_DRIVER if stage == "align" else DREAMBOOTH_DRIVER
                out = timed([str(args.peer_python), "-c", driver, json.dumps(spec)], peer_env(single), work, last_json)
                shutil.rmtree(work / "peer-run", ignore_errors=True)
                return out
            if stage == "align":
                return rlbooth_align(args, overrides, stage_one, single)
            command = [sys.executable, str(REPO / "benchmarks" / "personalize_speed.py"), "--config", args.config,
                       "--steps", str(steps), *(f"--set={item}" for item in overrides)]
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | (
                {"OMP_NUM_THREADS": "1"} if single else {})
            return timed(command, env, work, personalize_speed_figures)

        results: dict[tuple[str, bool], dict[str, list[Run]]] = {}
        settings = [s == "1" for s in args.threads]
        try:
            for stage in args.stages:
                programs = ["rlbooth", "peer"] if peers[stage] else ["rlbooth"]
                if stage == "align":
                    print("training a short stage one for stage two ...", flush=True)
                    personalize(load_config(args.config, [*align_speed.FIXED, *overrides]), subject, stage_one)
                else:
                    print("untimed first runs (class images, file cache) ...", flush=True)
                    for program in programs:
                        run(stage, program, True, steps=1)
                for single in settings:
                    results[(stage, single)] = {"rlbooth": [], "peer": []}
                for repeat in range(args.repeats):
                    for single in settings:
                        for program in programs:
                            out = run(stage, program, single)
                            results[(stage, single)][program].append(out)
                            print(f"  {stage} {program:7s} {'1 thread' if single else 'default':8s} run {repeat + 1}: "
                                  f"{out['value']:.3f}, process {out['process_s']:.1f} s, peak RSS "
                                  f"{out['peak_rss_mib']:.0f} MiB"
                                  + (" (torchvision stand-in)" if out.get("torchvision_standin") else ""), flush=True)
        except RuntimeError as err:
            print(f"\nstopped: {err}")
            results = {k: v for k, v in results.items() if v["rlbooth"]}
            if not results:
                raise SystemExit(1) from err
    print()
    print(table(results, peers, args.repeats))


if __name__ == "__main__":
    main()
