"""Stage one, end to end: check inputs, draw class images, encode, train, checkpoint, save.

Output folder layout:
    model/            the result: a diffusers pipeline folder (full) or pytorch_lora_weights.safetensors (lora)
    rlbooth.json      what was run (subject, prompts, config); written last, so it marks a finished stage
    checkpoints/      step-<N>/ folders for --resume
    samples/          validation grids, step-<N>.png
    logs/             TensorBoard event files
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlbooth import __version__
from rlbooth.accel import (backward_and_step, check_runtime, flat_hparams, log_grid, make_accelerator,
                           sampling_autocast, weight_dtype)
from rlbooth.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlbooth.config import Config, PersonalizeConfig
from rlbooth.families import Conditioning, Family, family_of
from rlbooth.families.base import latent_normalization
from rlbooth.images import check_images, list_images, save_image_atomic
from rlbooth.models import (TEXT_ENCODER_LORA_TARGETS, add_lora, cache_dir, check_model, load_pipeline, model_key,
                            save_lora)
from rlbooth.optim import OptimizerImpl, adamw
from rlbooth.personalize.class_images import generate_class_images
from rlbooth.personalize.data import DreamBoothData, encode_images
from rlbooth.personalize.objective import Objective, objective_for
from rlbooth.memory import frozen_modules, offload, on_device, to_device
from rlbooth.quantize import is_quantized
from rlbooth.sampling import Encoded, draw_grid, fixed_resolution
from rlbooth.lock import output_lock
from rlbooth.stages import check_output_dir, claim_output, publish, stage_request
from rlbooth.subject import Subject

logger = logging.getLogger(__name__)

def personalize(config: Config, subject: Subject, output_dir: str | Path, resume: bool = False) -> Path:
    """Run stage one into `output_dir` and return the folder of the saved model.

    The folder is locked for the run (rlbooth.lock), and its checkpoints are resumed only for the config and
    subject that wrote them (rlbooth.stages.claim_output).
    """
    output_dir = Path(output_dir)
    instance_paths = preflight(config, subject, output_dir, resume)
    with output_lock(output_dir):
        claim_output(output_dir, "personalize", stage_request("personalize", config, subject))
        return train(config, subject, output_dir, instance_paths, resume)


def train(config: Config, subject: Subject, output_dir: Path, instance_paths: list[Path], resume: bool) -> Path:
    cfg = config.personalize
    accelerator = make_accelerator(config.runtime, output_dir, cfg.gradient_accumulation_steps)
    # A quantized denoiser cannot be cast later: its other weights load in the frozen dtype.
    pipe = load_pipeline(config.model, weight_dtype(accelerator) if config.model.quantization != "none" else None)
    family = family_of(pipe)
    instance_prompt = subject.prompt(cfg.instance_prompt)
    class_prompt = subject.prompt(cfg.class_prompt, with_identifier=False)
    cast_frozen(pipe, family, cfg, weight_dtype(accelerator))
    encoded, prompts = None, None
    if encodes_first(cfg):
        encoded, prompts = encode_first(pipe, family, cfg, accelerator.device, instance_prompt, class_prompt, subject)
    to_device(pipe, accelerator.device, but=list(family.text_encoders) if encoded else [])

    class_paths = None
    if cfg.with_prior_preservation:
        # drawn where the grids are: the denoiser's native size, else the size trained at (FLUX's pipeline
        # would draw 1024 px for a 512 px run, four times the tokens)
        size = fixed_resolution(pipe, cfg.resolution)
        folder = Path(cfg.class_data_dir) if cfg.class_data_dir else default_class_dir(config, class_prompt, size)
        class_paths = generate_class_images(
            pipe, class_prompt, folder, cfg.num_class_images, seed=config.runtime.seed,
            num_inference_steps=cfg.class_generation_steps, guidance_scale=cfg.class_guidance_scale,
            batch_size=cfg.class_batch_size, accelerator=accelerator, encoded=encoded, resolution=size,
            autocast_dtype=sampling_autocast(accelerator))

    params = setup_trainable(pipe, family, cfg, config.runtime.seed)
    objective = objective_for(family, pipe, cfg)
    data = build_data(pipe, cfg, config.runtime.seed, instance_paths, class_paths, objective)
    if prompts is None:
        prompts = PromptInputs.build(pipe, family, cfg.train_text_encoder, instance_prompt,
                                     class_prompt if class_paths else None)
    offload(offloaded(pipe, family, cfg))

    optimizer = make_optimizer(params, cfg, config.runtime.optimizer_impl)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)
    trained = {family.denoiser: getattr(pipe, family.denoiser)} | (
        {name: getattr(pipe, name) for name in family.lora_text_encoders} if cfg.train_text_encoder else {})
    prepared = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    models = dict(zip(trained, prepared[:len(trained)]))
    optimizer, lr_scheduler = prepared[len(trained):]

    start_step = 0
    if resume and (ckpt := latest_checkpoint(output_dir / "checkpoints")) is not None:
        start_step = load_checkpoint(ckpt, accelerator, models, optimizer, lr_scheduler)["step"]
        logger.info("resumed from %s at step %d", ckpt, start_step)
    if accelerator.is_main_process:
        accelerator.init_trackers("personalize", config=flat_hparams(config.to_dict()))
        logger.info("stage one: %d instance + %d class images, %d steps x %d micro-batches x %d processes",
                    len(instance_paths), len(class_paths or []), cfg.max_train_steps,
                    cfg.gradient_accumulation_steps, accelerator.num_processes)

    loop = TrainLoop(accelerator, pipe, family, cfg, data, prompts, models, optimizer, lr_scheduler, subject,
                     output_dir, config.runtime.seed, objective, encoded)
    loop.run(start_step)
    model_dir = save_output(accelerator, config, subject, family, models, output_dir, instance_prompt, class_prompt)
    accelerator.end_training()
    return model_dir


def preflight(config: Config, subject: Subject, output_dir: Path, resume: bool) -> list[Path]:
    """Everything that can be checked before a model is loaded; returns the instance photos."""
    check_runtime(config.runtime)
    paths = check_images(subject.images, config.personalize.resolution)
    check_output_dir(output_dir, resume, "personalize")
    if config.personalize.class_data_dir and Path(config.personalize.class_data_dir).is_dir():
        existing = [p for p in Path(config.personalize.class_data_dir).iterdir() if not p.name.startswith(".")]
        if existing:
            check_images(Path(config.personalize.class_data_dir), 0)
    check_model(config)
    return paths


def default_class_dir(config: Config, class_prompt: str, resolution: int | None = None) -> Path:
    """The cache folder of a model's class images of a prompt; one per size where the size is chosen."""
    slug = "".join(c if c.isalnum() else "_" for c in class_prompt)[:60]
    size = f"-{resolution}px" if resolution else ""
    return cache_dir() / "class_images" / model_key(config.model) / f"{slug}-seed{config.runtime.seed}{size}"


def trained_encoders(pipe: Any, family: Family, cfg: PersonalizeConfig) -> list[torch.nn.Module]:
    return [getattr(pipe, name) for name in family.lora_text_encoders] if cfg.train_text_encoder else []


def cast_frozen(pipe: Any, family: Family, cfg: PersonalizeConfig, frozen_dtype: torch.dtype) -> None:
    """The weights that stay frozen, in `frozen_dtype` (quantized ones as they are) before they reach the device,
    so a 16-bit run never holds their full-precision copies there (class images are drawn in that dtype too)."""
    if frozen_dtype == torch.float32:
        return
    trained = trained_encoders(pipe, family, cfg) if cfg.mode == "full" else []
    frozen = [pipe.vae, *(e for e in family.text_encoder_modules(pipe) if not any(e is t for t in trained))]
    for module in frozen + ([getattr(pipe, family.denoiser)] if cfg.mode == "lora" else []):
        if not is_quantized(module):
            module.to(dtype=frozen_dtype)


def setup_trainable(pipe: Any, family: Family, cfg: PersonalizeConfig, seed: int) -> list[torch.nn.Parameter]:
    """Freeze, attach LoRA (seeded init) or unfreeze; trainable weights in fp32 (frozen ones: `cast_frozen`)."""
    denoiser = getattr(pipe, family.denoiser)
    text_encoders = family.text_encoder_modules(pipe)
    trained = trained_encoders(pipe, family, cfg)
    pipe.vae.requires_grad_(False)
    denoiser.requires_grad_(cfg.mode == "full")
    for encoder in text_encoders:
        encoder.requires_grad_(cfg.mode == "full" and any(encoder is e for e in trained))
    if cfg.mode == "lora":
        torch.manual_seed(seed)
        add_lora(denoiser, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
        for encoder in trained:
            add_lora(encoder, cfg.lora_rank, cfg.lora_alpha, TEXT_ENCODER_LORA_TARGETS)
    params = [p for m in (denoiser, *text_encoders) for p in m.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for encoder in trained:
            encoder.gradient_checkpointing_enable()
    return params


def build_data(pipe: Any, cfg: PersonalizeConfig, seed: int, instance_paths: list[Path],
               class_paths: list[Path] | None, objective: Objective) -> DreamBoothData:
    encode = lambda paths, desc: encode_images(pipe.vae, paths, cfg.resolution, cfg.center_crop, seed,
                                               desc=desc)
    shift, scale = latent_normalization(pipe.vae)
    return DreamBoothData(
        instance=encode(instance_paths, "encoding photos"),
        prior=encode(class_paths, "encoding class images") if class_paths else None,
        scaling_factor=scale, shift_factor=shift,
        draw_timesteps=objective.draw, batch_size=cfg.train_batch_size, seed=seed,
    )


@dataclass
class PromptInputs:
    """The two prompts as token ids (trained encoders) or as conditioning computed once (frozen encoders)."""

    family: Family
    ids: list[torch.Tensor]
    """Token ids per tokenizer, one row per prompt."""
    frozen: Conditioning | None

    @classmethod
    def build(cls, pipe: Any, family: Family, train_text_encoder: bool, instance_prompt: str,
              class_prompt: str | None) -> "PromptInputs":
        prompts = [instance_prompt] + ([class_prompt] if class_prompt else [])
        ids = family.tokenize(pipe, prompts)
        if train_text_encoder:
            return cls(family, ids, None)
        with torch.no_grad():
            return cls(family, ids, family.encode(family.text_encoder_modules(pipe), ids))

    def conditioning(self, text_encoders: list[torch.nn.Module], batch_size: int) -> Conditioning:
        """Instance prompt for the first `batch_size` rows, class prompt for the rest."""
        if self.frozen is not None:
            return self.frozen.repeat_interleave(batch_size)
        return self.family.encode(text_encoders, [ids.repeat_interleave(batch_size, dim=0) for ids in self.ids])


def encodes_first(cfg: PersonalizeConfig) -> bool:
    """Whether every prompt is encoded before the denoiser comes to the device (frozen encoders, offloaded)."""
    return cfg.offload_encoders and not cfg.train_text_encoder


def encode_first(pipe: Any, family: Family, cfg: PersonalizeConfig, device: Any, instance_prompt: str,
                 class_prompt: str, subject: Subject) -> tuple[Encoded, PromptInputs]:
    """The training prompts' conditioning and the embeddings of every prompt the run draws (class images,
    validation grids), from the text encoders alone on the device: the encoders and the denoiser never share
    the device (SD3.5's T5-XXL alone is 8.9 GiB)."""
    encoders = family.text_encoder_modules(pipe)
    for encoder in encoders:
        encoder.requires_grad_(False).to(device)
    texts = [class_prompt, *(subject.prompt(t) for t in cfg.validation_prompts)]
    with torch.no_grad():
        table = {text: family.encode_prompts(pipe, [text]) for text in dict.fromkeys(texts)}
        uncond = family.unconditional(pipe)
    prompts = PromptInputs.build(pipe, family, False, instance_prompt,
                                 class_prompt if cfg.with_prior_preservation else None)
    offload(encoders)
    denoiser = getattr(pipe, family.denoiser)

    def cond(batch: list[str]) -> Conditioning:  # in the denoiser's dtype of the moment (full precision until cast)
        return Conditioning.cat([table[t] for t in batch]).map(
            lambda t: t.to(denoiser.dtype) if t.is_floating_point() else t)

    return Encoded(cond, uncond.map(lambda t: t.to(denoiser.dtype) if t.is_floating_point() else t)), prompts


def offloaded(pipe: Any, family: Family, cfg: PersonalizeConfig) -> list[torch.nn.Module]:
    """What `personalize.offload_encoders` keeps in host memory: the VAE and the text encoders not trained."""
    if not cfg.offload_encoders:
        return []
    trained = list(family.lora_text_encoders) if cfg.train_text_encoder else []
    return frozen_modules(pipe, ["vae", *family.text_encoders], trained)


def make_optimizer(params: list[torch.nn.Parameter], cfg: PersonalizeConfig, impl: OptimizerImpl = "auto"
                   ) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("personalize.use_8bit_adam needs bitsandbytes: pip install 'rlbooth[8bit]'") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return adamw(params, impl, **kwargs)


class TrainLoop:
    """The optimizer-step loop with accumulation, clipping, logging, validation and checkpoints."""

    log_every: int = 50
    """Steps whose statistics are copied to the host together and then logged, each at its own step: reading
    every step's loss would make the host wait for the device at every step."""

    def __init__(self, accelerator, pipe, family: Family, cfg: PersonalizeConfig, data: DreamBoothData,
                 prompts: PromptInputs, models: dict[str, torch.nn.Module], optimizer, lr_scheduler,
                 subject: Subject, output_dir: Path, seed: int, objective: Objective, encoded: Encoded | None = None
                 ) -> None:
        self.accelerator, self.pipe, self.family, self.cfg = accelerator, pipe, family, cfg
        self.encoded = encoded  # the validation prompts' embeddings, where the text encoders stay in host memory
        self.data, self.prompts, self.objective = data, prompts, objective
        self.models, self.optimizer, self.lr_scheduler = models, optimizer, lr_scheduler
        self.subject, self.output_dir, self.seed = subject, output_dir, seed
        self.params = [p for m in models.values() for p in m.parameters() if p.requires_grad]

    def train_mode(self, on: bool) -> None:
        """Trained models in train mode for the steps (transformers checkpoints a text encoder's layers only
        in train mode), in eval mode for sampling."""
        for model in self.models.values():
            model.train(on)

    def run(self, start_step: int) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.train_mode(True)
        bar = tqdm(range(start_step, cfg.max_train_steps), initial=start_step, total=cfg.max_train_steps,
                   desc="personalize", disable=not acc.is_local_main_process)
        pending: list[tuple[int, dict[str, torch.Tensor], float]] = []
        for step in bar:
            for micro in range(cfg.gradient_accumulation_steps):
                logs = self.micro_step(step * cfg.gradient_accumulation_steps + micro)
            done = step + 1
            pending.append((done, logs, self.lr_scheduler.get_last_lr()[0]))
            checkpoint = done % cfg.checkpointing_steps == 0 or done == cfg.max_train_steps
            validate = cfg.validation_steps and (done % cfg.validation_steps == 0 or done == cfg.max_train_steps)
            if len(pending) >= self.log_every or checkpoint or validate:
                self.flush_logs(pending, bar)
            if checkpoint:
                save_checkpoint(acc, self.output_dir / "checkpoints", done, self.models, self.optimizer,
                                self.lr_scheduler, {"step": done}, cfg.checkpoints_total_limit)
            if validate:
                self.validate(done)
        bar.close()
        self.train_mode(False)

    def flush_logs(self, pending: list[tuple[int, dict[str, torch.Tensor], float]], bar: tqdm) -> None:
        """Log the pending (step, statistics, lr) entries, their tensors copied to the host in one transfer."""
        keys = list(pending[0][1])
        table = torch.stack([torch.stack([logs[k].float() for k in keys]) for _, logs, _ in pending]).cpu().tolist()
        for (done, _, lr), row in zip(pending, table):
            self.accelerator.log(dict(zip(keys, row)) | {"lr": lr}, step=done)
        bar.set_postfix(loss=f"{table[-1][keys.index('loss')]:.4f}")
        pending.clear()

    def micro_step(self, micro_step: int) -> dict[str, torch.Tensor]:
        """One accumulation micro-step; returns the loss and its parts as detached scalar tensors."""
        acc, cfg = self.accelerator, self.cfg
        batch = self.data.batch(micro_step, acc.process_index)
        denoiser = self.models[self.family.denoiser]
        latents, noise, index = (t.to(acc.device) for t in (batch.latents, batch.noise, batch.timesteps))
        encoders = [self.models.get(name, module) for name, module in
                    zip(self.family.text_encoders, self.family.text_encoder_modules(self.pipe))]
        with acc.accumulate(*self.models.values()):
            cond = self.prompts.conditioning(encoders, cfg.train_batch_size).to(acc.device)
            cond = self.family.with_guidance(self.family.with_geometry(cond, batch.geometry), cfg.training_guidance)
            noisy, timesteps = self.objective.inputs(latents, noise, index)
            pred = self.family.denoise(denoiser, noisy, timesteps, cond)
            loss, parts = self.objective.loss(pred, latents, noise, index, with_prior=self.data.prior is not None)
            backward_and_step(acc, loss, self.params, cfg.max_grad_norm, self.optimizer, self.lr_scheduler)
        return {"loss": loss.detach()} | {k: v.detach() for k, v in parts.items()}

    def validate(self, step: int) -> None:
        """A grid of validation prompts x seeds, on every process's model but written by the main one."""
        cfg, acc = self.cfg, self.accelerator
        if not acc.is_main_process:
            acc.wait_for_everyone()
            return
        prompts = [self.subject.prompt(t) for t in cfg.validation_prompts]
        self.train_mode(False)
        back = [self.pipe.vae] if self.encoded else offloaded(self.pipe, self.family, cfg)
        with on_device(back, acc.device):
            grid = draw_grid(self.pipe, prompts, cfg.validation_seeds, cfg.validation_inference_steps,
                             cfg.validation_guidance_scale, autocast_dtype=sampling_autocast(acc),
                             resolution=fixed_resolution(self.pipe, cfg.resolution), encoded=self.encoded)
        self.train_mode(True)
        save_image_atomic(grid, self.output_dir / "samples" / f"step-{step}.png")
        log_grid(acc, "validation", grid, step)
        acc.wait_for_everyone()


def save_output(accelerator, config: Config, subject: Subject, family: Family, models: dict[str, torch.nn.Module],
                output_dir: Path, instance_prompt: str, class_prompt: str) -> Path:
    """Write `model/` (atomically, through a temporary folder) and then the metadata that marks it finished."""
    cfg = config.personalize
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = {name: accelerator.unwrap_model(model) for name, model in models.items()}

        def write_model(folder: Path) -> None:
            if cfg.mode == "lora":
                save_lora(folder, family, trained)
                return
            base = load_pipeline(config.model)  # the frozen parts exactly as they were, in full precision
            for name, model in trained.items():
                setattr(base, name, model.to(torch.float32))
            base.save_pretrained(folder, safe_serialization=True)

        publish(output_dir, write_model, {
            "stage": "personalize", "rlbooth_version": __version__, "mode": cfg.mode, "family": family.name,
            "base_model": config.model.pretrained, "subject": subject.to_dict(),
            "instance_prompt": instance_prompt, "class_prompt": class_prompt,
            "num_instance_images": len(list_images(subject.images)), "steps": cfg.max_train_steps,
            "config": config.to_dict(),
        })
    accelerator.wait_for_everyone()
    return output_dir / "model"
