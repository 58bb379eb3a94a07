"""The subject spec: whose photos, and the words that name it in prompts."""

from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from rlbooth.errors import RlboothError

Kind = Literal["face", "live", "object"]
KINDS: tuple[str, ...] = ("face", "live", "object")
PLACEHOLDERS = frozenset({"identifier", "description", "class_noun"})


class SubjectError(RlboothError, ValueError):
    """The subject spec is incomplete or inconsistent."""


@dataclass(frozen=True)
class Subject:
    """One subject: 3-20 photos plus the prompt words `a <identifier> [<description>] <class noun>`."""

    images: Path
    """Folder of the subject's photos."""
    class_noun: str
    """The class the subject belongs to (`dog`, `backpack`, `man`); it names the prior."""
    identifier: str = "sks"
    """Rare token bound to the subject."""
    description: str = ""
    """Optional words between identifier and class noun (`triangular` in `a sks triangular plushie`)."""
    kind: Kind = "object"
    """`face` (identity by ArcFace), `live` (pets), or `object`."""
    name: str = ""
    """Short name for folders and reports; defaults to the images folder's name."""

    def __post_init__(self) -> None:
        for field in ("class_noun", "identifier", "description", "kind", "name"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise SubjectError(f"subject.{field}: expected a string, got {type(value).__name__} {value!r}")
        if not isinstance(self.images, (str, Path)):
            raise SubjectError(f"subject.images: expected a folder path, got {type(self.images).__name__} "
                               f"{self.images!r}")
        if not self.class_noun.strip():
            raise SubjectError("subject.class_noun: must not be empty (e.g. dog, backpack, woman)")
        if not self.identifier or any(c.isspace() for c in self.identifier):
            raise SubjectError(f"subject.identifier: must be one word without spaces, got {self.identifier!r}")
        if self.kind not in KINDS:
            raise SubjectError(f"subject.kind: must be one of {list(KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "images", Path(self.images))
        if not self.name:
            object.__setattr__(self, "name", self.images.name or "subject")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Subject":
        """Read a spec; a relative `images` folder is relative to the spec file."""
        from rlbooth.files import read_yaml

        path = Path(path)
        data = read_yaml(path, "subject spec", "see examples/ for one (images, class_noun, ...)", SubjectError,
                         allow_empty=True) or {}
        if not isinstance(data, dict):
            raise SubjectError(f"{path}: must hold a mapping (images, class_noun, identifier, description, kind)")
        known = {"images", "class_noun", "identifier", "description", "kind", "name"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SubjectError(f"{path}: unknown key(s) {unknown} (known: {sorted(known)})")
        for key in ("images", "class_noun"):
            if not data.get(key):
                raise SubjectError(f"{path}: `{key}` is required")
        if not isinstance(data["images"], str):
            raise SubjectError(f"{path}: `images` must be a folder path, got {type(data['images']).__name__} "
                               f"{data['images']!r}")
        data["images"] = (path.parent / Path(data["images"]).expanduser()).resolve()
        return cls(**{k: (v if v is not None else "") for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["images"] = str(self.images)
        return data

    def prompt(self, template: str, with_identifier: bool = True) -> str:
        """Fill a template; without the identifier it names only the class (InstructBooth's second half)."""
        return format_prompt(template, identifier=self.identifier if with_identifier else "",
                             description=self.description, class_noun=self.class_noun)


def format_prompt(template: str, **values: str) -> str:
    """Fill `{identifier}`, `{description}`, `{class_noun}` and collapse the spaces an empty one leaves."""
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = names - PLACEHOLDERS
    if unknown:
        raise SubjectError(f"prompt template {template!r}: unknown placeholder(s) {sorted(unknown)}; "
                           f"use {sorted(PLACEHOLDERS)}")
    return re.sub(r"\s+", " ", template.format(**values)).strip()
