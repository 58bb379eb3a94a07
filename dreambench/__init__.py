"""DreamBench (DreamBooth, Ruiz et al. 2023; CC BY 4.0) as data files, and its evaluation script.

- `subjects.tsv`: the 30 subjects with their class noun and kind (`live` for cats and dogs, else `object`);
- `prompts-object.txt`, `prompts-live.txt`: the 25 + 25 evaluation prompts with rlbooth's placeholders;
- `evaluate.py`: `python -m rlbooth.dreambench.evaluate` / `rlbooth eval`; `metrics.py`: DINO, CLIP-I, CLIP-T,
  ImageReward, PickScore.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from rlbooth.files import read_text
from rlbooth.resources import DREAMBENCH, data_dir

DATA_DIR = data_dir(DREAMBENCH)
"""This folder (`dreambench/` in the repository, `rlbooth.dreambench` when installed)."""
SUBJECTS_FILE = DATA_DIR / "subjects.tsv"
PROMPT_FILES = {"live": DATA_DIR / "prompts-live.txt", "object": DATA_DIR / "prompts-object.txt"}


@dataclass(frozen=True)
class BenchSubject:
    name: str
    class_noun: str
    kind: str  # "live" or "object"


def read_subjects(path: Path = SUBJECTS_FILE) -> dict[str, BenchSubject]:
    """The subjects of `subjects.tsv` by name, in file order; `#` lines are comments."""
    lines = [line for line in read_text(path, "DreamBench subject table", "reinstall rlbooth").splitlines() if line.strip() and not line.startswith("#")]
    subjects = {}
    for row in csv.DictReader(lines, delimiter="\t"):
        subjects[row["subject"]] = BenchSubject(row["subject"], row["class_noun"], row["kind"])
    return subjects


def read_prompts(kind: str) -> list[str]:
    """DreamBench's 25 prompt templates for `live` or `object` subjects."""
    from rlbooth.prompts import read_prompt_file

    return read_prompt_file(PROMPT_FILES[kind])
