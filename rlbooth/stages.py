"""Reading a finished stage's output folder and loading the pipeline it describes.

A stage folder holds `rlbooth.json` (written last, so its presence means the stage finished) and
`model/`. Stage one's model is a full pipeline folder or a LoRA over its base model; stage two's is
a LoRA over stage one's model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rlbooth.config import Config, ModelConfig, from_dict
from rlbooth.errors import RlboothError
from rlbooth.subject import Subject

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

METADATA = "rlbooth.json"
PERSONALIZE_ADAPTER = "personalize"
ALIGN_ADAPTER = "align"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
REQUEST = "rlbooth-request.json"
"""What a stage (or the report) was started for, written when it starts: its checkpoints are resumed, and
its report reused, only for the same request."""


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


REQUIRED_KEYS = {"personalize": ("mode", "subject", "config"), "align": ("stage_one", "subject", "config")}
REDO = "rerun the stage into a new --output, or restore the folder from a copy"


def read_stage(folder: str | Path, expected: str | None = None) -> StageOutput:
    """A finished stage's metadata, checked with its weights' headers (and stage one's, for stage two),
    so a damaged folder is reported before any model is loaded."""
    from rlbooth.files import read_json

    folder = Path(folder)
    meta_path = folder / METADATA
    if not meta_path.is_file():
        raise StageError(f"{folder} is not a finished rlbooth stage output (no {METADATA}); "
                         "run `rlbooth personalize` into it first, or pass the folder it wrote")
    metadata = read_json(meta_path, "stage metadata", REDO, StageError)
    stage = metadata.get("stage") if isinstance(metadata, dict) else None
    if stage not in REQUIRED_KEYS:
        raise StageError(f"stage metadata {meta_path} names no rlbooth stage (`stage`: {stage!r}); {REDO}")
    missing = [key for key in REQUIRED_KEYS[stage] if key not in metadata]
    if missing:
        raise StageError(f"stage metadata {meta_path} lacks {missing}; {REDO}")
    if expected is not None and stage != expected:
        raise StageError(f"{folder} holds a {stage!r} stage, expected {expected!r}")
    if not (folder / "model").is_dir():
        raise StageError(f"{folder}/model is missing: the stage output is incomplete")
    check_weights(folder / "model", lora=stage == "align" or metadata["mode"] == "lora")
    if stage == "align":
        read_stage(metadata["stage_one"], "personalize")
    return StageOutput(folder, metadata)


def check_weights(model_dir: Path, lora: bool) -> None:
    """Every safetensors file of `model/` opens (header and size agree): truncated or corrupt ones are named."""
    from rlbooth.files import check_safetensors, read_json, require_file

    if lora:
        require_file(model_dir / LORA_WEIGHTS, "stage weights", REDO, StageError)
    else:
        read_json(model_dir / "model_index.json", "pipeline index", REDO, StageError)
    for path in sorted(model_dir.rglob("*.safetensors")):
        check_safetensors(path, "stage weights", REDO, StageError)


def load_stage_pipeline(stage: StageOutput, fuse: bool = False) -> "DiffusionPipeline":
    """The pipeline a stage produced, with its adapters active.

    `fuse` bakes stage one's LoRA into the weights (stage two then adds its own adapter on top,
    and switching that adapter off gives exactly the stage-one model).
    """
    from rlbooth.families import family_of
    from rlbooth.models import load_pipeline

    one = stage if stage.stage == "personalize" else read_stage(stage.metadata["stage_one"], "personalize")
    if one.metadata["mode"] == "full":
        pipe = load_pipeline(ModelConfig(pretrained=str(one.model_dir)))
    else:
        pipe = load_pipeline(one.base_model)
        load_lora(pipe, one.model_dir, PERSONALIZE_ADAPTER)
        if fuse:
            pipe.fuse_lora(components=family_of(pipe).lora_components, adapter_names=[PERSONALIZE_ADAPTER])
            pipe.unload_lora_weights()
    if stage.stage == "align":
        load_lora(pipe, stage.model_dir, ALIGN_ADAPTER)
        names = [ALIGN_ADAPTER] + ([PERSONALIZE_ADAPTER] if one.metadata["mode"] == "lora" and not fuse else [])
        pipe.set_adapters(names)
    return pipe


def load_lora(pipe: "DiffusionPipeline", model_dir: Path, adapter_name: str) -> None:
    """`pipe.load_lora_weights`, reading a file of the older mixed layout under peft's names."""
    from rlbooth.models import readable_lora
    from rlbooth.quiet import NO_TEXT_ENCODER_LORA, without_note

    with readable_lora(model_dir) as source, without_note(*NO_TEXT_ENCODER_LORA):
        pipe.load_lora_weights(source, adapter_name=adapter_name)


def is_finished(stage_dir: Path) -> bool:
    """The metadata is written last, so its presence means the stage's model is complete."""
    return (stage_dir / METADATA).is_file()


class OutputError(RlboothError, RuntimeError):
    """The output folder's state does not fit the request (finished already, or unfinished without --resume)."""


def check_output_dir(output_dir: Path, resume: bool, stage: str) -> None:
    """Refuse to overwrite a finished stage or to restart over an unfinished one's checkpoints; the checkpoint
    a resume would load must open."""
    from rlbooth.checkpoint import check_checkpoint, latest_checkpoint

    if is_finished(output_dir):
        raise OutputError(f"{output_dir} already holds a finished {stage} stage ({METADATA}); "
                          "choose another --output or remove it")
    latest = latest_checkpoint(output_dir / "checkpoints")
    if not resume and latest is not None:
        raise OutputError(f"{output_dir} holds checkpoints of an unfinished run: pass --resume to continue it, "
                          "or choose another --output")
    if latest is not None:
        check_checkpoint(latest)


def publish(output_dir: Path, write_model: "Callable[[Path], None]", metadata: dict[str, Any]) -> Path:
    """Write `model/` (with its model card) through a temporary folder, then the metadata that marks the stage finished.

    A kill in between leaves `model/` without `rlbooth.json`: the stage counts as unfinished and its rerun
    (from the last checkpoint, which holds the final step) publishes again.
    """
    from rlbooth.files import kill_point, replacing, write_text_atomic
    from rlbooth.model_card import write_model_card

    with replacing(output_dir / "model", ".model.tmp") as tmp:
        tmp.mkdir(parents=True)
        write_model(tmp)
        write_model_card(tmp, output_dir, metadata)
    kill_point("publish")
    write_text_atomic(output_dir / METADATA, json.dumps(metadata, indent=2))
    return output_dir / "model"


STAGE_FIELDS = {"personalize": ("model", "personalize", "runtime.seed", "runtime.mixed_precision")}
STAGE_FIELDS["align"] = STAGE_FIELDS["personalize"] + ("align",)
STAGE_FIELDS["report"] = STAGE_FIELDS["align"] + ("report",)
"""The config sections and fields that change each stage's result (besides the subject and, for stage two,
the stage-one folder); a finished stage or its checkpoints are reused only when these match."""
SAME_RESULT = {*(f"personalize.{name}" for name in (
    "checkpointing_steps", "checkpoints_total_limit", "gradient_checkpointing", "validation_steps",
    "validation_prompts", "validation_seeds", "validation_inference_steps", "validation_guidance_scale")),
    *(f"align.{name}" for name in ("checkpointing_epochs", "checkpoints_total_limit", "grid_prompts", "grid_seeds",
                                   "grid_every", "reward_thread", "compile_denoiser", "compile_mode"))}
"""Fields of those sections that only log, checkpoint or speed up: a resumed run may change them."""


def stage_request(stage: str, config: Config, subject: Subject, stage_one: Path | None = None) -> dict[str, Any]:
    """What decides `stage`'s result, as dotted keys: its `STAGE_FIELDS`, the subject, stage two's stage one."""
    from rlbooth.accel import flat_hparams

    fields = flat_hparams(config.to_dict())
    request = {key: value for key, value in fields.items() if key not in SAME_RESULT
               and any(key == f or key.startswith(f"{f}.") for f in STAGE_FIELDS[stage])}
    request |= flat_hparams(subject.to_dict(), "subject.")
    if stage_one is not None:
        request["stage_one"] = str(stage_one.resolve())
    return request


def made_with(folder: Path, stage: str) -> dict[str, Any] | None:
    """The request that made what `folder` holds and a rerun would reuse: a finished stage's metadata, or the
    request of its checkpoints (a stage) or of its index.html (the report); None where nothing is reused."""
    from rlbooth.accel import flat_hparams
    from rlbooth.checkpoint import latest_checkpoint
    from rlbooth.files import read_json

    if stage != "report" and is_finished(folder):
        metadata = read_json(folder / METADATA, "stage metadata", REDO, StageError)
        made = flat_hparams(metadata.get("config", {})) | flat_hparams(metadata.get("subject", {}), "subject.")
        return made | ({"stage_one": metadata["stage_one"]} if "stage_one" in metadata else {})
    started = (folder / "index.html").is_file() if stage == "report" else latest_checkpoint(folder / "checkpoints")
    if started and (folder / REQUEST).is_file():
        return read_json(folder / REQUEST, "run request", f"remove {folder} to start it over", StageError)
    return None


def claim_output(folder: Path, stage: str, request: dict[str, Any]) -> None:
    """Refuse to reuse a finished stage, checkpoints or a report that another request made (naming the keys that
    differ); then record `request` as what the folder is written for."""
    from rlbooth.files import write_text_atomic

    made = made_with(folder, stage)
    differing = sorted(key for key in request if made is not None and key in made and made[key] != request[key])
    if differing:
        shown = "; ".join(f"{key}: {made[key]!r} there, {request[key]!r} now" for key in differing[:6])
        more = f" and {len(differing) - 6} more" if len(differing) > 6 else ""
        what = {"report": "report"}.get(stage, "finished stage" if is_finished(folder) else "unfinished stage")
        raise OutputError(f"{folder} holds a {what} ({stage}) made with another config or subject, so it cannot "
                          f"be reused: {shown}{more}. Pass the config that made it, or choose another --output "
                          "for this one")
    if (stage == "report" or not is_finished(folder)) and os.environ.get("RANK", "0") == "0":  # one writer
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / REQUEST, json.dumps(request, indent=1))
