"""Prompt sets: plain text templates in `prompts/`, expanded for a subject with and without its identifier.

A file holds one template per line; `#` starts a comment, blank lines are skipped. Placeholders are
`{identifier}`, `{description}` and `{class_noun}`. Without the identifier a template names only the
class (`a dog playing soccer`): InstructBooth found that mixing such prompts into RL on an overfitted
personalized model makes it far more sample-efficient. The description stays without the identifier:
`a sks triangular toy` becomes `a triangular toy`, and an empty description leaves no double space.

Every template must name the class (`{class_noun}`); the shipped sets write `{identifier} {description}
{class_noun}` together so both halves read naturally. The sets in `prompts/`:

- `live`, `object`: activities and interactions, stage two's default training sets by kind;
- `dreambench-train-live`, `dreambench-train-object`: recontextualization/accessorization in InstructBooth's
  style, clear of DreamBench's evaluation prompts and their concepts;
- `heldout-live`, `heldout-object`: evaluation prompts that no training set holds.

`dreambench/prompts-{object,live}.txt` are DreamBench's 25 + 25 evaluation prompts (CC BY 4.0) with rlbooth's
placeholders; `resolve_prompt_file("dreambench/prompts-live")` finds them from any directory.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

from rlbooth.errors import RlboothError
from rlbooth.files import read_text
from rlbooth.resources import DREAMBENCH, PROMPT_SETS, data_dir
from rlbooth.subject import Subject, SubjectError, format_prompt

PROMPT_DIR = data_dir(PROMPT_SETS)
"""The shipped prompt sets (`prompts/` in the repository, `rlbooth.prompt_sets` when installed)."""
DREAMBENCH_DIR = data_dir(DREAMBENCH)
"""DreamBench's evaluation prompts, `prompts-object.txt` and `prompts-live.txt`."""


class PromptFileError(RlboothError, ValueError):
    """A prompt file is missing, empty, or has a bad line (named with its line number)."""


def resolve_prompt_file(name: str | Path) -> Path:
    """A path, or a set name in `prompts/` (`live` -> prompts/live.txt), or `dreambench/prompts-live`."""
    shipped = str(name).removeprefix("dreambench/")
    folder = DREAMBENCH_DIR if shipped != str(name) else PROMPT_DIR
    for path in (Path(name), folder / shipped, folder / f"{shipped}.txt"):
        if path.is_file():
            return path
    known = ", ".join(sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))
                      + sorted(f"dreambench/{p.stem}" for p in DREAMBENCH_DIR.glob("*.txt")))
    raise PromptFileError(f"prompt file {name!r} not found (sets in {PROMPT_DIR}: {known})")


def read_prompt_file(name: str | Path) -> list[str]:
    """The templates of a prompt file; a bad line raises PromptFileError naming `file:line`.

    A line is bad if it has an unknown placeholder or unbalanced braces, or does not name the class
    (`{class_noun}`). The order of the placeholders is free (`a red {identifier} {class_noun}` is fine).
    """
    path = resolve_prompt_file(name)
    text = read_text(path, "prompt file", "one template per line", PromptFileError, allow_empty=True)
    templates = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            format_prompt(line, identifier="x", description="", class_noun="x")
        except (SubjectError, ValueError, IndexError) as err:
            raise PromptFileError(f"{path}:{number}: {err}") from None
        if "class_noun" not in placeholders(line):
            raise PromptFileError(f"{path}:{number}: prompt template {line!r} does not name the class: "
                                  "add {class_noun} (e.g. `a {identifier} {description} {class_noun} ...`)")
        templates.append(line)
    if not templates:
        raise PromptFileError(f"{path} holds no prompts (only comments or blank lines)")
    return templates


def placeholders(template: str) -> list[str]:
    """The placeholder names of a template in order of appearance (`['identifier', 'class_noun']`)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def default_prompt_set(subject: Subject) -> str:
    """The activities that make sense for the subject's kind."""
    return "object" if subject.kind == "object" else "live"


def heldout_prompt_set(subject: Subject) -> str:
    """The held-out evaluation prompts for the subject's kind; no training set holds them."""
    return "heldout-object" if subject.kind == "object" else "heldout-live"


def dreambench_prompt_set(subject: Subject) -> str:
    """DreamBench's 25 evaluation prompts for the subject's kind (faces get the live ones)."""
    return "dreambench/prompts-object" if subject.kind == "object" else "dreambench/prompts-live"


@dataclass(frozen=True)
class Prompt:
    text: str
    with_identifier: bool
    template: str


def expand(templates: list[str], subject: Subject) -> list[Prompt]:
    """Each template filled twice, with then without the identifier (2 prompts per template, in order)."""
    return [Prompt(subject.prompt(t, with_identifier), with_identifier, t)
            for t in templates for with_identifier in (True, False)]


class PromptSampler:
    """Draws prompt i of epoch e from a generator seeded by (seed, e, i), so any process count draws alike."""

    def __init__(self, templates: list[str], subject: Subject, identifier_ratio: float, seed: int) -> None:
        if not templates:
            raise ValueError("PromptSampler needs at least one template")
        if not 0 <= identifier_ratio <= 1:
            raise ValueError(f"identifier_ratio must be in [0, 1], got {identifier_ratio}")
        self.templates, self.subject, self.ratio, self.seed = templates, subject, identifier_ratio, seed

    def __call__(self, epoch: int, index: int) -> Prompt:
        rng = random.Random(f"{self.seed}-{epoch}-{index}")
        template = rng.choice(self.templates)
        with_identifier = rng.random() < self.ratio
        return Prompt(self.subject.prompt(template, with_identifier), with_identifier, template)
