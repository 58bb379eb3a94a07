"""Reading a finished stage's output folder and loading the pipeline it describes.

A stage folder holds `rlbooth.json` (written last, so its presence means the stage finished) and
`model/`. Stage one's model is a full pipeline folder or a LoRA over its base model; stage two's is
a LoRA over stage one's model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlbooth.config import ModelConfig, from_dict
from rlbooth.errors import RlboothError
from rlbooth.subject import Subject

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

METADATA = "rlbooth.json"
PERSONALIZE_ADAPTER = "personalize"
ALIGN_ADAPTER = "align"


class StageError(RlboothError, ValueError):
    """A folder is not the finished output of the expected stage."""


@dataclass(frozen=True)
class StageOutput:
    folder: Path
    metadata: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.metadata["stage"]

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"

    @property
    def subject(self) -> Subject:
        data = dict(self.metadata["subject"])
        return Subject(**data)

    @property
    def base_model(self) -> ModelConfig:
        """The model stage one started from."""
        return from_dict(ModelConfig, self.metadata["config"]["model"], "model.")


def read_stage(folder: str | Path, expected: str | None = None) -> StageOutput:
    folder = Path(folder)
    meta_path = folder / METADATA
    if not meta_path.is_file():
        raise StageError(f"{folder} is not a finished rlbooth stage output (no {METADATA}); "
                         "run `rlbooth personalize` into it first, or pass the folder it wrote")
    metadata = json.loads(meta_path.read_text())
    if expected is not None and metadata.get("stage") != expected:
        raise StageError(f"{folder} holds a {metadata.get('stage')!r} stage, expected {expected!r}")
    if not (folder / "model").is_dir():
        raise StageError(f"{folder}/model is missing: the stage output is incomplete")
    return StageOutput(folder, metadata)


def load_stage_pipeline(stage: StageOutput, fuse: bool = False) -> "StableDiffusionPipeline":
    """The pipeline a stage produced, with its adapters active.

    `fuse` bakes stage one's LoRA into the weights (stage two then adds its own adapter on top,
    and switching that adapter off gives exactly the stage-one model).
    """
    from rlbooth.models import load_pipeline

    one = stage if stage.stage == "personalize" else read_stage(stage.metadata["stage_one"], "personalize")
    if one.metadata["mode"] == "full":
        pipe = load_pipeline(ModelConfig(pretrained=str(one.model_dir)))
    else:
        pipe = load_pipeline(one.base_model)
        pipe.load_lora_weights(one.model_dir, adapter_name=PERSONALIZE_ADAPTER)
        if fuse:
            pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=[PERSONALIZE_ADAPTER])
            pipe.unload_lora_weights()
    if stage.stage == "align":
        pipe.load_lora_weights(stage.model_dir, adapter_name=ALIGN_ADAPTER)
        names = [ALIGN_ADAPTER] + ([PERSONALIZE_ADAPTER] if one.metadata["mode"] == "lora" and not fuse else [])
        pipe.set_adapters(names)
    return pipe
