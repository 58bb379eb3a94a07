"""Pretrain a toy world base pipeline on a CPU: `python -m rlbooth.toyworld.pretrain [--family sd3] --out DIR`.

Two phases, each on freshly rendered images (the world is infinite, so nothing overfits):
1. the VAE, on world images and on random chequered textures (so it can draw a subject no
   caption shows, as SD's VAE draws things its captions never named);
2. the denoiser and the text encoders together, 10% empty captions for classifier-free guidance,
   EMA weights kept and saved. `--family sd` (the default, `weights/`): a UNet on epsilon prediction and
   Stable Diffusion's noise schedule. `--family sd3` (`weights-flow/`): an SD3 transformer on the
   flow-matching velocity with SD3's logit-normal timesteps; it reuses the shipped VAE (phase 1 skipped)
   and starts both CLIP encoders from the shipped one, so the two models see the same latents.
Then it draws the held-out compositions (colour x shape x scene combinations no caption showed)
and prints how often the background shows the asked scene: the figure the shipped weights are
judged by. The defaults reproduce the shipped folders (about 35 and 20 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rlbooth.personalize.data import tokenize
from rlbooth.toyworld import model, world

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    family: str = "sd"
    """`sd` (UNet, DDPM) or `sd3` (flow-matching transformer on the shipped VAE)."""
    seed: int = 0
    """Seed of the renderer, the initial weights and the noise."""
    vae_steps: int = 1200
    """VAE optimizer steps."""
    vae_batch_size: int = 32
    """Images per VAE step."""
    vae_learning_rate: float = 1e-3
    """VAE AdamW learning rate."""
    vae_kl_weight: float = 1e-6
    """Weight of the VAE's KL term (small, as in Stable Diffusion's VAE)."""
    steps: int = 3000
    """Denoiser + text encoder optimizer steps."""
    batch_size: int = 48
    """Images per denoiser step."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate of the denoiser and text encoders (cosine decay after 200 warm-up steps)."""
    empty_caption_ratio: float = 0.1
    """Share of captions replaced by the empty prompt, for classifier-free guidance."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights that are saved."""
    eval_steps: int = 20
    """DDIM steps of the held-out evaluation."""
    eval_guidance_scale: float = 4.0
    """Classifier-free guidance of the held-out evaluation."""
    eval_images_per_caption: int = 4
    """Images drawn per held-out caption."""


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> (B, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def texture_image(rng: random.Random) -> np.ndarray:
    """A shape filled with a random two-colour chequer or stripes on a random two-tone background."""
    colours = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(4)]
    rows, cols = np.mgrid[:world.SIZE, :world.SIZE]
    cell = rng.randint(2, 6)
    odd = ((rows // cell + cols // cell) % 2 if rng.random() < 0.5 else (rows // cell) % 2) == 1
    texture = np.empty((world.SIZE, world.SIZE, 3), np.uint8)
    texture[~odd], texture[odd] = colours[0], colours[1]
    image = np.empty_like(texture)
    image[:world.HORIZON], image[world.HORIZON:] = colours[2], colours[3]
    side = rng.randint(12, 20)
    top, left = rng.randint(4, world.SIZE - side - 4), rng.randint(2, world.SIZE - side - 2)
    mask = world.shape_mask(rng.choice(world.SHAPES), top, left, side)
    image[mask] = texture[mask]
    return image


def train_vae(cfg: PretrainConfig, rng: random.Random) -> "model.AutoencoderKL":
    vae = model.build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.vae_steps)
    bar = tqdm(range(cfg.vae_steps), desc="vae")
    for _ in bar:
        images = to_tensor([texture_image(rng) if rng.random() < 0.5 else world.render_caption(
            world.sample_caption(rng), rng) for _ in range(cfg.vae_batch_size)])
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(reconstruction, images)
        loss = mse + cfg.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # Stable Diffusion's convention: latents * scaling_factor have unit std
        latents = vae.encode(to_tensor([world.render_caption(world.sample_caption(rng), rng)
                                        for _ in range(256)])).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return vae


class _Objective:
    """What differs between the two denoisers' pretraining: the models, the conditioning, the loss."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.tokenizer = model.toy_tokenizer()
        if family == "sd3":
            self.denoiser = model.build_transformer()
            self.encoders = [_from_shipped(model.build_projected_text_encoder(self.tokenizer)) for _ in range(2)]
        else:
            from diffusers import DDPMScheduler

            self.denoiser, self.encoders = model.build_unet(), [model.build_text_encoder(self.tokenizer)]
            self.noise_scheduler = DDPMScheduler(**model.noise_scheduler_config())

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.denoiser.parameters(), *(p for e in self.encoders for p in e.parameters())]

    def loss(self, latents: torch.Tensor, texts: list[str], generator: torch.Generator) -> torch.Tensor:
        ids = tokenize(self.tokenizer, texts)
        noise = torch.randn(latents.shape, generator=generator)
        if self.family == "sd3":  # velocity target on SD3's logit-normal sigmas (no shift: see the scheduler)
            from rlbooth.families import get_family
            from rlbooth.families.sd3 import AbsentT5

            sigmas = torch.sigmoid(torch.randn(len(texts), generator=generator)).view(-1, 1, 1, 1)
            cond = get_family("sd3").encode([*self.encoders, AbsentT5(2 * model.TEXT_WIDTH)],
                                            [ids, ids, torch.zeros(len(texts), 0, dtype=torch.long)])
            noisy = (1 - sigmas) * latents + sigmas * noise
            prediction = self.denoiser(hidden_states=noisy, timestep=sigmas.flatten() * 1000,
                                       encoder_hidden_states=cond.hidden,
                                       pooled_projections=cond.added["pooled_projections"]).sample
            return torch.nn.functional.mse_loss(prediction, noise - latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(texts),),
                                  generator=generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = self.denoiser(noisy, timesteps, self.encoders[0](ids)[0]).sample
        return torch.nn.functional.mse_loss(prediction, noise)


def _from_shipped(encoder):
    """A projected CLIP encoder whose text model starts as the shipped UNet world's (the projection is new)."""
    from transformers import CLIPTextModel

    shipped = CLIPTextModel.from_pretrained(model.WEIGHTS / "text_encoder")
    encoder.text_model.load_state_dict(shipped.state_dict())  # transformers 5: CLIPTextModel is the text model
    return encoder


def train_denoiser(cfg: PretrainConfig, vae, rng: random.Random) -> _Objective:
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    objective = _Objective(cfg.family)
    params = objective.parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-4)
    schedule = get_cosine_schedule_with_warmup(optimizer, 200, cfg.steps)
    ema = EMAModel(params, decay=cfg.ema_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.steps), desc=objective.denoiser.__class__.__name__)
    for _ in bar:
        captions = [world.sample_caption(rng) for _ in range(cfg.batch_size)]
        with torch.no_grad():
            latents = vae.encode(to_tensor([world.render_caption(c, rng) for c in captions])).latent_dist
            latents = latents.sample(generator) * vae.config.scaling_factor
        texts = ["" if rng.random() < cfg.empty_caption_ratio else c.text() for c in captions]
        loss = objective.loss(latents, texts, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    objective.denoiser.eval()
    for encoder in objective.encoders:
        encoder.eval()
    return objective


def shipped_vae() -> "model.AutoencoderKL":
    """The UNet world's VAE with SD3's `shift_factor` (0: its latents are centred already)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model.WEIGHTS / "vae")
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def assemble(vae, trained: _Objective):
    """A pipeline of the family's own classes and folder layout (SD 1.5's, or SD3's without T5)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from rlbooth.families import get_family

    family = get_family(trained.family)
    if trained.family == "sd3":
        (clip_l, clip_g), tokenizer = trained.encoders, trained.tokenizer
        return family.pipeline_class(
            transformer=trained.denoiser, scheduler=FlowMatchEulerDiscreteScheduler(**model.flow_scheduler_config()),
            vae=vae, text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer,
            text_encoder_3=None, tokenizer_3=model.no_t5_tokenizer())
    scheduler = DDIMScheduler(**model.noise_scheduler_config(), set_alpha_to_one=False, steps_offset=1)
    return family.pipeline_class(vae=vae, text_encoder=trained.encoders[0], tokenizer=trained.tokenizer,
                                 unet=trained.denoiser, scheduler=scheduler, safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def heldout_scores(pipe, cfg: PretrainConfig) -> dict[str, float]:
    """Scene accuracy and alignment reward of the base model on the held-out compositions."""
    from rlbooth.families import family_of
    from rlbooth.toyworld.rewards import ToyAlignment, scene_accuracy

    prompts = [c.text() for c in world.heldout_captions() for _ in range(cfg.eval_images_per_caption)]
    generator = torch.Generator().manual_seed(cfg.seed)
    images = pipe(prompts, num_inference_steps=cfg.eval_steps, guidance_scale=cfg.eval_guidance_scale,
                  generator=generator, output_type="pt", **family_of(pipe).call_kwargs(pipe)).images
    return {"heldout_scene_accuracy": scene_accuracy(images, prompts).mean().item(),
            "heldout_alignment": ToyAlignment()(images, prompts, [{}] * len(prompts)).mean().item(),
            "heldout_images": len(prompts)}


def save(pipe, out: Path, record: dict) -> None:
    """Written to a temporary sibling, then renamed: a killed run leaves no half-written pipeline."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def pretrain(cfg: PretrainConfig, out: Path) -> dict:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    vae = shipped_vae() if cfg.family == "sd3" else train_vae(cfg, rng)
    pipe = assemble(vae, train_denoiser(cfg, vae, rng))
    pipe.set_progress_bar_config(disable=True)
    record = {"config": asdict(cfg), **heldout_scores(pipe, cfg)}
    save(pipe, out, record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help=f"pipeline folder to write (the shipped ones: {model.WEIGHTS}, {model.FLOW_WEIGHTS})")
    for name, default in asdict(PretrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = PretrainConfig(**{k: v for k, v in vars(args).items() if k != "out"})
    record = pretrain(cfg, args.out)
    print(f"held-out compositions: scene accuracy {record['heldout_scene_accuracy']:.3f}, "
          f"alignment {record['heldout_alignment']:.3f} over {record['heldout_images']} images; saved {args.out}")


if __name__ == "__main__":
    main()
