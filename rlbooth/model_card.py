"""The model card each stage's `model/` gets: README.md with the YAML metadata the Hugging Face Hub reads.

Written while the stage publishes (from its metadata, before `rlbooth.json` marks it finished), so a
pushed folder explains itself: base model, tags, instance prompt and trigger word, the rewards of stage
two, and the stage's last sample grid as its picture.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from rlbooth.models import public_name

CARD = "README.md"
SAMPLE = "sample.png"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
FAMILY_TAGS = {"sd": "stable-diffusion", "sdxl": "stable-diffusion-xl", "sd3": "sd3", "flux": "flux",
               "qwenimage": "qwen-image", "zimage": "z-image"}
"""The Hub's tag of each model family."""


def _latest_sample(samples_dir: Path) -> Path | None:
    """The grid with the highest step or epoch number in `samples/` (step-200.png, epoch-12.png)."""
    grids = [(int(m.group(1)), p) for p in samples_dir.glob("*.png") if (m := re.search(r"-(\d+)\.png$", p.name))]
    return max(grids)[1] if grids else None


def card_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The YAML header for a stage's metadata (as written to its rlbooth.json)."""
    stage = metadata["stage"]
    one = metadata if stage == "personalize" else json.loads((Path(metadata["stage_one"]) / "rlbooth.json").read_text())
    subject = metadata["subject"]
    lora = stage == "align" or one["mode"] == "lora"
    card: dict[str, Any] = {}
    if HUB_ID.match(one["base_model"]) and not Path(one["base_model"]).exists():
        card["base_model"] = one["base_model"]  # the Hub takes only a repo id here
    family = one.get("family", "sd")
    card |= {
        "rlbooth_base_model": public_name(one["base_model"]),  # a local folder by its name, or `tiny` / `toyworld`
        "rlbooth_family": family,
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["rlbooth", "text-to-image", "diffusers", FAMILY_TAGS[family], "dreambooth"]
                + (["lora"] if lora else []) + (["ddpo", "rlhf"] if stage == "align" else []),
        "instance_prompt": one["instance_prompt"],
        "trigger_word": subject["identifier"],
    }
    if stage == "align":
        card["rewards"] = dict(metadata["reward"])
    return card


def write_model_card(model_dir: Path, stage_dir: Path, metadata: dict[str, Any]) -> Path:
    """Write `model_dir/README.md` (and the latest sample grid beside it as sample.png)."""
    card = card_metadata(metadata)
    sample = _latest_sample(stage_dir / "samples")
    if sample is not None:
        shutil.copyfile(sample, model_dir / SAMPLE)
        card["widget"] = [{"text": card["instance_prompt"], "output": {"url": SAMPLE}}]
    header = yaml.safe_dump(card, sort_keys=False, allow_unicode=True)
    (model_dir / CARD).write_text(f"---\n{header}---\n\n{_body(metadata, card, sample is not None)}")
    return model_dir / CARD


def _body(metadata: dict[str, Any], card: dict[str, Any], has_sample: bool) -> str:
    from rlbooth.families import get_family

    stage, prompt, word = metadata["stage"], card["instance_prompt"], card["trigger_word"]
    base, pipeline = card["rlbooth_base_model"], get_family(card["rlbooth_family"]).pipeline_class_name
    lines = [f"# {metadata['subject'].get('name') or prompt}: rlbooth {'stage one (DreamBooth)' if stage == 'personalize' else 'stage two (DDPO)'}",
             "", f"Trained with rlbooth on photos of one subject. "
             f"Prompt with the trigger word `{word}`, as in `{prompt}`.", ""]
    if has_sample:
        lines += [f"![sample grid]({SAMPLE})", ""]
    if stage == "align":
        lines += ["A LoRA trained by reinforcement learning (DDPO) on top of the stage-one model, to the rewards:", ""]
        lines += [f"- `{name}`: weight {weight}" for name, weight in card["rewards"].items()]
        lines += ["", "Load the stage-one model first, then this LoRA:", "", "```python",
                  f'pipe = {pipeline}.from_pretrained("{base}")',
                  'pipe.load_lora_weights("<stage-one model>", adapter_name="personalize")  # a LoRA stage one',
                  'pipe.load_lora_weights("<this repository>", adapter_name="align")',
                  'pipe.set_adapters(["personalize", "align"])', "```", ""]
    elif "lora" in card["tags"]:
        lines += ["```python", f'pipe = {pipeline}.from_pretrained("{base}")',
                  'pipe.load_lora_weights("<this repository>")', f'pipe("{prompt} on the beach").images[0]', "```", ""]
    else:
        lines += ["```python", f'pipe = {pipeline}.from_pretrained("<this repository>")',
                  f'pipe("{prompt} on the beach").images[0]', "```", ""]
    return "\n".join(lines)
