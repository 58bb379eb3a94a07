"""Prompt sets: plain text templates in `prompts/`, expanded for a subject with and without its identifier.

A file holds one template per line; `#` starts a comment, blank lines are skipped. Placeholders are
`{identifier}`, `{description}` and `{class_noun}`. Without the identifier a template names only the
class (`a dog playing soccer`): InstructBooth found that mixing such prompts into RL on an overfitted
personalized model makes it far more sample-efficient.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from rlbooth.errors import RlboothError
from rlbooth.subject import Subject, SubjectError, format_prompt

PROMPT_DIR = Path(__file__).resolve().parent.parent / "prompts"


class PromptFileError(RlboothError, ValueError):
    """A prompt file is missing, empty, or has a bad line (named with its line number)."""


def resolve_prompt_file(name: str | Path) -> Path:
    """A path, or a set name in `prompts/` (`live` -> prompts/live.txt)."""
    for path in (Path(name), PROMPT_DIR / str(name), PROMPT_DIR / f"{name}.txt"):
        if path.is_file():
            return path
    known = ", ".join(sorted(p.stem for p in PROMPT_DIR.glob("*.txt")))
    raise PromptFileError(f"prompt file {name!r} not found (sets in {PROMPT_DIR}: {known})")


def read_prompt_file(name: str | Path) -> list[str]:
    path = resolve_prompt_file(name)
    templates = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            format_prompt(line, identifier="x", description="", class_noun="x")
        except (SubjectError, ValueError, IndexError) as err:
            raise PromptFileError(f"{path}:{number}: {err}") from None
        templates.append(line)
    if not templates:
        raise PromptFileError(f"{path} holds no prompts (only comments or blank lines)")
    return templates


def default_prompt_set(subject: Subject) -> str:
    """The activities that make sense for the subject's kind."""
    return "object" if subject.kind == "object" else "live"


@dataclass(frozen=True)
class Prompt:
    text: str
    with_identifier: bool
    template: str


class PromptSampler:
    """Draws prompt i of epoch e from a generator seeded by (seed, e, i), so any process count draws alike."""

    def __init__(self, templates: list[str], subject: Subject, identifier_ratio: float, seed: int) -> None:
        self.templates, self.subject, self.ratio, self.seed = templates, subject, identifier_ratio, seed

    def __call__(self, epoch: int, index: int) -> Prompt:
        rng = random.Random(f"{self.seed}-{epoch}-{index}")
        template = rng.choice(self.templates)
        with_identifier = rng.random() < self.ratio
        return Prompt(self.subject.prompt(template, with_identifier), with_identifier, template)
