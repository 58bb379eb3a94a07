"""`rlbooth plan`: what a config needs in memory in each stage, before any weight is loaded.

The model's components are built on the meta device from their configs (no weights, no download): the
released models' configs are small facts kept here, a local pipeline folder (and `tiny`) is read from its
own `config.json` files. Parameter counts are exact; weights, LoRA, gradients and AdamW state follow from
the dtypes the run stores them in. Activations are estimated by one forward on the meta device at the
run's resolution and batch, counting the bytes autograd saves for the backward pass (with gradient
checkpointing: the checkpointed blocks' inputs plus the largest block's own saved bytes, recomputed one
at a time). Not counted: reward models, the VAE's decoding transient, the allocator's fragmentation.
"""

from __future__ import annotations

import json
from unittest import mock
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from rlbooth.config import Config

GIB = 2**30

_CLIP_L = ("transformers", "CLIPTextModel", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                              "num_attention_heads": 12, "projection_dim": 768})
_CLIP_L_PROJ = ("transformers", "CLIPTextModelWithProjection", _CLIP_L[2])
_CLIP_G_PROJ = ("transformers", "CLIPTextModelWithProjection",
                {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                 "projection_dim": 1280, "hidden_act": "gelu"})
_T5_XXL = ("transformers", "T5EncoderModel", {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64,
                                               "num_layers": 24, "vocab_size": 32128, "feed_forward_proj": "gated-gelu"})
_VAE = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2}
_VAE_4 = ("diffusers", "AutoencoderKL", _VAE | {"latent_channels": 4})
_VAE_16 = ("diffusers", "AutoencoderKL", _VAE | {"latent_channels": 16, "use_quant_conv": False,
                                                 "use_post_quant_conv": False})

ARCHITECTURES: dict[str, dict[str, tuple[str, str, dict[str, Any]]]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {
        "unet": ("diffusers", "UNet2DConditionModel", {"sample_size": 64, "cross_attention_dim": 768}),
        "vae": _VAE_4, "text_encoder": _CLIP_L},
    "stabilityai/stable-diffusion-xl-base-1.0": {
        "unet": ("diffusers", "UNet2DConditionModel", {
            "sample_size": 128, "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True}),
        "vae": _VAE_4, "text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G_PROJ},
    "stabilityai/stable-diffusion-3.5-medium": {
        "transformer": ("diffusers", "SD3Transformer2DModel", {
            "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
            "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
            "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}),
        "vae": _VAE_16, "text_encoder": _CLIP_L_PROJ, "text_encoder_2": _CLIP_G_PROJ, "text_encoder_3": _T5_XXL},
    "black-forest-labs/FLUX.1-dev": {  # diffusers' FluxTransformer2DModel defaults are FLUX.1's shape
        "transformer": ("diffusers", "FluxTransformer2DModel", {"guidance_embeds": True}),
        "vae": _VAE_16, "text_encoder": _CLIP_L, "text_encoder_2": _T5_XXL},
}
"""The released models' component configs (from their `config.json` files on the Hub), by hub id."""

QUANTIZED_BYTES = {"none": None, "int8": 1.0, "nf4": 0.5 + 4 / 64}
"""Bytes per quantized Linear weight: int8 one byte (plus a scale per row, negligible); NF4 half a byte plus
a float32 absolute maximum per block of 64."""

DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}


def architecture(pretrained: str, tiny_folder: Callable[[], Path] | None = None) -> dict[str, tuple[str, str, dict]]:
    """The model components of a hub id this module knows, or of a local pipeline folder (read from it)."""
    if pretrained in ARCHITECTURES:
        return ARCHITECTURES[pretrained]
    folder = tiny_folder() if tiny_folder is not None else Path(pretrained)
    if not (folder / "model_index.json").is_file():
        from rlbooth.config import ConfigError

        raise ConfigError(f"model.pretrained={pretrained!r}: plan knows the shapes of {', '.join(ARCHITECTURES)}; "
                          "for another model pass its local diffusers folder (its config.json files suffice)")
    index = json.loads((folder / "model_index.json").read_text())
    components = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] not in ("diffusers", "transformers"):
            continue
        config_file = folder / name / "config.json"
        if config_file.is_file():
            components[name] = (spec[0], spec[1], json.loads(config_file.read_text()))
    return components


def build_meta(library: str, class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    """The component with meta tensors: its shapes without its memory."""
    import importlib

    cls = getattr(importlib.import_module(library), class_name)
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        return cls(cls.config_class(**config))


def count(model: torch.nn.Module) -> int:
    """Parameters and persistent buffers, tied ones once: what the checkpoint holds (SD3's position table is a
    buffer; T5's input embedding is tied to its shared table)."""
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() for t in unique.values())


def linear_weights(model: torch.nn.Module) -> int:
    """Elements of the Linear weights, the part a quantized base stores in int8 / NF4."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def lora_parameters(model: torch.nn.Module, rank: int, targets: list[str]) -> int:
    """Parameters of a LoRA of `rank` on the Linear modules peft matches by these names (a suffix match)."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


# --------------------------------------------------------------------------- activations


@dataclass
class SavedBytes:
    """Bytes autograd saves for the backward pass in one forward, and per checkpointable block."""

    total: int = 0
    blocks: list[tuple[int, int]] = field(default_factory=list)
    """(input bytes, saved bytes) of each block the model checkpoints when gradient checkpointing is on."""

    def checkpointed(self) -> int:
        """Saved bytes with checkpointing: outside the blocks, each block's inputs, one block recomputed."""
        inside = sum(saved for _, saved in self.blocks)
        return self.total - inside + sum(inputs for inputs, _ in self.blocks) + max(
            (saved for _, saved in self.blocks), default=0)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention as the fused kernels (flash, memory-efficient, torch's CPU flash) keep it
    for the backward pass: q, k, v, the output and a float32 log-sum-exp per query, never the score matrix
    (which the meta device's math fallback would save)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
                     ) -> torch.Tensor:
    return _FusedAttention.apply(query, key, value)


def saved_bytes(model: torch.nn.Module, forward: Callable[[], Any]) -> SavedBytes:
    """Run `forward` (a call of `model` with grad on) and count the activations it saves, once each."""
    own = {id(t) for t in (*model.parameters(), *model.buffers())}
    seen: set[int] = set()
    keep: list[torch.Tensor] = []  # keeps ids unique while counting
    result = SavedBytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) not in own and id(base) not in own and id(base) not in seen:
            seen.add(id(base))
            keep.append(base)
            result.total += _nbytes(base)
        return t

    def block(function: Callable[..., Any], *args: Any) -> Any:  # stands in for torch's checkpoint
        before = result.total
        out = function(*args)
        inputs = sum(_nbytes(a) for a in args if isinstance(a, torch.Tensor))
        result.blocks.append((inputs, result.total - before))
        return out

    model.enable_gradient_checkpointing(gradient_checkpointing_func=block)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_attention):
            forward()
    finally:
        model.disable_gradient_checkpointing()
    return result


def denoiser_inputs(family: str, model: torch.nn.Module, batch: int, latent: int,
                    text_width: dict[str, int]) -> dict[str, torch.Tensor]:
    """Meta inputs of one training forward of the denoiser at `latent` x `latent` latents."""
    meta = {"device": "meta", "dtype": next(model.parameters()).dtype}
    config = model.config
    if family in ("sd", "sdxl"):
        kwargs = {"sample": torch.empty(batch, config.in_channels, latent, latent, **meta),
                  "timestep": torch.zeros(batch, device="meta", dtype=torch.long),
                  "encoder_hidden_states": torch.empty(batch, 77, config.cross_attention_dim, **meta)}
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, pooled, **meta),
                                           "time_ids": torch.empty(batch, 6, **meta)}
        return kwargs
    tokens = text_width.get("t5_tokens", 256)
    common = {"timestep": torch.zeros(batch, device="meta"),
              "encoder_hidden_states": torch.empty(batch, tokens, config.joint_attention_dim, **meta),
              "pooled_projections": torch.empty(batch, config.pooled_projection_dim, **meta)}
    if family == "sd3":
        return common | {"hidden_states": torch.empty(batch, config.in_channels, latent, latent, **meta),
                         "encoder_hidden_states": torch.empty(batch, tokens + 77, config.joint_attention_dim, **meta)}
    packed = (latent // 2) ** 2
    return common | {"hidden_states": torch.empty(batch, packed, config.in_channels, **meta),
                     "img_ids": torch.empty(packed, 3, device="meta"), "txt_ids": torch.empty(tokens, 3, device="meta"),
                     "guidance": torch.ones(batch, device="meta") if config.guidance_embeds else None}


def activations(family: str, model: torch.nn.Module, batch: int, latent: int, rank: int, targets: list[str] | None,
                tokens: int) -> SavedBytes:
    """Saved bytes of one training forward of the denoiser (meta device), with a LoRA of `rank` on `targets`,
    or every weight trained when `targets` is None."""
    from rlbooth.models import add_lora

    if targets is None:
        model.requires_grad_(True)
    else:
        add_lora(model, rank, None, targets)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    kwargs = denoiser_inputs(family, model, batch, latent, {"t5_tokens": tokens})
    return saved_bytes(model, lambda: model(**kwargs))


# --------------------------------------------------------------------------- the plan


@dataclass
class Row:
    """One line of a stage's plan: a component's weights, or a training state."""

    name: str
    params: int
    dtype: str
    bytes: float
    resident: bool = True
    """On the device during training (else in host memory after set-up: `offload_encoders` and the like)."""


@dataclass
class StagePlan:
    stage: str
    rows: list[Row]
    activations: float
    savings: dict[str, bool]
    apart: tuple[str, ...] = ()
    """Rows never on the device with the text encoders: with the encoders offloaded (and frozen), every prompt is
    encoded before the denoiser and its training state come, and grids and class images draw from the embeddings."""

    @property
    def training(self) -> float:
        """Bytes on the device during a training pass: resident weights, training state, activations."""
        return sum(r.bytes for r in self.rows if r.resident) + self.activations

    @property
    def setup(self) -> float:
        """Bytes while the prompts are encoded: every component (grids redraw with them all), less `apart`."""
        return sum(r.bytes for r in self.rows if r.name not in self.apart)

    @property
    def peak(self) -> float:
        return max(self.training, self.setup)


def stage_rows(components: dict[str, torch.nn.Module], denoiser: str, frozen: int, quantization: str,
               full: bool, offloaded: tuple[str, ...], quantized: tuple[str, ...] = ()) -> list[Row]:
    """Weights of every component; the Linear weights of the denoiser and of the `quantized` components at the
    quantized size when quantized."""
    names = {2: "16-bit", 4: "fp32"}
    rows = []
    for name, model in components.items():
        n = count(model)
        if name == denoiser and full:
            rows.append(Row(name, n, "fp32 (trained)", 4 * n))
            continue
        nbytes, dtype = float(frozen * n), names[frozen]
        if name in (denoiser, *quantized) and QUANTIZED_BYTES[quantization] is not None:
            linear = linear_weights(model)
            nbytes, dtype = QUANTIZED_BYTES[quantization] * linear + frozen * (n - linear), f"{quantization} + {names[frozen]}"
        rows.append(Row(name, n, dtype, nbytes, resident=not name.startswith(offloaded)))
    return rows


def training_rows(trainable: int, optimizer_bytes: int, counted_weights: bool) -> list[Row]:
    """The trained weights (unless already a component's row), their gradients and AdamW's two moments."""
    weights = [] if counted_weights else [Row("LoRA weights", trainable, "fp32", 4 * trainable)]
    return weights + [Row("gradients", trainable, "fp32", 4 * trainable),
            Row("AdamW state", trainable, "8-bit" if optimizer_bytes == 2 else "fp32", optimizer_bytes * trainable)]


def plan(config: "Config") -> list[StagePlan]:
    """Stage one's and stage two's memory for this config, from the components built on the meta device."""
    from rlbooth.families import get_family
    from rlbooth.models import resolve_family, tiny_pipeline_folder

    model_cfg = config.model
    family = resolve_family(model_cfg) if model_cfg.pretrained not in ARCHITECTURES else None
    spec = architecture(model_cfg.pretrained,
                        (lambda: tiny_pipeline_folder(model_cfg.tiny, family)) if model_cfg.pretrained == "tiny" else None)
    family_name = model_cfg.family if model_cfg.family != "auto" else (family.name if family else _family_of(spec))
    denoiser = "transformer" if "transformer" in spec else "unet"
    frozen = DTYPE_BYTES[config.runtime.mixed_precision]
    vae_factor = 2 ** (len(spec["vae"][2].get("block_out_channels", [0] * 4)) - 1)
    t5 = next((cfg for name, (_, cls, cfg) in spec.items() if cls == "T5EncoderModel"), None)
    tokens = (512 if family_name == "flux" else 256) if t5 is not None else 77
    one, two = config.personalize, config.align

    plans = []
    for stage in ("personalize", "align"):
        components = {name: build_meta(*spec[name]) for name in spec}
        model = components[denoiser]
        if stage == "personalize":
            lora = one.mode == "lora"
            trainable = lora_parameters(model, one.lora_rank, one.lora_target_modules) if lora else count(model)
            batch = one.train_batch_size * (2 if one.with_prior_preservation else 1)
            resolution, checkpointing = one.resolution, one.gradient_checkpointing
            optimizer_bytes = 2 if one.use_8bit_adam else 8
            rank, targets, mode = one.lora_rank, one.lora_target_modules, one.mode
            offloaded = (("vae", "text_encoder") if not one.train_text_encoder else ("vae",)) \
                if one.offload_encoders else ()
        else:
            trainable = lora_parameters(model, two.lora_rank, two.lora_target_modules)
            cfg_batch = 2 if family_name != "flux" else 1
            batch = two.train_batch_size * two.timesteps_per_pass * cfg_batch
            resolution = one.resolution if family_name == "flux" else (model.config.get("sample_size") or 64) * vae_factor
            checkpointing, optimizer_bytes = two.gradient_checkpointing, 8
            rank, targets, mode = two.lora_rank, two.lora_target_modules, "lora"
            offloaded = ("text_encoder",) if two.offload_text_encoders else ()
        rows = stage_rows(components, denoiser, frozen, config.model.quantization, mode == "full", offloaded,
                          get_family(family_name).large_text_encoders if model_cfg.quantize_text_encoders else ())
        rows += training_rows(trainable, optimizer_bytes, counted_weights=mode == "full")
        if frozen != 4:
            model.to(dtype=torch.bfloat16)
        saved = activations(family_name, model, batch, resolution // vae_factor, rank,
                            targets if mode == "lora" else None, tokens)
        savings = {"gradient checkpointing": checkpointing, f"quantized base ({config.model.quantization})":
                   config.model.quantization != "none", "quantized text encoder": model_cfg.quantize_text_encoders,
                   "8-bit AdamW": optimizer_bytes == 2,
                   "encoders offloaded after caching": bool(offloaded)}
        apart = ()  # stage one encodes with the text encoders alone, stage two with the VAE beside them
        if offloaded and (stage == "align" or not one.train_text_encoder):
            apart = (denoiser, "LoRA weights", "gradients", "AdamW state") + (("vae",) if stage == "personalize" else ())
        plans.append(StagePlan(stage, rows, saved.checkpointed() if checkpointing else saved.total, savings, apart))
    return plans


def _family_of(spec: dict[str, tuple[str, str, dict]]) -> str:
    classes = {cls for _, cls, _ in spec.values()}
    if "FluxTransformer2DModel" in classes:
        return "flux"
    if "SD3Transformer2DModel" in classes:
        return "sd3"
    return "sdxl" if "text_encoder_2" in spec else "sd"


def render(plans: list[StagePlan]) -> str:
    """The plan as the text `rlbooth plan` prints."""
    lines = []
    for p in plans:
        lines.append(f"stage {'one (personalize)' if p.stage == 'personalize' else 'two (align)'}")
        lines.append(f"  {'component':<28}{'params':>14}  {'stored as':<22}{'GiB':>8}")
        for r in p.rows:
            where = "" if r.resident else "  (host memory while training)"
            lines.append(f"  {r.name:<28}{r.params:>14,}  {r.dtype:<22}{r.bytes / GIB:>8.2f}{where}")
        lines.append(f"  {'activations (estimate)':<28}{'':>14}  {'':<22}{p.activations / GIB:>8.2f}")
        start = "encoders before the denoiser" if p.apart else "all weights on the device"
        lines.append(f"  training {p.training / GIB:.2f} GiB, {start} {p.setup / GIB:.2f} GiB, "
                     f"peak {p.peak / GIB:.2f} GiB")
        lines.append("  savings: " + ", ".join(f"{k} {'on' if v else 'off'}" for k, v in p.savings.items()))
    return "\n".join(lines) + "\n"
