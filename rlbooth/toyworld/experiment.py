"""The toy world's experiment: does stage two make the personalized model follow prompts it ignored?

`python -m rlbooth.toyworld.experiment --out runs/toyworld-experiment` runs stage one on the toy
subject, then stage two once per arm (InstructBooth's mixed prompts, and prompts that all name the
subject) and training seed, and scores the base model, stage one and every run with the same seeds on
three prompt sets: held-out prompts (stage two's scenes in wordings it never trained on), unseen scenes
(ones that neither the photos nor stage two's prompts show) and stage two's own prompts, drawn from
noise it never trained on (`--prompt-sets` scores fewer). It prints the tables, each run's gain over
stage one and training-reward curve, and writes them to `results.json` and `results.md`. Finished stages
are reused, so a rerun only rescores (minutes). `--arm-set ARM KEY=VALUE` overrides a setting for one arm.

`--curves` also scores the held-out prompts after every stage-two epoch (stage two's own evaluation,
`align.eval_every=1`, with the final scoring's steps and guidance on the first `--curve-seeds` seeds) and
records stage two's wall and CPU time per epoch without those evaluations: held-out alignment against CPU
minutes of training (with one thread, the wall time on an idle machine), and how long each run takes to reach
the first arm's final held-out gain (`curves.png`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rlbooth.config import Config, apply_overrides, from_dict, load_config
from rlbooth.prompts import read_prompt_file
from rlbooth.files import write_text_atomic
from rlbooth.images import save_image_atomic
from rlbooth.stages import is_finished, load_stage_pipeline, read_stage
from rlbooth.subject import Subject
from rlbooth.rewards import RewardFn, build_reward
from rlbooth.toyworld.rewards import scene_accuracy

logger = logging.getLogger(__name__)

EXAMPLE_SUBJECT = Path(__file__).resolve().parent.parent.parent / "examples" / "toyworld" / "subject.yaml"
ARMS: dict[str, list[str]] = {
    "identifier-only": ["align.identifier_ratio=1.0"],
    "mixed": ["align.identifier_ratio=0.5"],
    "kl": ["align.kl_coef=0.1"],
    "no-group": ["align.samples_per_noise=1"],
    "all-steps": ["align.timestep_window=[0.0,1.0]"],
    # DiffusionNFT: its deterministic sampler would give a group sharing x_T one image, so no groups; it
    # trains every sampling step, as the reference does.
    "nft": ["align.algorithm=nft", "align.samples_per_noise=1", "align.timestep_window=[0.0,1.0]"],
    # DiffusionNFT sampling and training with CFG at the preset's guidance, where the toy model draws the subject.
    "nft-cfg": ["align.algorithm=nft", "align.samples_per_noise=1", "align.timestep_window=[0.0,1.0]",
                "align.nft_guidance_scale=4.0"],
    # Reward feedback learning: its deterministic sampler would also give a group one image; the gradient
    # step is drawn from the last two of the five steps (the reference: the last quarter of 40).
    "refl": ["align.algorithm=refl", "align.samples_per_noise=1", "align.refl_window=[1,2]"],
}
"""Stage-two variants by name: config overrides applied over the experiment's config."""


@dataclass
class ModelScores:
    alignment: float
    """Mean toy_alignment reward (1 = the asked scene exactly)."""
    scene_accuracy: float
    """Share of images whose background is nearest to the asked scene."""
    identity: float
    """Mean toy_identity reward (1 = the subject's colours in the photos' proportions)."""


PROMPT_SETS = {"heldout": "held-out", "unseen": "unseen scenes", "train": "trained prompts"}
"""The prompt sets every model is scored on, by key and column label."""


@dataclass
class Results:
    prompts: dict[str, list[str]]
    """By prompt set (`PROMPT_SETS`)."""
    seeds: list[int]
    scores: dict[str, dict[str, ModelScores]] = field(default_factory=dict)
    """By prompt set (those of `prompts`), then model."""
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    """Training history by run."""
    minutes: dict[str, float] = field(default_factory=dict)
    """Wall time of stage two by run, for the runs trained by this invocation (not the reused ones)."""
    epoch_seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Stage two's wall and CPU time per epoch by run (`wall`, `cpu`), without evaluations, grids and checkpoints."""
    curve_baseline: ModelScores | None = None
    """Stage one on the held-out prompts with the per-epoch evaluation's seeds (`--curves`)."""
    base_seeds: list[int] = field(default_factory=list)
    """The seeds the base model is scored on: `seeds` or their start (`--base-seeds`)."""
    train_prompt_seeds: list[int] = field(default_factory=list)
    """The seeds every model is scored on with stage two's own prompts: `seeds` or their start
    (`--train-prompt-seeds`); the base model on those of `base_seeds` among them."""

    def seeds_for(self, model: str, prompt_set: str) -> list[int]:
        """The seeds `model` is scored on in `prompt_set`: the shorter of its model's and its prompt set's."""
        by_model = self.base_seeds if model == "base" else self.seeds
        by_set = self.train_prompt_seeds if prompt_set == "train" else self.seeds
        return by_model if len(by_model) < len(by_set) else by_set

    def table(self) -> str:
        lines = ["| model | " + " | ".join(f"{PROMPT_SETS[key]} alignment | scene accuracy | identity"
                                          for key in self.scores) + " |",
                 "|---|" + "---|" * 3 * len(self.scores)]
        for name in self.scores["heldout"]:
            cells = [f"{s.alignment:.3f} | {s.scene_accuracy:.3f} | {s.identity:.3f}"
                     for s in (by_model[name] for by_model in self.scores.values())]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def gains(self) -> dict[str, dict[str, float]]:
        """Each stage-two run minus stage one, per prompt set: `<set>_alignment`, `<set>_identity`."""
        gains: dict[str, dict[str, float]] = {}
        for run in self.curves:
            gains[run] = {}
            for key, by_model in self.scores.items():
                two, one = by_model[run], by_model["stage one"]
                gains[run] |= {f"{key}_alignment": two.alignment - one.alignment,
                               f"{key}_identity": two.identity - one.identity}
        return gains

    def gain_table(self) -> str:
        lines = ["| run | " + " | ".join(f"{PROMPT_SETS[key]} alignment | identity" for key in self.scores) + " |",
                 "|---|" + "---|" * 2 * len(self.scores)]
        lines += [f"| {run} | " + " | ".join(f"{value:+.3f}" for value in g.values()) + " |"
                  for run, g in self.gains().items()]
        return "\n".join(lines)

    def curve_table(self) -> str:
        keys = ("reward_mean", "reward/toy_alignment", "reward/toy_alignment/with_identifier", "reward/toy_identity")
        lines = []
        for run, history in self.curves.items():
            lines += [f"\n{run}: epoch | " + " | ".join(keys)]
            lines += [f"{h['epoch']:>3} | " + " | ".join(f"{h[k]:.3f}" if k in h else "-" for k in keys)
                      for h in history]
        return "\n".join(lines)

    def heldout_curves(self) -> dict[str, list[tuple[float, float, float, float]]]:
        """By run: (CPU minutes of training, held-out alignment gain, scene accuracy, identity gain) after each epoch.

        CPU time, since with one thread it is the wall time on an idle machine, however loaded this one was."""
        base = self.curve_baseline
        curves = {}
        for run, history in self.curves.items():
            minutes = np.cumsum(self.epoch_seconds.get(run, {}).get("cpu", [])) / 60
            curves[run] = [(float(m), h["heldout/toy_alignment"] - base.alignment, h["heldout/toy_scene_accuracy"],
                            h["heldout/toy_identity"] - base.identity)
                           for m, h in zip(minutes, history) if "heldout/toy_alignment" in h]
        return curves

    def time_to_quality(self, reference: str) -> str:
        """Minutes each run needs to reach the reference arm's final held-out gain with the same seed."""
        curves = self.heldout_curves()
        lines = ["| run | final held-out gain | CPU minutes | target (reference's final gain) | CPU minutes to reach it |",
                 "|---|---|---|---|---|"]
        for run, curve in curves.items():
            ref = curves.get(run_name(reference, run_seed(run)))
            if not curve or not ref:
                continue
            target = ref[-1][1]
            reached = next((m for m, gain, *_ in curve if gain >= target), None)
            lines.append(f"| {run} | {curve[-1][1]:+.3f} | {curve[-1][0]:.2f} | {target:+.3f} | "
                         + ("not reached" if reached is None else f"{reached:.2f}") + " |")
        return "\n".join(lines)

    def heldout_curve_table(self) -> str:
        lines = []
        for run, curve in self.heldout_curves().items():
            lines += [f"\n{run}: CPU minutes | held-out alignment gain | scene accuracy | identity gain"]
            lines += [f"{m:6.2f} | {gain:+.3f} | {acc:.3f} | {ident:+.3f}" for m, gain, acc, ident in curve]
        return "\n".join(lines)


@torch.no_grad()
def score(pipe, prompts: list[str], seeds: list[int], config: Config, rewards: dict[str, RewardFn]) -> ModelScores:
    """Draws every prompt with every seed (the same noise for every model) and reads the world back."""
    from rlbooth.sampling import draw

    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    images = draw(pipe, prompts, seeds, config.report.num_inference_steps, config.report.guidance_scale)
    pixels = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 255 for im in images])).permute(0, 3, 1, 2)
    texts = [p for p in prompts for _ in seeds]
    metadata = [{"with_identifier": True}] * len(texts)
    return ModelScores(alignment=rewards["toy_alignment"](pixels, texts, metadata).mean().item(),
                       scene_accuracy=scene_accuracy(pixels, texts).mean().item(),
                       identity=rewards["toy_identity"](pixels, texts, metadata).mean().item())


def run_experiment(config: Config, subject: Subject, out: Path, arms: dict[str, list[str]],
                   seeds: list[int], train_seeds: tuple[int, ...] = (0,), curve_seeds: int = 0,
                   prompt_sets: tuple[str, ...] = tuple(PROMPT_SETS), base_seeds: int = 0,
                   train_prompt_seeds: int = 0) -> Results:
    """Stage one once, stage two per arm and training seed (each resumable), then every model scored on
    `prompt_sets` (keys of `PROMPT_SETS`; the held-out set always), the base model on the first `base_seeds`
    of `seeds` and stage two's own prompts on the first `train_prompt_seeds` where those are set.

    With `curve_seeds`, stage two also evaluates the held-out prompts on that many seeds after every epoch.
    """
    from rlbooth.align.train import align
    from rlbooth.models import load_pipeline
    from rlbooth.personalize.train import personalize

    every_epoch = curve_overrides(config, seeds[:curve_seeds]) if curve_seeds else []
    runs = {run_name(arm, seed): (with_overrides(config, overrides + every_epoch + [f"runtime.seed={seed}"]),
                                  out / f"{arm}-seed{seed}")
            for seed in train_seeds for arm, overrides in arms.items()}  # every run's config checked before training
    one = out / "personalize"
    if not is_finished(one):
        personalize(config, subject, one)
    minutes = {}
    for run, (run_config, folder) in runs.items():
        if not is_finished(folder):
            start = time.perf_counter()
            align(run_config, one, folder)
            minutes[run] = (time.perf_counter() - start) / 60

    files = {"heldout": config.report.prompt_file or "toyworld-heldout", "unseen": "toyworld-unseen",
             "train": config.align.prompt_file or "toyworld-train"}
    prompts = {key: [subject.prompt(t) for t in read_prompt_file(name)] for key, name in files.items()
               if key == "heldout" or key in prompt_sets}
    rewards = {"toy_alignment": build_reward("toy_alignment"),
               "toy_identity": build_reward("toy_identity", subject=subject)}
    results = Results(prompts=prompts, seeds=seeds, minutes=minutes, scores={key: {} for key in prompts},
                      base_seeds=seeds[:base_seeds] if base_seeds else seeds,
                      train_prompt_seeds=seeds[:train_prompt_seeds] if train_prompt_seeds else seeds)
    models = {"base": lambda: load_pipeline(config.model), "stage one": lambda: load_stage_pipeline(read_stage(one))}
    models |= {run: (lambda folder=folder: load_stage_pipeline(read_stage(folder, "align")))
               for run, (_, folder) in runs.items()}
    for name, load in models.items():
        pipe = load()
        for key, texts in prompts.items():
            results.scores[key][name] = score(pipe, texts, results.seeds_for(name, key), config, rewards)
    for run, (_, folder) in runs.items():
        metadata = read_stage(folder, "align").metadata
        results.curves[run], results.epoch_seconds[run] = metadata["history"], metadata.get("epoch_seconds", {})
    if curve_seeds:
        stage_one = load_stage_pipeline(read_stage(one))
        results.curve_baseline = score(stage_one, prompts["heldout"], seeds[:curve_seeds], config, rewards)
    return results


def curve_overrides(config: Config, seeds: list[int]) -> list[str]:
    """Stage two's own held-out evaluation after every epoch, drawn as the final scoring draws."""
    heldout = config.report.prompt_file or "toyworld-heldout"
    if config.align.guidance_scale != config.report.guidance_scale:
        raise ValueError(f"--curves: stage two evaluates at align.guidance_scale={config.align.guidance_scale}, the "
                         f"final scoring at report.guidance_scale={config.report.guidance_scale}; set them equal")
    return ["align.eval_every=1", f"align.eval_prompt_file={heldout}",
            f"align.eval_num_prompts={len(read_prompt_file(heldout))}", f"align.eval_seeds={seeds}",
            f"align.eval_num_steps={config.report.num_inference_steps}",
            "align.eval_rewards={toy_alignment: 1.0, toy_identity: 0.0, toy_scene_accuracy: 0.0}"]


def plot_curves(curves: dict[str, list[tuple[float, ...]]], path: Path, size: tuple[int, int] = (720, 420)) -> None:
    """Held-out alignment gain against minutes of stage two, a line per run, coloured by arm (PIL only)."""
    from PIL import Image, ImageDraw

    points = [(m, gain) for curve in curves.values() for m, gain, *_ in curve]
    if not points:
        return
    (w, h), pad = size, 48
    x_max, lo, hi = max(m for m, _ in points), min(0.0, *(g for _, g in points)), max(g for _, g in points)
    at = lambda m, g: (pad + (w - 2 * pad) * m / x_max, h - pad - (h - 2 * pad) * (g - lo) / ((hi - lo) or 1))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.line([at(0, lo), at(x_max, lo)], fill="black")
    draw.line([at(0, lo), at(0, hi)], fill="black")
    draw.line([at(0, 0), at(x_max, 0)], fill="grey")
    draw.text((w // 2 - 80, h - pad + 20), f"CPU minutes of stage two (0-{x_max:.1f})", fill="black")
    draw.text((4, 8), f"held-out alignment gain over stage one ({lo:+.2f} to {hi:+.2f})", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    arms = list(dict.fromkeys(map(run_arm, curves)))
    for run, curve in curves.items():
        colour = colours[arms.index(run_arm(run)) % len(colours)]
        draw.line([at(0, 0)] + [at(m, gain) for m, gain, *_ in curve], fill=colour, width=2)
    for i, arm in enumerate(arms):
        draw.text((w - pad - 120, h - pad - 14 * (len(arms) - i + 1)), arm, fill=colours[i % len(colours)])
    save_image_atomic(image, path)


def run_name(arm: str, seed: int) -> str:
    return f"stage two ({arm}, seed {seed})"


def run_arm(run: str) -> str:
    """The arm of a `run_name`."""
    return run.split("(", 1)[1].split(",", 1)[0]


def run_seed(run: str) -> int:
    """The training seed of a `run_name`."""
    return int(run.rsplit(" ", 1)[1].rstrip(")"))


def with_overrides(config: Config, overrides: list[str]) -> Config:
    """The config with `key=value` overrides applied and checked like the command line's."""
    return from_dict(Config, apply_overrides(config.to_dict(), overrides))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/toyworld-experiment"))
    parser.add_argument("--config", default="toy", help="preset (name in configs/ or path)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--subject", type=Path, default=EXAMPLE_SUBJECT)
    parser.add_argument("--arms", nargs="+", default=["identifier-only", "mixed"], choices=sorted(ARMS))
    parser.add_argument("--arm-set", nargs=2, action="append", default=[], metavar=("ARM", "KEY=VALUE"),
                        help="an override for one arm only, after its own (e.g. `--arm-set nft align.num_epochs=4`)")
    parser.add_argument("--seeds", type=int, default=64, help="images per prompt and model")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="stage-two runs per arm, one per `runtime.seed`")
    parser.add_argument("--curves", action="store_true",
                        help="score the held-out prompts after every stage-two epoch: alignment against minutes")
    parser.add_argument("--curve-seeds", type=int, default=16, help="images per held-out prompt in each of those")
    parser.add_argument("--prompt-sets", nargs="+", default=list(PROMPT_SETS), choices=list(PROMPT_SETS),
                        help="the prompt sets to score (the held-out one always)")
    parser.add_argument("--base-seeds", type=int, default=0,
                        help="score the base model on the first N of the seeds only (default: all); it is the same "
                             "model in every experiment of a preset, and far from stage one")
    parser.add_argument("--train-prompt-seeds", type=int, default=0,
                        help="score stage two's own prompts (the `train` set) on the first N of the seeds only "
                             "(default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for option, value in (("--base-seeds", args.base_seeds), ("--train-prompt-seeds", args.train_prompt_seeds)):
        if value < 0:
            parser.error(f"{option} {value}: give a number of seeds, or 0 for all of them")
    if stray := sorted({arm for arm, _ in args.arm_set} - set(args.arms)):
        parser.error(f"--arm-set names {stray}, which --arms does not run")
    config = load_config(args.config, args.overrides)
    arms = {arm: ARMS[arm] + [item for name, item in args.arm_set if name == arm] for arm in args.arms}
    results = run_experiment(config, Subject.from_yaml(args.subject), args.out, arms, list(range(args.seeds)),
                             tuple(args.train_seeds),
                             args.curve_seeds if args.curves else 0, tuple(args.prompt_sets), args.base_seeds,
                             args.train_prompt_seeds)
    report = "".join(f"{PROMPT_SETS[key]}: {texts}\n" for key, texts in results.prompts.items())
    fewer = [f"{what}: the first {len(used)}" for what, used in (("the base model", results.base_seeds),
             ("trained prompts", results.train_prompt_seeds)) if len(used) < len(results.seeds)]
    report += (f"{len(results.seeds)} seeds each, the same for every model"
               + (f" ({'; '.join(fewer)})" if fewer else "") + f"\n\n{results.table()}\n\n"
               f"gain over stage one:\n\n{results.gain_table()}\n"
               f"\nstage two wall time (minutes): {results.minutes}\n"
               f"\ntraining reward per epoch (stage two's own samples):{results.curve_table()}\n")
    if args.curves:
        report += (f"\nheld-out after every epoch ({args.curve_seeds} seeds; gains over stage one's "
                   f"{results.curve_baseline.alignment:.3f} alignment, {results.curve_baseline.identity:.3f} identity):"
                   f"{results.heldout_curve_table()}\n\ntime to the {args.arms[0]} arm's final held-out gain:\n\n"
                   f"{results.time_to_quality(args.arms[0])}\n")
        plot_curves(results.heldout_curves(), args.out / "curves.png")
    print(report)
    write_text_atomic(args.out / "results.md", report)
    write_text_atomic(args.out / "results.json", json.dumps(
        {"prompts": results.prompts, "seeds": results.seeds, "base_seeds": results.base_seeds,
         "train_prompt_seeds": results.train_prompt_seeds,
         "scores": {key: {k: vars(v) for k, v in by_model.items()} for key, by_model in results.scores.items()},
         "gains": results.gains(), "curves": results.curves, "stage_two_minutes": results.minutes,
         "epoch_seconds": results.epoch_seconds,
         "heldout_curves": results.heldout_curves() if args.curves else {},
         "curve_baseline": vars(results.curve_baseline) if args.curves else None}, indent=2))


if __name__ == "__main__":
    main()
