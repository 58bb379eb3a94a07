"""Loading the base pipeline (hub id, local folder, or the offline tiny model) and LoRA plumbing.

The tiny model is built from `ModelConfig.tiny`, saved as an ordinary diffusers folder and loaded
back with `from_pretrained`, so tests exercise the very code path that loads Stable Diffusion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rlbooth.config import LORA_INITS, Config, ConfigError, ModelConfig, TinyModelConfig
from rlbooth.errors import RlboothError
from rlbooth.families.tiny import tiny_tokenizer  # noqa: F401  (the tiny pipelines' tokenizer, for tests)
from rlbooth.stages import LORA_WEIGHTS

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

    from rlbooth.families import Family

TOYWORLD = "toyworld"
"""`model.pretrained` value naming the toy world's shipped base model (rlbooth.toyworld)."""
TOYWORLD_FLOW = "toyworld-flow"
"""`model.pretrained` value naming the toy world's shipped flow-matching model (SD3 classes)."""
SHIPPED = {TOYWORLD: "sd", TOYWORLD_FLOW: "sd3"}
"""The shipped base models and their families."""
logger = logging.getLogger(__name__)
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class ModelLoadError(RlboothError, RuntimeError):
    """The weights could not be had; the message says how to point at a local copy."""


def cache_dir() -> Path:
    """Where rlbooth keeps what it derives (tiny model, class images): `$RLBOOTH_CACHE` or ~/.cache/rlbooth."""
    return Path(os.environ.get("RLBOOTH_CACHE", Path.home() / ".cache" / "rlbooth"))


def model_key(cfg: ModelConfig) -> str:
    """A short stable name for the base model, used to key caches that depend on it."""
    if cfg.pretrained == "tiny":
        family = "sd" if cfg.family == "auto" else cfg.family  # SD keys stay as they were before families
        spec = json.dumps(cfg.tiny.__dict__ | ({} if family == "sd" else {"family": family}), sort_keys=True)
        return "tiny-" + hashlib.sha1(spec.encode()).hexdigest()[:10]
    if cfg.pretrained in SHIPPED:  # retrained weights must not reuse the old weights' class images
        folder = toyworld_folder(cfg.pretrained)
        denoiser = next(p for p in (folder / "unet", folder / "transformer") if p.is_dir())
        return f"{cfg.pretrained}-" + hashlib.sha1((denoiser / "diffusion_pytorch_model.safetensors")
                                                   .read_bytes()).hexdigest()[:10]
    name = f"{cfg.pretrained}@{cfg.revision or 'main'}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")[-80:]


def public_name(source: str) -> str:
    """`model.pretrained` as files meant for others may show it: a hub id as it is, a local folder by its name
    only (never the absolute path of someone's disk)."""
    path = Path(source).expanduser()
    return path.name if path.is_absolute() or path.exists() else source


def resolve_family(cfg: ModelConfig) -> "Family":
    """`model.family`, or the family of the pipeline class that the model's `model_index.json` names."""
    from rlbooth.families import FAMILIES, family_of_class, get_family

    if cfg.family != "auto":
        return get_family(cfg.family)
    if cfg.pretrained in SHIPPED:
        return get_family(SHIPPED[cfg.pretrained])
    if cfg.pretrained == "tiny":
        return get_family("sd")
    class_name = _pipeline_class_name(cfg)
    family = family_of_class(class_name)
    if family is None:
        known = ", ".join(f"{f.pipeline_class_name} ({name})" for name, f in FAMILIES.items())
        raise ModelLoadError(f"model.pretrained={cfg.pretrained!r} is a {class_name}, which rlbooth does not "
                             f"support (supported: {known}); if it is one of those under another name, "
                             "set model.family")
    return family


def _pipeline_class_name(cfg: ModelConfig) -> str:
    local = Path(cfg.pretrained)
    try:
        if local.exists():
            index = json.loads((local / "model_index.json").read_text())
        else:
            from diffusers import DiffusionPipeline

            index = DiffusionPipeline.load_config(cfg.pretrained, revision=cfg.revision)
        return str(index["_class_name"])
    except Exception as err:  # missing file, bad JSON, hub or network errors: all mean "cannot tell"
        raise ModelLoadError(
            f"model.pretrained={cfg.pretrained!r}: cannot read its model_index.json to tell the model family "
            f"({type(err).__name__}: {err}). Pass a diffusers pipeline folder (`hf download {cfg.pretrained} "
            "--local-dir /path/to/model`, then `--set model.pretrained=/path/to/model`), or set model.family"
        ) from err


def check_model(config: Config) -> "Family":
    """`model.*` and the family's switches checked before any weights load: a local folder that is missing,
    of another family than `model.family`, lacking a component, or a VAE folder that holds no AutoencoderKL."""
    cfg = config.model
    for key, source in (("model.pretrained", cfg.pretrained), ("model.vae", cfg.vae)):
        if source and _looks_local(source) and not Path(source).expanduser().exists():
            raise ModelLoadError(f"{key}={source!r}: no such folder (a hub id is `owner/name`); give the folder "
                                 "of a downloaded diffusers model")
    family = resolve_family(cfg)
    folder = Path(cfg.pretrained).expanduser()
    if cfg.pretrained not in (*SHIPPED, "tiny") and folder.is_dir():
        _check_pipeline_folder(folder, family, cfg.family)
    if cfg.vae and Path(cfg.vae).expanduser().is_dir():
        _check_vae_folder(Path(cfg.vae).expanduser())
    check_family_switches(config, family)
    if cfg.quantize_text_encoders and not family.large_text_encoders:
        raise ConfigError(f"model.quantize_text_encoders: the {family.name} family has no large text encoder to "
                          "quantize (SD3 and FLUX have T5-XXL, Qwen-Image and Z-Image a Qwen); remove it")
    targets = {"align.lora_target_modules": config.align.lora_target_modules}
    if config.personalize.mode == "lora":
        targets["personalize.lora_target_modules"] = config.personalize.lora_target_modules
    check_lora_targets(cfg, family, targets)
    return family


def check_lora_targets(cfg: ModelConfig, family: "Family", targets: dict[str, list[str]]) -> None:
    """Each LoRA target must name a layer of the denoiser, as peft matches it (the name or its last parts), or
    peft stops the run after the weights have loaded. The denoiser is built on the meta device from its
    config (no weights); a hub model whose shapes `rlbooth.plan` does not know is left to peft."""
    import torch

    from rlbooth.plan import ARCHITECTURES, architecture, build_meta

    if cfg.pretrained in SHIPPED:
        source: Path | None = toyworld_folder(cfg.pretrained)
    elif cfg.pretrained == "tiny":
        source = tiny_pipeline_folder(cfg.tiny, family)
    else:
        source = Path(cfg.pretrained).expanduser() if Path(cfg.pretrained).expanduser().is_dir() else None
    if source is None and cfg.pretrained not in ARCHITECTURES:
        return
    spec = architecture(cfg.pretrained) if source is None else architecture(str(source))
    if family.denoiser not in spec:
        return
    denoiser = build_meta(*spec[family.denoiser])
    layers = [name for name, m in denoiser.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for key, names in targets.items():
        for target in names:
            if not any(name == target or name.endswith("." + target) for name in layers):
                leaves = sorted({".".join(name.split(".")[-2 if name.split(".")[-1].isdigit() else -1:])
                                 for name in layers})
                raise ModelLoadError(f"{key}: {target!r} names no layer of the {family.denoiser} of "
                                     f"{cfg.pretrained!r}; its layers end in: {', '.join(leaves[:40])}"
                                     f"{' ...' if len(leaves) > 40 else ''} (a name or its last parts, e.g. "
                                     "to_q or attn1.to_q)")


def _looks_local(source: str) -> bool:
    """A path rather than a hub id (`owner/name`, exactly one slash, no leading `.`, `~` or `/`)."""
    return source.startswith((".", "~", "/", "\\")) or source.count("/") > 1 or (len(source) > 1 and source[1] == ":")


def _check_pipeline_folder(folder: Path, family: "Family", asked: str) -> None:
    from rlbooth.families import family_of_class
    from rlbooth.files import read_json

    hint = "give the folder that `hf download <id> --local-dir <folder>` wrote"
    index = read_json(folder / "model_index.json", "model.pretrained's pipeline index", hint, ModelLoadError)
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if class_name != family.pipeline_class_name:
        own = family_of_class(str(class_name))
        raise ModelLoadError(f"model.family={asked!r} needs a {family.pipeline_class_name}, but model.pretrained="
                             f"{str(folder)!r} is a {class_name} (its model_index.json); set model.family="
                             f"{own.name if own else 'auto'!r}" + ("" if own else " or use a supported model"))
    needed = [family.denoiser, "vae", "scheduler", *family.text_encoders, *family.tokenizers]
    missing = [name for name in needed if isinstance(index.get(name), list) and index[name][0] is not None
               and not (folder / name).is_dir()]
    if missing or not (folder / family.denoiser / "config.json").is_file():
        raise ModelLoadError(f"model.pretrained={str(folder)!r}: the pipeline folder lacks "
                             f"{missing or [family.denoiser + '/config.json']}: it is incomplete; {hint}")


def _check_vae_folder(folder: Path) -> None:
    from rlbooth.files import read_json

    if (folder / "model_index.json").is_file() and (folder / "vae").is_dir():
        raise ModelLoadError(f"model.vae={str(folder)!r} is a whole pipeline; pass its VAE: {folder / 'vae'}")
    config = read_json(folder / "config.json", "model.vae's config", "give a folder holding an AutoencoderKL "
                       "(config.json and its weights)", ModelLoadError)
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name != "AutoencoderKL":
        raise ModelLoadError(f"model.vae={str(folder)!r} holds a {class_name}, not an AutoencoderKL (the VAE "
                             "class of every supported family)")


FLOW_SWITCHES = ("personalize.timestep_density", "personalize.logit_mean", "personalize.logit_std",
                 "personalize.mode_scale", "personalize.flow_loss_weighting", "align.flow_noise_level",
                 "align.flow_noise_schedule", "align.ode_outside_window")
"""Fields read only by the flow-matching families (sd3, flux)."""
GUIDANCE_INPUT_SWITCHES = ("personalize.training_guidance",)
"""Fields read only by a guidance-distilled family (FLUX.1-dev's guidance input)."""


def check_family_switches(config: Config, family: "Family") -> None:
    """A switch set away from its default for a family that never reads it is an error, not a silent no-op."""
    default = Config()
    ignored = [*([] if family.flow_matching else FLOW_SWITCHES),
               *([] if not family.classifier_free_guidance else GUIDANCE_INPUT_SWITCHES)]
    for key in ignored:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value != getattr(getattr(default, section), name):
            raise ConfigError(f"{key}={value!r} has no effect on the {family.name} family (model.pretrained="
                              f"{config.model.pretrained!r}): it is read only by "
                              f"{'flow-matching families (sd3, flux)' if key in FLOW_SWITCHES else 'flux'}; "
                              "remove it, or set model.family")


def load_pipeline(cfg: ModelConfig, torch_dtype: "torch.dtype | None" = None) -> "DiffusionPipeline":
    """The base pipeline of the model's family, with `model.vae` in place of its own VAE when set."""
    family = resolve_family(cfg)
    if cfg.pretrained == "tiny":
        source = str(tiny_pipeline_folder(cfg.tiny, family))
    elif cfg.pretrained in SHIPPED:
        source = str(toyworld_folder(cfg.pretrained))
    else:
        source = cfg.pretrained
    local = Path(source).exists()
    extra = {"vae": load_vae(cfg.vae, torch_dtype)} if cfg.vae else {}
    quantized = cfg.quantization != "none"
    if quantized:
        from rlbooth.quantize import load_quantized_denoiser, load_quantized_text_encoder, require

        require(cfg.quantization)  # a missing package is not a missing model
    try:
        if quantized:
            extra[family.denoiser] = load_quantized_denoiser(source, family.denoiser, cfg.quantization,
                                                             revision=None if local else cfg.revision,
                                                             variant=cfg.variant, torch_dtype=torch_dtype)
            for name in family.large_text_encoders if cfg.quantize_text_encoders else ():
                extra[name] = load_quantized_text_encoder(source, name, cfg.quantization, torch_dtype=torch_dtype,
                                                          revision=None if local else cfg.revision, variant=cfg.variant)
        return family.load(source, revision=None if local else cfg.revision, variant=cfg.variant,
                           torch_dtype=torch_dtype, **extra)
    except Exception as err:  # hub, network and file errors come in many classes; all mean "no weights"
        if local:
            raise ModelLoadError(f"model.pretrained={source!r}: the folder is not a loadable diffusers "
                                 f"{family.pipeline_class_name} ({type(err).__name__}: {err})") from err
        raise ModelLoadError(
            f"model.pretrained={source!r}: could not load the weights from the Hugging Face hub "
            f"({type(err).__name__}: {err}). Without network access, or for a gated model, download it "
            f"where you can (`hf download {source} --local-dir /path/to/model`) and pass the folder: "
            f"`--set model.pretrained=/path/to/model`."
        ) from err


def load_vae(source: str, torch_dtype: "torch.dtype | None") -> "torch.nn.Module":
    """A VAE that replaces the pipeline's own (e.g. madebyollin/sdxl-vae-fp16-fix: SDXL's overflows in fp16)."""
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(source, torch_dtype=torch_dtype)
    except Exception as err:
        raise ModelLoadError(
            f"model.vae={source!r}: could not load an AutoencoderKL from it ({type(err).__name__}: {err}); "
            f"download it (`hf download {source} --local-dir /path/to/vae`) and pass the folder"
        ) from err


def toyworld_folder(name: str = TOYWORLD) -> Path:
    """A toy world pretrained pipeline (`toyworld` or `toyworld-flow`), shipped inside the package."""
    from rlbooth.toyworld.model import FLOW_WEIGHTS, WEIGHTS

    folder = FLOW_WEIGHTS if name == TOYWORLD_FLOW else WEIGHTS
    if not (folder / "model_index.json").is_file():
        family = "" if name == TOYWORLD else f" --family {SHIPPED[name]}"
        raise ModelLoadError(f"model.pretrained={name!r}: the shipped weights are missing from {folder}; "
                             f"reinstall rlbooth, or rebuild them with `python -m rlbooth.toyworld.pretrain"
                             f"{family} --out {folder}`")
    return folder


def tiny_pipeline_folder(cfg: TinyModelConfig, family: "Family") -> Path:
    """Build the tiny pipeline of a family once per spec into the cache; later calls reuse the folder."""
    folder = cache_dir() / "models" / model_key(ModelConfig(pretrained="tiny", tiny=cfg, family=family.name))
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    family.build_tiny(cfg).save_pretrained(tmp, safe_serialization=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first; its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def add_lora(model: "torch.nn.Module", rank: int, alpha: float | None, target_modules: list[str],
             adapter_name: str = "default", init: str = "ddpo") -> None:
    """Attach a peft LoRA adapter; only its weights are left trainable.

    B starts at zero with either `init`, so the model is unchanged at step 0; `init` picks A: `ddpo` draws
    N(0, 1/rank^2) (peft's "gaussian": the init of diffusers' old LoRALinearLayer, which ddpo-pytorch and
    diffusers' DreamBooth-LoRA scripts train from), `peft` peft's default kaiming-uniform (std 1/sqrt(3 fan_in)).
    A transformers model (the text encoder) gets the adapter from peft itself: transformers' own
    `add_adapter` refuses peft < 0.22 from 5.24 on, and pip finds no peft 0.22 (2026-12-02).
    """
    from diffusers import ModelMixin
    from peft import LoraConfig, inject_adapter_in_model

    if init not in LORA_INITS:
        raise ValueError(f"LoRA init must be one of {list(LORA_INITS)}, got {init!r}")
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=target_modules,
                        init_lora_weights="gaussian" if init == "ddpo" else True)
    if isinstance(model, ModelMixin):
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)


def lora_layers(model: "torch.nn.Module | None", adapter_name: str = "default") -> "dict | None":
    """An adapter's weights named as diffusers' `save_lora_weights` expects them, every module alike.

    `convert_state_dict_to_diffusers` renames only the attention projections (`to_q.lora.down`); the rest
    (convs, feed-forward, time embedding) kept peft's `lora_A`/`lora_B`, and diffusers' loader, seeing
    both layouts, dropped every renamed module (see `legacy_lora_layout`). So the rest is renamed the same
    way: with the default targets the file is what it always was.
    """
    if model is None:
        return None
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=adapter_name))
    return {key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): value
            for key, value in layers.items()}


def save_lora(folder: Path, family: "Family", models: "dict[str, torch.nn.Module]",
              adapter_name: str = "default") -> None:
    """Write `pytorch_lora_weights.safetensors` of the adapted `models` (by component name) in the layout
    `pipe.load_lora_weights(folder)` reads.

    The adapters' configs go in as metadata, so a loader applies the trained alpha / rank, not 1.
    """
    family.save_lora(folder, {name: lora_layers(model, adapter_name) for name, model in models.items()},
                     {name: model.peft_config[adapter_name].to_dict() for name, model in models.items()})


LEGACY_LORA_NAMES = {".lora.down.": ".lora_A.", ".lora.up.": ".lora_B.",
                     ".lora_linear_layer.down.": ".lora_A.", ".lora_linear_layer.up.": ".lora_B."}
"""diffusers' older LoRA names -> peft's; before issue 34 rlbooth wrote them for the attention projections only."""


def legacy_lora_layout(keys: Iterable[str]) -> bool:
    """Whether a LoRA file mixes diffusers' older names with peft's (`lora_A`/`lora_B`).

    diffusers' loader then renames nothing and drops every module under the older names (with wide
    `lora_target_modules`: all attention LoRAs), so such a file is read through `readable_lora`.
    """
    keys = list(keys)
    return (any(old in key for key in keys for old in LEGACY_LORA_NAMES)
            and any(".lora_A." in key or ".lora_B." in key for key in keys))


@contextmanager
def readable_lora(model_dir: Path) -> Iterator[Path]:
    """The folder to give `load_lora_weights`: `model_dir`, or for a mixed-layout file (see
    `legacy_lora_layout`) a temporary copy with every key under peft's names and the file's metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = model_dir / LORA_WEIGHTS
    with safe_open(str(path), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    if not legacy_lora_layout(keys):
        yield model_dir
        return
    logger.warning("%s names its attention LoRAs in diffusers' older layout next to peft's; it is read under "
                   "peft's names. To convert the file for other tools: %s", path, CONVERT_HINT.format(path=path))
    with tempfile.TemporaryDirectory(prefix="rlbooth-lora-") as tmp:
        save_file(peft_named(load_file(str(path))), str(Path(tmp) / LORA_WEIGHTS), metadata=metadata)
        yield Path(tmp)


def peft_named(state_dict: "dict[str, torch.Tensor]") -> "dict[str, torch.Tensor]":
    """Every key of a LoRA state dict under peft's names."""
    renamed = {}
    for key, value in state_dict.items():
        for old, new in LEGACY_LORA_NAMES.items():
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


CONVERT_HINT = "python -m rlbooth.models {path}"
"""How a user rewrites a mixed-layout LoRA file in place (`main` below)."""


def main(argv: "list[str] | None" = None) -> None:
    """`python -m rlbooth.models <pytorch_lora_weights.safetensors>`: rewrite a mixed-layout file under peft's names."""
    import sys

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from rlbooth.files import replacing

    for name in (sys.argv[1:] if argv is None else argv):
        path = Path(name)
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        with replacing(path) as tmp:
            save_file(peft_named(load_file(str(path))), str(tmp), metadata=metadata)
        print(f"{path}: every LoRA key now under peft's names")


if __name__ == "__main__":
    main()
