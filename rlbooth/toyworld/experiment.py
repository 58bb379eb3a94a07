"""The toy world's experiment: does stage two make the personalized model follow prompts it ignored?

`python -m rlbooth.toyworld.experiment --out runs/toyworld-experiment` runs stage one on the toy
subject, then stage two once per arm (InstructBooth's mixed prompts, and prompts that all name the
subject), and scores the base model, stage one and every arm on held-out prompts (scenes that
neither the photos nor stage two's prompts show), with the same seeds for every model. It prints
the table and each arm's training-reward curve and writes them to `results.json` and `results.md`.
Finished stages are reused, so a rerun only rescoring costs seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rlbooth.config import Config, apply_overrides, from_dict, load_config
from rlbooth.prompts import read_prompt_file
from rlbooth.stages import is_finished, load_stage_pipeline, read_stage, write_text_atomic
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
}
"""Stage-two variants by name: config overrides applied over the experiment's config."""


@dataclass
class ModelScores:
    alignment: float
    """Mean toy_alignment reward on the held-out prompts (1 = the asked scene exactly)."""
    scene_accuracy: float
    """Share of images whose background is nearest to the asked scene."""
    identity: float
    """Mean toy_identity reward (1 = the subject's colours in the photos' proportions)."""


@dataclass
class Results:
    heldout_prompts: list[str]
    seeds: list[int]
    scores: dict[str, ModelScores] = field(default_factory=dict)
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def table(self) -> str:
        lines = ["| model | alignment | scene accuracy | identity |", "|---|---|---|---|"]
        lines += [f"| {name} | {s.alignment:.3f} | {s.scene_accuracy:.3f} | {s.identity:.3f} |"
                  for name, s in self.scores.items()]
        return "\n".join(lines)

    def curve_table(self) -> str:
        keys = ("reward_mean", "reward/toy_alignment", "reward/toy_alignment/with_identifier", "reward/toy_identity")
        lines = []
        for arm, history in self.curves.items():
            lines += [f"\n{arm}: epoch | " + " | ".join(keys)]
            lines += [f"{h['epoch']:>3} | " + " | ".join(f"{h[k]:.3f}" if k in h else "-" for k in keys)
                      for h in history]
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
                   seeds: list[int]) -> Results:
    """Stage one once, stage two per arm (each resumable), then every model scored on held-out prompts."""
    from rlbooth.align.train import align
    from rlbooth.models import load_pipeline
    from rlbooth.personalize.train import personalize

    one = out / "personalize"
    if not is_finished(one):
        personalize(config, subject, one)
    for arm, arm_overrides in arms.items():
        if not is_finished(out / arm):
            align(with_overrides(config, arm_overrides), one, out / arm)

    templates = read_prompt_file(config.report.prompt_file or "toyworld-heldout")
    prompts = [subject.prompt(t) for t in templates]
    rewards = {"toy_alignment": build_reward("toy_alignment"),
               "toy_identity": build_reward("toy_identity", subject=subject)}
    results = Results(heldout_prompts=prompts, seeds=seeds)
    results.scores["base"] = score(load_pipeline(config.model), prompts, seeds, config, rewards)
    results.scores["stage one"] = score(load_stage_pipeline(read_stage(one)), prompts, seeds, config, rewards)
    for arm in arms:
        stage = read_stage(out / arm, "align")
        results.scores[f"stage two ({arm})"] = score(load_stage_pipeline(stage), prompts, seeds, config, rewards)
        results.curves[arm] = stage.metadata["history"]
    return results


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
    parser.add_argument("--seeds", type=int, default=16, help="images per held-out prompt and model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config, args.overrides)
    results = run_experiment(config, Subject.from_yaml(args.subject), args.out,
                             {arm: ARMS[arm] for arm in args.arms}, list(range(args.seeds)))
    report = f"held-out prompts: {results.heldout_prompts}, {len(results.seeds)} seeds each\n\n{results.table()}\n" \
             f"\ntraining reward per epoch (stage two's own samples):{results.curve_table()}\n"
    print(report)
    write_text_atomic(args.out / "results.md", report)
    write_text_atomic(args.out / "results.json", json.dumps(
        {"heldout_prompts": results.heldout_prompts, "seeds": results.seeds,
         "scores": {k: vars(v) for k, v in results.scores.items()}, "curves": results.curves}, indent=2))


if __name__ == "__main__":
    main()
