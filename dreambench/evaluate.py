"""Run DreamBench on rlbooth models: generate with fixed seeds, score, and tabulate (resumable).

    python -m rlbooth.dreambench.evaluate --models stage1=runs/dog/personalize --models stage2=runs/dog/align \\
        --dreambench-root dreambench-photos --subjects dog --output eval/dog
    rlbooth eval --models stage1=stage1.yaml --models stage2=stage2.yaml --dreambench-root photos -o eval/all

A model is a finished stage output folder (used for every subject) or a JSON/YAML mapping file
`subject: stage folder` (relative paths are taken from the file's folder). Prompts are DreamBench's
(`prompts-live.txt` for cats and dogs, `prompts-object.txt` else), filled with the stage's identifier
and DreamBench's class noun; image k of prompt p uses seed k.

Output layout:
    <output>/images/<model>/<subject>/p<NN>-seed<k>.png   generated images (existing ones are kept)
    <output>/scores.csv    one row per image: model, subject, kind, prompt_index, prompt, seed, metrics
    <output>/summary.csv   means per model x subject, model x kind (live/object) and model overall
    <output>/results.md    one row per model, next to the published reference numbers

Everything is checked before any image is generated; a rerun skips images and scores already there.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlbooth.dreambench import BenchSubject, read_prompts, read_subjects
from rlbooth.dreambench.metrics import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    METRICS,
    TITLES,
    MetricOptions,
    MetricSuite,
)
from rlbooth.errors import RlboothError

logger = logging.getLogger(__name__)

SCORE_FIELDS = ["model", "subject", "kind", "prompt_index", "prompt", "seed", *METRICS]
SUMMARY_FIELDS = ["model", "scope", "name", "num_images", *METRICS]
REFERENCES = [  # published numbers (SD v1.x), blanks where the paper gives none
    ("DreamBooth (SD), Ruiz et al. 2023", {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}),
    ("InstructBooth, Chae et al. 2023", {"dino": 0.661, "clip_t": 0.306, "image_reward": 0.651,
                                         "pickscore": 0.217}),
]


HUB_DATASET = "google/dreambooth"


class EvalError(RlboothError, ValueError):
    """Bad evaluation input: unknown subject, missing photos or model folder, bad option."""


@dataclass(frozen=True)
class Job:
    """One model on one subject."""

    model: str
    subject: BenchSubject
    stage_dir: Path
    identifier: str
    photos: tuple[Path, ...]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlbooth eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="a model to evaluate (repeatable): a stage output folder, or a JSON/YAML file "
                        "mapping subject -> stage output folder")
    p.add_argument("--dreambench-root", required=True,
                   help="folder of the subject photos in DreamBench's layout: <root>/<subject>/*.jpg; "
                        f"or `hub` to download the subjects' photos from the dataset repo {HUB_DATASET}")
    p.add_argument("--subjects", nargs="+", default=None,
                   help="subjects to evaluate (default: all 30, or those every mapping file names)")
    p.add_argument("--num-prompts", type=int, default=25, help="first N prompts of each prompt set (max 25)")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt, seeds 0..N-1")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--output", "-o", type=Path, required=True, help="output folder (resumable)")
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS, help="metrics to compute")
    p.add_argument("--dino-model", default=DEFAULT_DINO, help="DINO ViT (hub id or local folder)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIP for CLIP-I and CLIP-T (hub id or folder)")
    p.add_argument("--image-reward-checkpoint", default=MetricOptions.image_reward_checkpoint)
    p.add_argument("--image-reward-tokenizer", default=MetricOptions.image_reward_tokenizer)
    p.add_argument("--pickscore-model", default=MetricOptions.pickscore_model)
    p.add_argument("--pickscore-processor", default=MetricOptions.pickscore_processor)
    p.add_argument("--device", default=None, help="device for the metric models (default: cuda if available)")
    return p


# ---------------------------------------------------------------------------------------------
# validation


def _read_mapping(path: Path) -> dict[str, Path]:
    from rlbooth.files import read_json, read_yaml

    read = read_json if path.suffix.lower() == ".json" else read_yaml
    data = read(path, "model mapping", "it maps subject names to stage output folders", EvalError)
    if not isinstance(data, dict) or not data:
        raise EvalError(f"model mapping {path} must map subject names to stage output folders")
    return {str(k): (path.parent / str(v)) if not Path(str(v)).is_absolute() else Path(str(v))
            for k, v in data.items()}


def parse_models(specs: Sequence[str]) -> dict[str, Path | dict[str, Path]]:
    """NAME=PATH -> a stage folder for all subjects, or a subject -> folder mapping."""
    models: dict[str, Path | dict[str, Path]] = {}
    for spec in specs:
        name, sep, raw = spec.partition("=")
        name = name.strip()
        if not sep or not name or not raw:
            raise EvalError(f"--models {spec!r}: expected NAME=PATH")
        if "/" in name or name in models:
            raise EvalError(f"--models {spec!r}: model names must be unique and contain no '/'")
        path = Path(raw)
        if path.is_file() and path.suffix.lower() in (".json", ".yaml", ".yml"):
            models[name] = _read_mapping(path)
        elif path.is_dir():
            models[name] = path
        else:
            raise EvalError(f"--models {spec!r}: {path} is neither a stage output folder nor a JSON/YAML mapping")
    return models


def photo_root(root: str, subjects: list[str]) -> Path:
    """A local folder as given, or `hub`: the subjects' folders of the dataset repo, in its original layout."""
    if root != "hub":
        return Path(root)
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(HUB_DATASET, repo_type="dataset",
                                   allow_patterns=[f"dataset/{name}/*" for name in subjects])
    except Exception as err:  # network, auth and hub errors come in many classes
        raise EvalError(f"--dreambench-root hub: could not download {HUB_DATASET} ({type(err).__name__}: {err}); "
                        f"without network, download it where you can (`hf download {HUB_DATASET} "
                        "--repo-type dataset --local-dir dreambooth`) and pass --dreambench-root "
                        "dreambooth/dataset") from err
    return Path(folder) / "dataset"


def plan(args: argparse.Namespace) -> list[Job]:
    """Every (model, subject) job, with all input checked; raises EvalError before anything runs."""
    from rlbooth.images import ImageError, check_images
    from rlbooth.stages import StageError, read_stage

    known = read_subjects()
    if not 1 <= args.num_prompts <= 25:
        raise EvalError(f"--num-prompts {args.num_prompts}: must be between 1 and 25")
    if args.num_images < 1 or args.steps < 1:
        raise EvalError("--num-images and --steps must be at least 1")
    models = parse_models(args.models)
    if args.subjects:
        names = list(dict.fromkeys(args.subjects))
    else:
        mapped = [set(m) for m in models.values() if isinstance(m, dict)]
        names = [s for s in known if all(s in m for m in mapped)]
    unknown = [s for s in names + [s for m in models.values() if isinstance(m, dict) for s in m] if s not in known]
    if unknown:
        raise EvalError(f"unknown DreamBench subject(s) {sorted(set(unknown))}; known: {', '.join(known)}")
    if not names:
        raise EvalError("no subject to evaluate: the mapping files share none")
    root = photo_root(args.dreambench_root, names)
    photos: dict[str, tuple[Path, ...]] = {}
    for name in names:
        try:
            photos[name] = tuple(check_images(root / name, 0))
        except ImageError as err:
            raise EvalError(f"subject {name!r}: {err} (expected {root}/{name}/*.jpg)") from err
    jobs = []
    for model, where in models.items():
        for name in names:
            folder = where.get(name) if isinstance(where, dict) else where
            if folder is None:
                raise EvalError(f"model {model!r}: its mapping names no stage folder for subject {name!r}")
            try:
                stage = read_stage(folder)
            except StageError as err:
                raise EvalError(f"model {model!r}, subject {name!r}: {err}") from err
            jobs.append(Job(model, known[name], folder, stage.subject.identifier, photos[name]))
    return jobs


# ---------------------------------------------------------------------------------------------
# generation and scoring


def prompts_for(job: Job, num_prompts: int) -> list[str]:
    from rlbooth.subject import format_prompt

    return [format_prompt(t, identifier=job.identifier, description="", class_noun=job.subject.class_noun)
            for t in read_prompts(job.subject.kind)[:num_prompts]]


def image_path(output: Path, model: str, subject: str, prompt_index: int, seed: int) -> Path:
    return output / "images" / model / subject / f"p{prompt_index:02d}-seed{seed}.png"


def generate(job: Job, prompts: list[str], seeds: list[int], output: Path, steps: int, guidance: float) -> int:
    """Draws the prompts that miss an image (all seeds in one call) and saves only the missing files."""
    from rlbooth import sampling
    from rlbooth.images import is_readable_image, save_image_atomic
    from rlbooth.stages import read_stage

    todo = [p for p in range(len(prompts))
            if any(not is_readable_image(image_path(output, job.model, job.subject.name, p, s)) for s in seeds)]
    if not todo:
        return 0
    logger.info("%s / %s: drawing %d prompts x %d seeds", job.model, job.subject.name, len(todo), len(seeds))
    images = sampling.sample_stage(read_stage(job.stage_dir), [prompts[p] for p in todo], seeds, steps, guidance)
    written = 0
    for index, image in enumerate(images):
        p, s = todo[index // len(seeds)], seeds[index % len(seeds)]
        path = image_path(output, job.model, job.subject.name, p, s)
        if not is_readable_image(path):  # missing, or damaged (by a copy, not by a kill: writes are atomic)
            save_image_atomic(image, path)
            written += 1
    return written


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a scores table written before; one that lacks the key columns is an error."""
    from rlbooth.files import read_text

    if not path.is_file():
        return []
    hint = "remove it: the next run scores its images again"
    rows = list(csv.DictReader(io.StringIO(read_text(path, "scores table", hint, EvalError), newline="")))
    for number, row in enumerate(rows, start=2):
        try:
            _key(row)
        except (KeyError, TypeError, ValueError):
            raise EvalError(f"scores table {path}:{number} is damaged (no model, subject, prompt_index, seed); "
                            f"{hint}") from None
    return rows


def write_rows(path: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    """Writes a CSV through a temporary file, so a crash never leaves half a table."""
    from rlbooth.files import replacing

    with replacing(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _key(row: dict[str, str]) -> tuple[str, str, int, int]:
    return row["model"], row["subject"], int(row["prompt_index"]), int(row["seed"])


def score(job: Job, prompts: list[str], seeds: list[int], output: Path, suite: MetricSuite,
          rows: dict[tuple[str, str, int, int], dict[str, str]], cache: dict[str, dict]) -> int:
    """Scores the images of a job that lack a requested metric; returns how many rows changed."""
    from rlbooth.dreambench.metrics import load_images, strip_identifier

    todo = [(p, s) for p in range(len(prompts)) for s in seeds
            if any(rows.get((job.model, job.subject.name, p, s), {}).get(m, "") == "" for m in suite.metrics)]
    if not todo:
        return 0
    import torch

    if job.subject.name not in cache:
        cache[job.subject.name] = suite.reference(load_images(job.photos, square=True))
    images = torch.cat(load_images([image_path(output, job.model, job.subject.name, p, s) for p, s in todo]))
    stripped = [strip_identifier(prompts[p], job.identifier) for p, _ in todo]
    scores = suite.score(images, stripped, cache[job.subject.name])
    for i, (p, s) in enumerate(todo):
        row = rows.setdefault((job.model, job.subject.name, p, s), {
            "model": job.model, "subject": job.subject.name, "kind": job.subject.kind, "prompt_index": str(p),
            "prompt": prompts[p], "seed": str(s), **dict.fromkeys(METRICS, "")})
        for metric, values in scores.items():
            row[metric] = f"{values[i]:.6f}"
    return len(todo)


# ---------------------------------------------------------------------------------------------
# tables


def _means(rows: list[dict[str, str]]) -> dict[str, str]:
    out = {}
    for metric in METRICS:
        values = [float(r[metric]) for r in rows if r.get(metric, "") != ""]
        out[metric] = f"{sum(values) / len(values):.4f}" if values else ""
    return out


def summarize(rows: list[dict[str, str]], models: list[str]) -> list[dict[str, str]]:
    """Means per model x subject, model x kind and model overall."""
    summary = []
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        groups: list[tuple[str, str, list[dict[str, str]]]] = []
        for subject in dict.fromkeys(r["subject"] for r in mine):
            groups.append(("subject", subject, [r for r in mine if r["subject"] == subject]))
        for kind in ("live", "object"):
            groups.append(("kind", kind, [r for r in mine if r["kind"] == kind]))
        groups.append(("all", "all", mine))
        summary += [{"model": model, "scope": scope, "name": name, "num_images": str(len(group)), **_means(group)}
                    for scope, name, group in groups if group]
    return summary


TABLE_SCALE = {"pickscore": (0.01, "PickScore (0-1)")}
"""Metrics the table rescales to the published figures' scale: PickScore is logit scale (100) x cosine in
scores.csv and summary.csv, and the papers report the cosine (InstructBooth's 0.217)."""


def _table_value(metric: str, value: str) -> str:
    if not value:
        return "–"
    return f"{float(value) * TABLE_SCALE[metric][0]:.4f}" if metric in TABLE_SCALE else value


def results_markdown(summary: list[dict[str, str]], args: argparse.Namespace, jobs: list[Job]) -> str:
    metrics = list(METRICS)
    header = "| Model | " + " | ".join(TABLE_SCALE.get(m, (1, TITLES[m]))[1] for m in metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    for row in (r for r in summary if r["scope"] == "all"):
        lines.append(f"| {row['model']} | " + " | ".join(_table_value(m, row[m]) for m in metrics) + " |")
    for name, values in REFERENCES:
        lines.append(f"| *{name}* | " + " | ".join(f"{values[m]:.3f}" if m in values else "–" for m in metrics)
                     + " |")
    subjects = list(dict.fromkeys(job.subject.name for job in jobs))
    note = (f"\n{len(subjects)} subject(s), {args.num_prompts} prompt(s) each, {args.num_images} image(s) per prompt "
            f"(seeds 0..{args.num_images - 1}), {args.steps} steps, guidance {args.guidance_scale}. "
            f"DINO: `{args.dino_model}` CLS, mean cosine over generated x real images; CLIP-I and CLIP-T: "
            f"`{args.clip_model}`; CLIP-T, ImageReward and PickScore use the prompt without its identifier. "
            "Reference rows are the published numbers (Stable Diffusion, all 30 subjects, 25 prompts, 4 images). "
            "PickScore (0-1) is the cosine the papers report: rlbooth's score (scores.csv, summary.csv: logit scale "
            "100 x cosine) divided by 100.\n")
    return "# DreamBench results\n\n" + "\n".join(lines) + "\n" + note


# ---------------------------------------------------------------------------------------------


def evaluate(args: argparse.Namespace) -> Path:
    """Checks, generates, scores and tabulates; returns the results.md path."""
    import torch

    from rlbooth.files import write_text_atomic

    jobs = plan(args)
    output: Path = args.output
    scores_csv = output / "scores.csv"
    rows = {_key(r): r for r in read_rows(scores_csv)}  # a damaged table is reported before any generation
    seeds = list(range(args.num_images))
    prompts = {(job.model, job.subject.name): prompts_for(job, args.num_prompts) for job in jobs}
    for job in jobs:
        generate(job, prompts[job.model, job.subject.name], seeds, output, args.steps, args.guidance_scale)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = MetricOptions(args.dino_model, args.clip_model, args.image_reward_checkpoint,
                            args.image_reward_tokenizer, args.pickscore_model, args.pickscore_processor, device)
    suite = MetricSuite(args.metrics, options)
    cache: dict[str, dict] = {}
    for job in jobs:
        if score(job, prompts[job.model, job.subject.name], seeds, output, suite, rows, cache):
            write_rows(scores_csv, SCORE_FIELDS, list(rows.values()))

    wanted = {(job.model, job.subject.name, p, s) for job in jobs for p in range(args.num_prompts) for s in seeds}
    selected = [row for key, row in rows.items() if key in wanted]
    summary = summarize(selected, list(dict.fromkeys(job.model for job in jobs)))
    write_rows(output / "summary.csv", SUMMARY_FIELDS, summary)
    results = output / "results.md"
    write_text_atomic(results, results_markdown(summary, args, jobs))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        results = evaluate(args)
    except RlboothError as err:
        print(f"rlbooth eval: error: {err}", file=sys.stderr)
        return 2
    print(results.read_text())
    print(f"tables: {results.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
