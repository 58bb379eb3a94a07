"""Every hub id the project names is listed, with its licence, in `rlbooth/hub_ids.py` and README, and none is
one the Hub no longer serves (RunwayML's Stable Diffusion 1.5 was deleted in August 2024)."""

from __future__ import annotations

import ast
import re

import yaml

from rlbooth.config import ModelConfig, load_config
from rlbooth.hub_ids import GONE, HUB_IDS
from tests.conftest import REPO

ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.+-]+(?:/[\w.+-]+\.(?:pth|safetensors|pt))?")
"""`owner/repo`, or a hub file spec `owner/repo/file.pth` (the aesthetic head)."""
NOT_HUB = {"runs", "samples", "model", "reward", "heldout", "report", "config", "owner", "my-dog", "identity_face",
           "weights-flow", "time"}
"""First parts of paths in examples and logs that are no hub owners (plus the repository's own folders)."""


def hub_id(text: str) -> str | None:
    if not ID.fullmatch(text):
        return None
    owner = text.split("/")[0]
    if owner in NOT_HUB or (REPO / owner).exists() or owner.startswith("."):
        return None
    return "/".join(text.split("/")[:2])


def strings_in_code() -> set[str]:
    found = set()
    for folder in ("rlbooth", "dreambench", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "hub_ids.py":  # the list itself, with the ids that are gone
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.add(node.value)
    return found


def strings_in_presets() -> set[str]:
    found = set()
    for path in sorted((REPO / "configs").glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        found |= set(re.findall(r"`(?:model\.pretrained: )?([^`\s]+)`", text))  # ids named in comments

        def walk(value):
            if isinstance(value, dict):
                for item in value.values():
                    walk(item)
            elif isinstance(value, list):
                for item in value:
                    walk(item)
            elif isinstance(value, str):
                found.add(value)

        walk(yaml.safe_load(text))
    return found


def strings_in_readme() -> set[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return (set(re.findall(r"`([^`\s]+)`", text)) | set(re.findall(r"from_pretrained\(\"([^\"]+)\"", text))
            | set(re.findall(r"hf download (\S+)", text)))


def test_every_hub_id_named_is_listed_and_none_is_gone():
    named = {source: {i for text in strings() if (i := hub_id(text))}
             for source, strings in (("code", strings_in_code), ("presets", strings_in_presets),
                                     ("README", strings_in_readme))}
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in named["presets"] and "THUDM/ImageReward" in named["code"]
    for source, ids in named.items():
        gone = {i for i in ids if i in GONE} - ({"runwayml/stable-diffusion-v1-5"} if source == "README" else set())
        assert not gone, f"{source} names ids the Hub no longer serves: {gone} (use {[GONE[i] for i in gone]})"
        assert ids - set(GONE) <= set(HUB_IDS), f"{source} names hub ids not in rlbooth/hub_ids.py"
    every = set().union(*named.values())
    assert set(HUB_IDS) - {"bert-base-uncased"} <= every  # no stale entries (bert's id has no owner part)


def test_readme_lists_every_id_with_its_licence():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for hub, (_, licence) in HUB_IDS.items():
        assert f"| `{hub}` |" in readme and licence in readme.split(f"| `{hub}` |")[1].splitlines()[0], hub


def test_sd15_default_and_presets_point_at_the_maintained_copy():
    sd15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert ModelConfig().pretrained == sd15
    assert load_config("sd15").model.pretrained == load_config("sd15-lora").model.pretrained == sd15
