"""The configuration as a user sees it: every field with its type, value and the docstring under it.

The docs are the string literals under each dataclass field in `rlbooth/config.py`, read once with `ast`,
so the code stays their only home. `render_config` prints a resolved config as YAML with each doc as a
comment (it loads back as a preset); `render_fields` lists every field with type, default and doc.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from collections.abc import Iterator
from typing import Any

import yaml

from rlbooth import config as config_module
from rlbooth.config import Config, type_name


@functools.cache
def field_docs() -> dict[str, dict[str, str]]:
    """{class name: {field name: doc}} for every dataclass in rlbooth.config."""
    tree = ast.parse(inspect.getsource(config_module))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for stmt, after in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                fields[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def iter_fields(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, Any, Any, str]]:
    """(dotted name, type, default, doc) for every leaf field under `cls`, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs().get(cls.__name__, {})
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, getattr(defaults, f.name), docs.get(f.name, "")


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _comment(doc: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(doc, 100 - len(indent))] if doc else []


def render_config(config: Config) -> str:
    """The resolved config as YAML, each field preceded by its doc as a comment."""
    lines: list[str] = []

    def walk(obj: Any, depth: int) -> None:
        indent = "  " * depth
        docs = field_docs().get(type(obj).__name__, {})
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            lines.extend(_comment(docs.get(f.name, ""), indent))
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:")
                walk(value, depth + 1)
            else:
                lines.append(f"{indent}{f.name}: {_yaml_value(value)}")

    walk(config, 0)
    return "\n".join(lines) + "\n"


def render_fields() -> str:
    """Every field, one block each: `name (type, default value)` then its doc, indented."""
    blocks = []
    for name, tp, default, doc in iter_fields():
        blocks.append(f"{name}  ({type_name(tp)}, default {_yaml_value(default)})\n"
                      + textwrap.indent(textwrap.fill(doc, 96), "    "))
    return "\n".join(blocks) + "\n"
