"""LoRA export for other tools: the single-file kohya layout that AUTOMATIC1111, Forge and ComfyUI load.

The factors are read from the stage's pipeline as rlbooth loads it (`load_stage_pipeline`), so the file
holds what `rlbooth sample` draws with. Each adapter's scale (alpha / rank, as peft applies it) is folded
into its up factor, and every module's `alpha` equals its rank: the file means the same in every loader.

Merged, a stage-two LoRA and its LoRA stage one become one adapter whose rank is the sum of theirs:
W + s1 B1 A1 + s2 B2 A2 = W + [s1 B1 | s2 B2] [A1 ; A2], which is exactly what the two adapters add when
both are on (stage two trained on top of stage one at full strength).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from rlbooth.errors import RlboothError
from rlbooth.models import public_name
from rlbooth.stages import ALIGN_ADAPTER, PERSONALIZE_ADAPTER, StageOutput, load_stage_pipeline, read_stage

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)

FORMATS = ("kohya",)
Factors = dict[str, "tuple[torch.Tensor, torch.Tensor]"]  # module name -> (down (r, in), up (out, r) x scale)


class ExportError(RlboothError, ValueError):
    """The stage cannot be exported as asked (a full fine-tune, a merge without two LoRAs, a bad format)."""


KOHYA_FAMILIES = ("sd", "sdxl")
"""The families whose kohya names (`lora_unet_*`, `lora_te*_*`) this export writes and its tests check."""


def stage_one_of(stage: StageOutput) -> StageOutput:
    return stage if stage.stage == "personalize" else read_stage(stage.metadata["stage_one"], "personalize")


def adapters_to_export(stage: StageOutput, merge: bool) -> list[str]:
    """The adapter names of `stage`'s pipeline that go into the file, checked before anything loads."""
    one = stage_one_of(stage)
    family = one.metadata.get("family", "sd")
    if family not in KOHYA_FAMILIES:
        raise ExportError(f"{stage.folder} is a {family} model: the kohya layout is written for "
                          f"{' and '.join(KOHYA_FAMILIES)} only (its names for the {family} transformer differ and "
                          f"are not checked here); use {stage.model_dir / 'pytorch_lora_weights.safetensors'}, "
                          "diffusers' layout, which the pipeline's load_lora_weights reads")
    one_is_lora = one.metadata["mode"] == "lora"
    if stage.stage == "personalize":
        if not one_is_lora:
            raise ExportError(f"{stage.folder} is a full fine-tune (personalize.mode=full): its model/ folder is a "
                              "whole diffusers pipeline, not a LoRA; train with personalize.mode=lora to export one")
        if merge:
            raise ExportError("--merge joins a stage-two LoRA with its stage-one LoRA: give a stage-two folder")
        return [PERSONALIZE_ADAPTER]
    if merge and not one_is_lora:
        raise ExportError(f"--merge needs a LoRA stage one, but {one.folder} is a full fine-tune: export the "
                          "stage-two LoRA alone and load it on top of that model")
    return [PERSONALIZE_ADAPTER, ALIGN_ADAPTER] if merge else [ALIGN_ADAPTER]


def lora_factors(model: "torch.nn.Module", adapter: str) -> Factors:
    """(down, scale x up) of every peft LoRA layer of `model` that holds `adapter`."""
    from peft.tuners.lora import LoraLayer

    factors = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            down = module.lora_A[adapter].weight.detach().float().cpu()
            up = module.lora_B[adapter].weight.detach().float().cpu() * module.scaling[adapter]
            factors[name] = (down, up)
    return factors


def merge_factors(parts: list[Factors]) -> Factors:
    """One adapter adding what all `parts` add: ranks concatenated per module."""
    import torch

    merged: Factors = {}
    for part in parts:
        for name, (down, up) in part.items():
            if name in merged:
                down0, up0 = merged[name]
                down, up = torch.cat([down0, down], dim=0), torch.cat([up0, up], dim=1)
            merged[name] = (down, up)
    return merged


def kohya_state_dict(components: dict[str, Factors]) -> dict[str, "torch.Tensor"]:
    """`{"unet": factors, "text_encoder": factors, ...}` in the kohya layout (`lora_unet_*`, `lora_te_*`;
    SDXL's two encoders `lora_te1_*`, `lora_te2_*`)."""
    from diffusers.utils import convert_state_dict_to_kohya

    peft_layout = {}
    for component, factors in components.items():
        for name, (down, up) in factors.items():
            if component != "unet" and not name.startswith("text_model."):
                name = f"text_model.{name}"  # transformers 5 dropped the wrapper that kohya's names keep
            peft_layout[f"{component}.{name}.lora_A.weight"] = down.contiguous()
            peft_layout[f"{component}.{name}.lora_B.weight"] = up.contiguous()
    kohya = convert_state_dict_to_kohya(peft_layout)
    if "text_encoder_2" in components:
        return kohya
    # diffusers names the SD 1.x text encoder `lora_te1_` (SDXL's style); kohya's own SD 1.x files say `lora_te_`.
    return {key.replace("lora_te1_", "lora_te_", 1): value for key, value in kohya.items()}


def export_lora(stage_dir: str | Path, output: str | Path, fmt: str = "kohya", merge: bool = False) -> Path:
    """Write the stage's LoRA (stage two merged onto stage one with `merge`) as one safetensors file."""
    from safetensors.torch import save_file

    from rlbooth.families import family_of
    from rlbooth.files import replacing

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    output = Path(output)
    if output.suffix != ".safetensors" or output.is_dir():
        raise ExportError(f"{output}: the kohya format is a single .safetensors file; name it so"
                          + (" (a folder of that name is in the way)" if output.is_dir() else ""))
    stage = read_stage(stage_dir)
    adapters = adapters_to_export(stage, merge)
    pipe = load_stage_pipeline(stage)
    components = {}
    for component in family_of(pipe).lora_components:
        parts = [lora_factors(getattr(pipe, component), adapter) for adapter in adapters]
        if any(parts):
            components[component] = merge_factors(parts)
    warn_ignored_modules(family_of(pipe).name, components.get("unet", {}))
    metadata = kohya_metadata(pipe, components) | {
        "rlbooth_stage": stage.stage, "rlbooth_adapters": ",".join(adapters),
        "rlbooth_base_model": public_name(stage_one_of(stage).base_model.pretrained)}
    with replacing(output) as tmp:
        save_file(kohya_state_dict(components), str(tmp), metadata=metadata)
    return output


def kohya_metadata(pipe: "DiffusionPipeline", components: dict[str, Factors]) -> dict[str, str]:
    """The fields sd-scripts writes and the clients read: AUTOMATIC1111 lists a file under the loaded checkpoint's
    base only if `ss_base_model_version` (`sdxl_*`) or `ss_v2` says it is that base (no field: SD 1). The rank is
    the largest module's (a merge sums ranks); alpha equals it, as every module's alpha equals its rank."""
    from rlbooth.families import family_of

    family = family_of(pipe).name
    v2 = family == "sd" and pipe.unet.config.cross_attention_dim == 1024  # SD 2.x: OpenCLIP ViT-H, 1024 wide
    rank = max(down.shape[0] for factors in components.values() for down, _ in factors.values())
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            "ss_base_model_version": "sdxl_base_v1-0" if family == "sdxl" else "sd_v2" if v2 else "sd_v1",
            "ss_v2": str(v2)}


CLIENT_IGNORED = {"sd-scripts": ("conv_in", "conv_out", "time_embedding.", "add_embedding."),
                  "diffusers' load_lora_weights (kohya layout)": ("add_embedding.",)}
"""UNet modules (diffusers names) that a named client drops from a kohya file without a word (diffusers reads
SDXL's `add_embedding` only from rlbooth's own `model/` layout)."""
A1111_SDXL_IGNORED = "up_blocks.0.upsamplers.0.conv"
"""SDXL's first upsampler conv: AUTOMATIC1111's SDXL key map has no entry for it."""


def warn_ignored_modules(family: str, unet: Factors) -> None:
    """Warn when the file carries trained modules that a named client ignores on load (the file is still
    written, for the clients that read them)."""
    for client, prefixes in CLIENT_IGNORED.items():
        dropped = sorted(name for name in unet if name.startswith(prefixes))
        if dropped:
            logger.warning("%s ignores %d trained module(s) of this file: %s", client, len(dropped),
                           ", ".join(dropped[:4]) + (" ..." if len(dropped) > 4 else ""))
    if family == "sdxl" and A1111_SDXL_IGNORED in unet:
        logger.warning("AUTOMATIC1111 ignores the trained module %s of this SDXL file", A1111_SDXL_IGNORED)
