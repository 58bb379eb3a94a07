"""Does watching held-out prompts catch reward hacking in the toy world, and what does the watching cost?

`python benchmarks/heldout_hacking.py --out runs/hacking` trains stage one on the toy subject (reused
when finished), then stage two in a setting that hacks: the alignment reward alone, at a higher learning
rate, for more epochs, so the held-out scene alignment can rise while the subject's identity (which no
training reward guards) decays. Every evaluation scores the held-out prompts with the truth: alignment,
scene accuracy and identity, selection = alignment + identity. One run per seed gives all three policies,
since a run is the same up to where it stops: `keep: last` (the last epoch), `keep: best` (the evaluation
with the best selection) and early stop with patience `--patience` (the best up to the stop). It prints
the truth at each policy's epoch, the alarms, and the evaluation's share of stage two's wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from rlbooth.align.heldout import HeldoutEvaluator, best_row, evaluations_since_best
from rlbooth.align.train import align
from rlbooth.config import load_config
from rlbooth.personalize.train import personalize
from rlbooth.stages import is_finished
from rlbooth.subject import Subject
from rlbooth.toyworld.experiment import EXAMPLE_SUBJECT

HACKING = ["align.reward={toy_alignment: 1.0, toy_identity: 0.0, toy_aesthetic: 0.0}", "align.eval_every=2",
           "align.eval_num_prompts=8", "align.eval_num_steps=20", "align.eval_seeds=[0, 1, 2, 3]", "align.keep=best",
           "align.eval_rewards={toy_alignment: 1.0, toy_identity: 1.0, toy_scene_accuracy: 0.0}"]
"""Stage two that can hack (with --set for the learning rate and epochs): alignment alone is rewarded (the
preset's other rewards at weight 0: an override's mapping merges into the preset's)."""
TRUTH = ("heldout/toy_scene_accuracy", "heldout/toy_alignment", "heldout/toy_identity")


def early_stop_row(table: list[dict], patience: int) -> dict:
    """The row early stop would keep: the best of the evaluations up to the first `patience` without a new best."""
    for end in range(1, len(table) + 1):
        if evaluations_since_best(table[:end]) >= patience:
            return best_row(table[:end])
    return best_row(table)


def timed(seconds: list[float]):
    """HeldoutEvaluator.__call__ that adds its wall time to `seconds`."""
    call = HeldoutEvaluator.__call__

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return call(self, *args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)
    return wrapper


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hacking"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config("toy", ["runtime.report_to=none"])
    one = args.out / "personalize"
    if not is_finished(one):
        personalize(config, Subject.from_yaml(EXAMPLE_SUBJECT), one)
    lines = ["| seed | policy | epoch | held-out scene accuracy | alignment | identity | selection |",
             "|---|---|---|---|---|---|---|"]
    for seed in args.seeds:
        folder = args.out / f"seed{seed}"
        seconds: list[float] = []
        HeldoutEvaluator.__call__ = timed(seconds)
        start = time.perf_counter()
        if not is_finished(folder):
            align(load_config("toy", ["runtime.report_to=none", *HACKING, f"runtime.seed={seed}", *args.overrides]),
                  one, folder)
        wall = time.perf_counter() - start
        watched = json.loads((folder / "rlbooth.json").read_text())["heldout"]
        table = watched["table"]
        policies = {"keep: last": table[-1], "keep: best": best_row(table),
                    f"early stop ({args.patience})": early_stop_row(table, args.patience)}
        for name, row in policies.items():
            lines.append(f"| {seed} | {name} | {row['epoch']} | " + " | ".join(f"{row[k]:.3f}" for k in TRUTH)
                         + f" | {row['selection']:.3f} |")
        print(f"seed {seed}: alarms at epochs {watched['alarms']}; evaluation {sum(seconds):.0f} s of {wall:.0f} s "
              f"({sum(seconds) / wall:.0%})" if seconds else f"seed {seed}: reused, alarms at {watched['alarms']}")
        for row in table:
            print(f"  epoch {row['epoch']:>2}: train {row['train_reward']:.3f} | "
                  + " | ".join(f"{k.removeprefix('heldout/')} {row[k]:.3f}" for k in TRUTH)
                  + f" | selection {row['selection']:.3f}{' ALARM' if row['alarm'] else ''}", flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
