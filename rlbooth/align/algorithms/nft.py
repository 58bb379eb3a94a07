"""DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): reinforcement on the forward process.

An "old" policy samples with any sampler (a deterministic one by default) and only the clean latents are
kept. Training noises them afresh at the sampling timesteps and pulls the trained model's implicit positive
policy v+ = b v + (1 - b) v_old toward them in proportion to r = clip(A / A_max) / 2 + 1/2, and its implicit
negative policy v- = (1 + b) v_old - b v in proportion to 1 - r, each squared error weighted by its own mean
absolute error (the reference's adaptive weighting). Both mixtures are affine in the model output, and so is
the family's x0 prediction at a fixed timestep (flow: x_t - sigma v; DDPM: from epsilon or v), so the same
loss holds for SD 1.x and SDXL as for SD3 and FLUX.

The old policy is a snapshot of the stage-two LoRA, swapped into the one adapter to sample and to predict
(merged sampling, saving, and "adapter off = stage one" stay as they are); after each epoch it moves toward
the trained weights by the reference's decay schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from rlbooth.align.algorithms.base import Algorithm
from rlbooth.align.policy import ode_policy_for, policy_for
from rlbooth.align.rollout import Rollout, guidance_inputs, guided_noise
from rlbooth.families import Conditioning

AdvantageMode = Literal["all", "positive_only", "negative_only", "one_only", "binary"]
ADV_MODES: tuple[str, ...] = ("all", "positive_only", "negative_only", "one_only", "binary")

DECAY_TYPES: dict[int, tuple[int, float, float]] = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}
"""The reference's schedules of the old policy's decay: (flat steps, rate per step, cap); 0 copies."""

_WEIGHT_MIN = 1e-5


def old_decay(optimizer_steps: int, decay_type: int) -> float:
    """d in old <- d old + (1 - d) trained, after `optimizer_steps` optimizer steps of the run."""
    flat, rate, cap = DECAY_TYPES[decay_type]
    return min(max(optimizer_steps - flat, 0) * rate, cap)


def reward_weight(advantages: Tensor, mode: str, adv_clip_max: float) -> Tensor:
    """r in [0, 1], the weight of the positive policy's term: the clipped advantage mapped affinely, after the
    reference's advantage modes (keep only positive or negative ones, 1 for positive, or the sign)."""
    if mode == "positive_only":
        advantages = advantages.clamp(0, adv_clip_max)
    elif mode == "negative_only":
        advantages = advantages.clamp(-adv_clip_max, 0)
    elif mode == "one_only":
        advantages = (advantages > 0).to(advantages.dtype)
    elif mode == "binary":
        advantages = advantages.sign()
    elif mode != "all":
        raise ValueError(f"advantage mode must be one of {ADV_MODES}, got {mode!r}")
    return (advantages / adv_clip_max / 2 + 0.5).clamp(0, 1)


def nft_loss(output: Tensor, old_output: Tensor, x0: Tensor, r: Tensor, to_x0: Callable[[Tensor], Tensor], *,
             beta: float, adv_clip_max: float) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT's policy loss over a batch; `to_x0` maps a model output to its x0 prediction at each row's
    timestep. The info dict is for logging only (detached)."""
    dims = tuple(range(1, x0.ndim))
    old_output = old_output.detach()
    positive = to_x0(beta * output + (1 - beta) * old_output)
    negative = to_x0((1 + beta) * old_output - beta * output)
    with torch.no_grad():
        w_pos = (positive.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=_WEIGHT_MIN)
        w_neg = (negative.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=_WEIGHT_MIN)
    positive_loss = ((positive - x0) ** 2 / w_pos).mean(dim=dims)
    negative_loss = ((negative - x0) ** 2 / w_neg).mean(dim=dims)
    per_sample = (r * positive_loss + (1 - r) * negative_loss) / beta
    loss = (per_sample * adv_clip_max).mean().float()
    with torch.no_grad():
        info = {"positive_loss": positive_loss.mean().float(), "negative_loss": negative_loss.mean().float(),
                "r": r.float().mean()}
    return loss, info


class NFT(Algorithm):
    name = "nft"

    def __init__(self, trainer: Any) -> None:
        super().__init__(trainer)
        cfg = trainer.cfg
        size = trainer.latent_shape[1:]
        self.policy = (ode_policy_for(trainer.family, trainer.pipe, size) if cfg.nft_sampler == "ode"
                       else policy_for(trainer.family, trainer.pipe, cfg, size))
        self.old = [p.detach().clone() for p in trainer.params]  # the zero-B start: stage one samples epoch 0

    # ------------------------------------------------------------------ the old policy

    @contextmanager
    def _old_weights(self) -> Iterator[None]:
        """The old policy's tensors in the adapter inside the block, the trained ones put back after it."""
        params = self.trainer.params
        with torch.no_grad():
            trained = [p.detach().clone() for p in params]
            for p, old in zip(params, self.old):
                p.copy_(old)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(params, trained):
                    p.copy_(value)

    def sampling_weights(self) -> Any:
        return self._old_weights()

    def end_epoch(self, optimizer_steps: int) -> None:
        d = old_decay(optimizer_steps, self.trainer.cfg.nft_decay_type)
        with torch.no_grad():
            for old, p in zip(self.old, self.trainer.params):
                old.copy_(old * d + p.detach() * (1 - d))

    def tensors(self) -> dict[str, Tensor]:
        return {f"old.{i}": t for i, t in enumerate(self.old)}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for i, old in enumerate(self.old):
                old.copy_(tensors[f"old.{i}"])

    # ------------------------------------------------------------------ sampling

    def sampling_inputs(self, cond: Conditioning) -> tuple[Conditioning, float]:
        """The conditional rows alone at guidance 1 (CFG-free, the reference's default), else CFG's."""
        t, scale = self.trainer, self.trainer.cfg.nft_guidance_scale
        return (cond if scale == 1 else guidance_inputs(t.family, t.uncond, cond)), scale

    def keep(self, rollout: Rollout) -> Rollout:
        """The clean latents only (N, 1, C, H, W) and the sampling timesteps: no trajectory, no log-probs."""
        return Rollout(rollout.final[:, None].clone(), rollout.log_probs[:, :0], rollout.timesteps)

    # ------------------------------------------------------------------ training

    def noise(self, samples: Any, rows: Tensor, step: Tensor) -> Tensor:
        """Fresh forward-process noise, one generator per row keyed by (seed, epoch, pass, sample, step)."""
        t = self.trainer
        epoch, inner = t.pass_key
        gens = [torch.Generator(device=t.acc.device).manual_seed(
            hash((t.seed, epoch, inner, int(i), int(s), 1)) % 2**63)
            for i, s in zip(samples.indices[rows.cpu()], step.cpu())]
        return randn_tensor((len(rows), *t.latent_shape), generator=gens, device=t.acc.device, dtype=torch.float32)

    def loss(self, samples: Any, rows: Tensor, step: Tensor, advantages: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        t, cfg = self.trainer, self.trainer.cfg
        x0 = samples.latents[rows, -1].float()
        x_t = self.policy.add_noise(x0, self.noise(samples, rows, step), step)
        timestep = samples.timesteps[step]
        cond = samples.embeds[rows]
        scale = cfg.nft_guidance_scale

        def predict(unet: torch.nn.Module) -> Tensor:
            with t.acc.autocast():
                return guided_noise(t.family, unet, x_t, timestep, cond, scale)

        with self._old_weights(), torch.no_grad():
            old_output = predict(t.acc.unwrap_model(t.unet))
        output = predict(t.unet)
        loss, info = nft_loss(output, old_output, x0, reward_weight(advantages, cfg.nft_adv_mode, cfg.adv_clip_max),
                              lambda out: self.policy.predict_x0(out, step, x_t), beta=cfg.nft_beta,
                              adv_clip_max=cfg.adv_clip_max)
        if cfg.kl_coef > 0:
            with t.adapters_off() as unet:
                ref_output = guided_noise(t.family, unet, x_t, timestep, cond, scale)
            kl = ((output - ref_output) ** 2).mean(dim=tuple(range(1, x0.ndim))).mean()
            loss = loss + cfg.kl_coef * kl
            info["kl_stage_one"] = kl.detach()
        return loss, info

    def summary(self, logs: dict[str, Any]) -> str:
        return f"positive_loss {logs['positive_loss']:.3e}, negative_loss {logs['negative_loss']:.3e}"
