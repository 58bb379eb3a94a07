"""Stage two, end to end: a stage-two algorithm (`align.algorithm`: DDPO / Flow-GRPO's importance-clipped PPO
objective, DiffusionNFT, or reward feedback learning; rlbooth.align.algorithms) on a personalized model.

Each epoch samples (rewards of one batch computed while the next one samples), turns global rewards into
per-prompt advantages, then trains a fresh LoRA on what the algorithm stored. The loop is the same for every
algorithm; the algorithm decides the sampler, what is stored, the loss and its end-of-epoch update.
Stage one's personalization is fused into the weights, so it stays on throughout; the new
adapter starts at zero, so epoch 0 samples exactly the stage-one model.

Every random draw is keyed by (seed, epoch, global sample index), so a run resumed from a
checkpoint, or run on another number of processes, draws the same samples.

Output folder layout:
    model/pytorch_lora_weights.safetensors   the stage-two LoRA (load it on top of stage one's model)
    rlbooth.json                             what was run, the per-epoch history; written last
    checkpoints/step-<epoch>/                for --resume
    samples/epoch-<N>.png                    fixed prompts x seeds, drawn with the current LoRA
    best/epoch-<N>.safetensors               align.keep=best: the best evaluated LoRA a checkpoint names
    logs/                                    TensorBoard
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rlbooth import __version__
from rlbooth.accel import (backward_and_step, check_runtime, flat_hparams, log_grid, make_accelerator,
                           sampling_autocast, weight_dtype)
from rlbooth.align.algorithms import make_algorithm
from rlbooth.align.heldout import HeldoutEvaluator, Watch
from rlbooth.align.merge import merged_lora
from rlbooth.align.policy import StepPolicy
from rlbooth.align.ppo import (PerPromptStatTracker, batch_advantages, clip_advantages, group_advantages,
                              per_reward_advantages)
from rlbooth.align.rollout import Rollout, decode, sample_rollout
from rlbooth.align.steps import trained_steps, window_steps
from rlbooth.checkpoint import (latest_checkpoint, load_checkpoint, load_extra_tensors, save_checkpoint,
                                trainable_parameters)
from rlbooth.config import AlignConfig, Config, ConfigError
from rlbooth.images import save_image_atomic
from rlbooth.models import add_lora, check_lora_targets, resolve_family, save_lora
from rlbooth.memory import frozen_modules, offload, to_device
from rlbooth.optim import adamw
from rlbooth.families import Conditioning, family_of
from rlbooth.families.base import latent_channels, square_geometry
from rlbooth.prompts import Prompt, PromptSampler, default_prompt_set, expand, heldout_prompt_set, read_prompt_file
from rlbooth.quantize import is_quantized
from rlbooth.rewards import CompositeReward
from rlbooth.rewards.composite import check_composite
from rlbooth.sampling import Encoded, draw_grid, fixed_resolution
from rlbooth.subject import Subject
from rlbooth.stages import ALIGN_ADAPTER, StageOutput, check_output_dir, load_stage_pipeline, publish, read_stage

logger = logging.getLogger(__name__)


def _seed(*parts: int) -> int:
    return hash(parts) % 2**63


@dataclass
class Samples:
    """One epoch's samples on this process, as the algorithm keeps them, with nothing recomputed."""

    latents: torch.Tensor      # (N, T+1, C, H, W) trajectories (ppo, refl); (N, 1, C, H, W) clean latents (nft)
    log_probs: torch.Tensor    # (N, T) (zeros for refl's deterministic steps); (N, 0) for nft
    timesteps: torch.Tensor    # (T,)
    embeds: Conditioning       # (N rows) conditional prompt inputs of the denoiser
    indices: torch.Tensor      # (N,) global sample indices within the epoch
    rewards: torch.Tensor      # (N,)
    components: dict[str, torch.Tensor]

    @classmethod
    def concat(cls, rollouts: list[Rollout], embeds: list[Conditioning], indices: list[torch.Tensor],
               scored: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> "Samples":
        return cls(
            latents=torch.cat([r.latents for r in rollouts]), log_probs=torch.cat([r.log_probs for r in rollouts]),
            timesteps=rollouts[0].timesteps, embeds=Conditioning.cat(embeds), indices=torch.cat(indices),
            rewards=torch.cat([total for total, _ in scored]),
            components={name: torch.cat([parts[name] for _, parts in scored]) for name in scored[0][1]},
        )


def epoch_means(stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Mean of each statistic over an epoch's training steps, from one device-to-host copy.

    Averages the values' float64 copies with numpy, the numbers that averaging each `.item()` gave.
    """
    if not stats:
        return {}
    table = torch.stack([torch.stack(values).float() for values in stats.values()]).cpu().double().numpy()
    return {key: float(np.mean(row)) for key, row in zip(stats, table)}


def align(config: Config, stage_one_dir: str | Path, output_dir: str | Path, resume: bool = False) -> Path:
    """Run stage two on stage one's output; returns the folder of the saved LoRA."""
    output_dir = Path(output_dir)
    stage_one, templates = preflight(config, Path(stage_one_dir), output_dir, resume)
    cfg = config.align
    accelerator = make_accelerator(config.runtime, output_dir, cfg.passes_per_optimizer_step)
    context = {"device": str(accelerator.device), "dtype": str(weight_dtype(accelerator)).removeprefix("torch."),
               "subject": stage_one.subject}
    with CompositeReward(cfg.reward, cfg.reward_options, executor_workers=reward_workers(cfg, accelerator.device),
                         context=context, offload_models=cfg.offload_rewards) as reward:
        eval_reward = None if cfg.eval_rewards is None else CompositeReward(
            cfg.eval_rewards, eval_reward_options(cfg), context=context, offload_models=cfg.offload_rewards)
        trainer = DDPOTrainer(config, accelerator, stage_one, templates, reward, output_dir, eval_reward)
        start_epoch = trainer.restore() if resume else 0
        trainer.log_plan()
        for epoch in range(start_epoch, cfg.num_epochs):
            if trainer.watch.should_stop():
                break
            trainer.run_epoch(epoch)
        model_dir = trainer.save_output()
    accelerator.end_training()
    return model_dir


def eval_reward_options(cfg: AlignConfig) -> dict[str, dict[str, Any]]:
    """Options of the evaluation rewards: align.eval_reward_options over align.reward_options."""
    return {name: cfg.reward_options.get(name, {}) | cfg.eval_reward_options.get(name, {})
            for name in cfg.eval_rewards or cfg.reward}


def eval_prompt_file(config: Config, subject: Subject) -> str:
    """align.eval_prompt_file, else report.prompt_file, else the held-out set for the subject's kind."""
    return config.align.eval_prompt_file or config.report.prompt_file or heldout_prompt_set(subject)


def reward_workers(cfg: AlignConfig, device: torch.device) -> int:
    """Reward threads: one where scoring overlaps sampling (align.reward_thread; by default on CUDA only)."""
    return int(cfg.reward_thread if cfg.reward_thread is not None else device.type == "cuda")


def merges_lora(config: Config) -> bool:
    """Whether sampling runs with the LoRA merged (align.merge_lora_for_sampling; by default with float32 weights)."""
    merge, full_precision = config.align.merge_lora_for_sampling, config.runtime.mixed_precision == "no"
    if merge and not full_precision:
        raise ConfigError(f"align.merge_lora_for_sampling: needs runtime.mixed_precision=no (got "
                          f"{config.runtime.mixed_precision!r}): the small LoRA delta added to half-precision "
                          "weights would be rounded away; leave it null")
    return full_precision if merge is None else merge


def preflight(config: Config, stage_one_dir: Path, output_dir: Path, resume: bool
              ) -> tuple[StageOutput, list[str]]:
    """Everything checkable before a model is loaded: runtime, rewards, stage-one folder, prompts, output state."""
    check_runtime(config.runtime)
    merges_lora(config)
    check_composite(config.align.reward, config.align.reward_options, config.align.reward_modules,
                    differentiable=config.align.algorithm == "refl")
    stage_one = read_stage(stage_one_dir, "personalize")
    base = stage_one.base_model
    check_lora_targets(base, resolve_family(base), {"align.lora_target_modules": config.align.lora_target_modules})
    templates = read_prompt_file(config.align.prompt_file or default_prompt_set(stage_one.subject))
    if config.align.eval_every:
        read_prompt_file(eval_prompt_file(config, stage_one.subject))
        if config.align.eval_rewards is not None:
            check_composite(config.align.eval_rewards, eval_reward_options(config.align))
    check_output_dir(output_dir, resume, "align")
    return stage_one, templates


class DDPOTrainer:
    """Holds the models and state of one stage-two run; `run_epoch` is the whole algorithm."""

    def __init__(self, config: Config, accelerator, stage_one: StageOutput, templates: list[str],
                 reward: CompositeReward, output_dir: Path, eval_reward: CompositeReward | None = None) -> None:
        from diffusers.optimization import get_scheduler

        self.config, self.cfg, self.acc = config, config.align, accelerator
        self.stage_one, self.subject, self.reward, self.output_dir = stage_one, stage_one.subject, reward, output_dir
        self.seed = config.runtime.seed
        self.pipe = load_stage_pipeline(stage_one, fuse=True)
        self.family = family_of(self.pipe)
        denoiser = getattr(self.pipe, self.family.denoiser)  # the UNet, or the transformer of a flow model
        self._freeze(denoiser, weight_dtype(accelerator))
        self._encode_prompts(templates, denoiser, eval_reward or reward)
        self._add_lora(denoiser)
        params = [p for p in denoiser.parameters() if p.requires_grad]
        optimizer = adamw(params, config.runtime.optimizer_impl, lr=self.cfg.learning_rate,
                          weight_decay=self.cfg.adam_weight_decay)
        lr_scheduler = get_scheduler("constant", optimizer=optimizer)
        # `unet` names the prepared denoiser whatever its kind, as diffusers' training scripts do.
        self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
        self.denoiser, self.params = denoiser, params
        self.merge_lora = merges_lora(config)
        # Compiled once; the module's weights are read at each call, so training's updates reach it.
        self.compiled = torch.compile(denoiser, mode=self.cfg.compile_mode) if self.cfg.compile_denoiser else None
        self.sampler = PromptSampler(templates, self.subject, self.cfg.identifier_ratio, self.seed)
        self.tracker = PerPromptStatTracker(self.cfg.stat_buffer_size, self.cfg.stat_min_count)
        self.history: list[dict[str, float]] = []
        self.epoch_seconds: dict[str, list[float]] = {"wall": [], "cpu": []}
        """Wall and process CPU time of each epoch's sampling, rewards and training (not the evaluation, grids or
        checkpoints), kept apart from the history, which a resumed run reproduces exactly. With one thread the CPU
        time is the wall time the epoch takes on an idle machine, whatever else shares it."""
        self.watch = Watch(self.cfg, output_dir / "best")
        self.pass_key = (0, 0)  # (epoch, inner epoch) of the training pass running: keys NFT's noise
        self.algorithm = make_algorithm(self.cfg.algorithm, self)

    def _freeze(self, denoiser: torch.nn.Module, frozen_dtype: torch.dtype) -> None:
        for module in (self.pipe.vae, *self.family.text_encoder_modules(self.pipe), denoiser):
            module.requires_grad_(False)
            if frozen_dtype != torch.float32 and not is_quantized(module):
                module.to(dtype=frozen_dtype)

    def _encode_prompts(self, templates: list[str], denoiser: torch.nn.Module, eval_reward: CompositeReward) -> None:
        """Puts the pipeline on the device and makes the unconditional input; with `align.offload_text_encoders`,
        encodes every prompt the run will draw (training, grid, held-out) before the denoiser comes to the
        device, then moves the text encoders to host memory for good: the two never share the device."""
        device, offloading = self.acc.device, self.cfg.offload_text_encoders
        to_device(self.pipe, device, but=[self.family.denoiser] if offloading else [])
        factor = self.pipe.vae_scale_factor
        # FLUX's transformer has no native size: it samples at the resolution stage one trained at.
        size = denoiser.config.get("sample_size") or \
            self.stage_one.metadata["config"]["personalize"]["resolution"] // factor
        self.latent_shape = (latent_channels(self.pipe.vae), size, size)
        self.resolution = size * factor
        self.geometry = square_geometry(self.resolution)
        self._embeds: dict[str, Conditioning] = {}
        with torch.no_grad():
            self.uncond = self.family.with_geometry(self.family.unconditional(self.pipe), self.geometry)
        self.evaluator = HeldoutEvaluator(self.cfg, self.subject, eval_prompt_file(self.config, self.subject),
                                          eval_reward) if self.cfg.eval_every else None
        if offloading:
            self.embed([p.text for p in expand(templates, self.subject)] + self.grid_texts +
                       ([p.text for p in self.evaluator.prompts] if self.evaluator else []))
            offload(self.offloaded)
            denoiser.to(device)

    def _add_lora(self, denoiser: torch.nn.Module) -> None:
        cfg = self.cfg
        torch.manual_seed(self.seed)
        add_lora(denoiser, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules, adapter_name=ALIGN_ADAPTER,
                 init=cfg.lora_init)
        for p in denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if cfg.gradient_checkpointing:  # only passes with grad enabled recompute: sampling is unaffected
            denoiser.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ state

    @property
    def offloaded(self) -> list[torch.nn.Module]:
        """The text encoders `align.offload_text_encoders` keeps in host memory after the start."""
        return frozen_modules(self.pipe, list(self.family.text_encoders), []) if self.cfg.offload_text_encoders else []

    @property
    def encoded(self) -> Encoded | None:
        """What grids and held-out sets draw from while the text encoders are offloaded."""
        return Encoded(self.embed, self.uncond) if self.cfg.offload_text_encoders else None

    @property
    def grid_texts(self) -> list[str]:
        return [self.subject.prompt(t) for t in self.cfg.grid_prompts]

    def models(self) -> dict[str, torch.nn.Module]:
        return {self.family.denoiser: self.unet}

    def restore(self) -> int:
        ckpt = latest_checkpoint(self.output_dir / "checkpoints")
        if ckpt is None:
            return 0
        state = load_checkpoint(ckpt, self.acc, self.models(), self.optimizer, self.lr_scheduler)
        self.algorithm.load_tensors(load_extra_tensors(ckpt, self.acc.device))
        self.tracker.load_state_dict(state["tracker"])
        self.history = state["history"]
        self.epoch_seconds = state.get("epoch_seconds", {"wall": [], "cpu": []})
        self.watch.load_state_dict(state.get("heldout", {"table": []}))
        logger.info("resumed from %s at epoch %d", ckpt, state["epoch"])
        return state["epoch"]

    def log_plan(self) -> None:
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            acc.init_trackers("align", config=flat_hparams(self.config.to_dict()))
        samples = cfg.sample_batch_size * cfg.num_batches_per_epoch * acc.num_processes
        logger.info("stage two (%s): %d samples/epoch (%d processes x %d batches x %d), %d optimizer steps/epoch "
                    "(%d trained timesteps of %d per sample, %d per pass), %d epochs", cfg.algorithm, samples,
                    acc.num_processes, cfg.num_batches_per_epoch, cfg.sample_batch_size, self.optimizer_steps_per_epoch,
                    cfg.num_train_timesteps, cfg.num_steps, cfg.timesteps_per_pass, cfg.num_epochs)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def embed(self, texts: list[str]) -> Conditioning:
        """The prompts' conditioning (with the image-size conditioning), each computed once per run and
        alone: batched, the text encoders' float sums would depend on which prompts shared the batch, and
        a resumed run (which meets them in other company) would not repeat the uninterrupted one."""
        for text in dict.fromkeys(texts):
            if text not in self._embeds:
                self._embeds[text] = self.family.with_geometry(self.family.encode_prompts(self.pipe, [text]),
                                                               self.geometry)
        return Conditioning.cat([self._embeds[t] for t in texts])

    @contextmanager
    def sampling_denoiser(self) -> Iterator[torch.nn.Module]:
        """The UNet that sampling calls: LoRA merged (align.merge_lora_for_sampling), compiled (align.compile_denoiser).

        Both give the samples of the plain adapted UNet up to float rounding (tests/align/test_speedups.py).
        """
        self.unet.eval()
        merged = merged_lora(self.denoiser, ALIGN_ADAPTER) if self.merge_lora else nullcontext()
        with merged:
            yield self.compiled if self.compiled is not None else self.unet

    def sample_epoch(self, epoch: int) -> Samples:
        with self.algorithm.sampling_weights(), self.sampling_denoiser() as denoiser:
            return self._sample_epoch(epoch, denoiser)

    def _sample_epoch(self, epoch: int, denoiser: torch.nn.Module) -> Samples:
        cfg, acc = self.cfg, self.acc
        per_batch = cfg.sample_batch_size * acc.num_processes
        rollouts, embeds, indices, futures = [], [], [], []
        for b in tqdm(range(cfg.num_batches_per_epoch), desc=f"epoch {epoch} sampling", leave=False,
                      disable=not acc.is_local_main_process):
            index = torch.arange(cfg.sample_batch_size) + b * per_batch + acc.process_index * cfg.sample_batch_size
            prompts = [self.prompt(epoch, int(i)) for i in index]
            cond = self.embed([p.text for p in prompts])
            generators = [torch.Generator(device=acc.device).manual_seed(_seed(self.seed, epoch, int(i)))
                          for i in index]
            group = cfg.samples_per_noise  # a group's members share the generator of x_T
            starts = None if group == 1 or cfg.group_noise == "independent" else [
                torch.Generator(device=acc.device).manual_seed(_seed(self.seed, epoch, int(i) // group, group))
                for i in index]
            inputs, guidance_scale = self.algorithm.sampling_inputs(cond)
            with acc.autocast():
                rollout = sample_rollout(self.family, denoiser, self.algorithm.policy, inputs, generators,
                                         self.latent_shape, num_steps=cfg.num_steps, guidance_scale=guidance_scale,
                                         start_generators=starts)
            images = decode(self.pipe.vae, rollout.final, cfg.decode_slice)
            futures.append(self.reward.submit(images, [p.text for p in prompts], self.metadata(prompts)))
            rollouts.append(self.algorithm.keep(rollout))
            embeds.append(cond)
            indices.append(index)
        return Samples.concat(rollouts, embeds, indices, [f.result() for f in futures])

    def prompt(self, epoch: int, index: int) -> Prompt:
        """Prompt of sample `index`: its initial-noise group's first, so the whole group shares it."""
        return self.sampler(epoch, index - index % self.cfg.samples_per_noise)

    def metadata(self, prompts: list[Prompt]) -> list[dict[str, Any]]:
        return [{"subject": self.subject, "with_identifier": p.with_identifier, "template": p.template}
                for p in prompts]

    # ------------------------------------------------------------------ advantages

    def standardize(self, samples: Samples) -> None:
        """Recompute the totals with the chosen components standardized over the epoch's global samples."""
        stats = {}
        for name in self.cfg.reward_standardize:
            values = self.acc.gather(samples.components[name].to(self.acc.device)).float().cpu()
            present = values[~values.isnan()]
            stats[name] = (present.mean().item(), present.std().item()) if len(present) > 1 else (0.0, 1.0)
        samples.rewards = self.reward.total(samples.components, stats)

    def advantages(self, epoch: int, samples: Samples) -> torch.Tensor:
        """Normalize rewards over all processes' samples in global-index order, return this process's share."""
        acc = self.acc
        rewards = acc.gather(samples.rewards.to(acc.device)).cpu().numpy()
        indices = acc.gather(samples.indices.to(acc.device)).cpu().numpy()
        order = np.argsort(indices)
        if self.cfg.advantage_mode == "per_reward":
            adv = self.balanced_advantages(epoch, samples, indices[order], order)
        elif self.cfg.samples_per_noise > 1:
            adv = group_advantages(rewards[order], indices[order] // self.cfg.samples_per_noise, self.cfg.group_std)
        elif self.cfg.per_prompt_stat_tracking:
            texts = [self.prompt(epoch, int(i)).text for i in indices[order]]
            adv = self.tracker.update(texts, rewards[order])
        else:
            adv = batch_advantages(rewards[order])
        adv = clip_advantages(adv, self.cfg.adv_clip_max)
        by_index = dict(zip(indices[order].tolist(), adv.tolist()))
        return torch.tensor([by_index[int(i)] for i in samples.indices], dtype=torch.float32, device=acc.device)

    def balanced_advantages(self, epoch: int, samples: Samples, indices: np.ndarray, order: np.ndarray
                            ) -> np.ndarray:
        """align.advantage_mode=per_reward: components standardized within initial-noise groups, else prompts."""
        components = {name: self.acc.gather(values.to(self.acc.device)).cpu().numpy()[order]
                      for name, values in samples.components.items()}
        if self.cfg.samples_per_noise > 1:
            groups = indices // self.cfg.samples_per_noise
        elif self.cfg.per_prompt_stat_tracking:
            groups = np.asarray([self.prompt(epoch, int(i)).text for i in indices], dtype=object)
        else:
            groups = np.zeros(len(indices), dtype=np.int64)
        return per_reward_advantages(components, self.reward.weights, groups)

    # ------------------------------------------------------------------ training

    def train_epoch(self, epoch: int, samples: Samples, advantages: torch.Tensor) -> dict[str, float]:
        """One pass (per inner epoch) over the samples; the statistics reach the host once, at the end."""
        cfg, acc = self.cfg, self.acc
        n = len(samples.indices)
        stats: dict[str, list[torch.Tensor]] = {}
        self.unet.train()
        for inner in range(cfg.num_inner_epochs):
            self.pass_key = (epoch, inner)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(
                _seed(self.seed, epoch, inner, acc.process_index)))
            steps = trained_steps(cfg, epoch, samples.indices[order], lambda i: _seed(self.seed, epoch, inner, i))
            order, steps = order.to(acc.device), steps.to(acc.device)  # one copy each, not one per step
            batches, k = range(0, n, cfg.train_batch_size), cfg.timesteps_per_pass
            for start in tqdm(batches, desc=f"epoch {epoch} training", leave=False,
                              disable=not acc.is_local_main_process):
                # k timesteps of each trajectory in one pass (align.timesteps_per_pass): rows (trajectory, k)
                rows = order[start:start + cfg.train_batch_size].repeat_interleave(k)
                rows_advantages = advantages[rows]
                for j in range(0, cfg.num_train_timesteps, k):
                    step = steps[start:start + cfg.train_batch_size, j:j + k].reshape(-1)
                    for key, value in self.train_step(samples, rows, step, rows_advantages).items():
                        stats.setdefault(key, []).append(value)
        return epoch_means(stats)

    def step_log_prob(self, samples: Samples, rows: torch.Tensor, step: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """PPO's guided noise and log-prob of stored steps under the current weights (align.algorithm ppo)."""
        return self.algorithm.step_log_prob(samples, rows, step)

    def train_step(self, samples: Samples, rows: torch.Tensor, step: torch.Tensor, advantages: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
        """One term of the algorithm's loss on stored steps, accumulated until the optimizer step.

        Returns its statistics as detached scalar tensors: reading them here would wait for the device.
        """
        cfg, acc = self.cfg, self.acc
        with acc.accumulate(self.unet):
            loss, info = self.algorithm.loss(samples, rows, step, advantages)
            backward_and_step(acc, loss, self.params, cfg.max_grad_norm, self.optimizer, self.lr_scheduler)
        return {"loss": loss.detach()} | info

    @contextmanager
    def adapters_off(self) -> Iterator[torch.nn.Module]:
        """The denoiser with the stage-two adapter switched off (stage one), without gradients."""
        unet = self.acc.unwrap_model(self.unet)
        with torch.no_grad(), self.acc.autocast():
            unet.disable_adapters()
            try:
                yield unet
            finally:
                unet.enable_adapters()

    @property
    def policy(self) -> StepPolicy:
        """The sampler of the epoch's samples: the algorithm's."""
        return self.algorithm.policy

    @property
    def optimizer_steps_per_epoch(self) -> int:
        cfg = self.cfg
        batches = cfg.sample_batch_size * cfg.num_batches_per_epoch // cfg.train_batch_size
        return batches // cfg.gradient_accumulation_steps * cfg.num_inner_epochs

    # ------------------------------------------------------------------ epoch

    def run_epoch(self, epoch: int) -> None:
        cfg, acc = self.cfg, self.acc
        start, cpu_start = time.perf_counter(), time.process_time()
        self.policy.use_window(window_steps(cfg, epoch))
        samples = self.sample_epoch(epoch)
        if cfg.reward_standardize:
            self.standardize(samples)
        advantages = self.advantages(epoch, samples)
        logs = {"epoch": epoch} | self.reward_stats(epoch, samples) | self.train_epoch(epoch, samples, advantages)
        logs["lr"] = self.lr_scheduler.get_last_lr()[0]
        self.history.append(logs)
        self.epoch_seconds["wall"].append(time.perf_counter() - start)
        self.epoch_seconds["cpu"].append(time.process_time() - cpu_start)
        done = epoch + 1
        if self.watch.due(done):
            logs |= self.evaluate(done, logs["reward_mean"])
        acc.log(logs | {"time/epoch_seconds": self.epoch_seconds["wall"][-1]}, step=epoch)
        if acc.is_main_process:
            logger.info("epoch %d: reward %.4f +- %.4f, %s", epoch, logs["reward_mean"], logs["reward_std"],
                        self.algorithm.summary(logs))
        self.algorithm.end_epoch(done * self.optimizer_steps_per_epoch)
        if done % cfg.checkpointing_epochs == 0 or done == cfg.num_epochs or self.watch.should_stop():
            save_checkpoint(acc, self.output_dir / "checkpoints", done, self.models(), self.optimizer,
                            self.lr_scheduler, {"epoch": done, "tracker": self.tracker.state_dict(),
                                                "history": self.history, "epoch_seconds": self.epoch_seconds,
                                                "heldout": self.watch.state_dict(acc.is_main_process)},
                            cfg.checkpoints_total_limit, extra_tensors=self.algorithm.tensors())
            if acc.is_main_process:
                self.watch.prune()
        if cfg.grid_every and (done % cfg.grid_every == 0 or done == cfg.num_epochs):
            self.draw_grid(done)

    def evaluate(self, done: int, train_reward: float) -> dict[str, float]:
        """The held-out evaluation after `done` epochs (every process draws it, so all agree on the stop)."""
        self.unet.eval()
        scores = self.evaluator(self.pipe, sampling_autocast(self.acc),
                                fixed_resolution(self.pipe, self.resolution), self.encoded)
        row = {"epoch": done, "train_reward": train_reward} | scores
        alarm = self.watch.record(row, trainable_parameters(self.acc, self.models()))
        if self.acc.is_main_process:
            logger.info("epoch %d held out: selection %.4f (best %.4f at epoch %d)", done, row["selection"],
                        max(r["selection"] for r in self.watch.table), self.watch.best_epoch)
            if alarm:
                logger.warning(alarm)
        return scores | {"heldout/alarm": float(row["alarm"])}

    def reward_stats(self, epoch: int, samples: Samples) -> dict[str, float]:
        """Means over all processes; with mixed prompts, also over those that name the subject."""
        gather = self.acc.gather
        rewards = gather(samples.rewards.to(self.acc.device)).float()
        named = torch.tensor([self.prompt(epoch, int(i)).with_identifier
                              for i in gather(samples.indices.to(self.acc.device)).cpu()])
        stats = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item()}
        for name, values in samples.components.items():  # NaN marks a component absent for that prompt
            values = gather(values.to(self.acc.device)).float().cpu()
            stats[f"reward/{name}"] = values.nanmean().item()
            if named.any() and not named.all():
                stats[f"reward/{name}/with_identifier"] = values[named].nanmean().item()
        return stats | self.reward.log_stats()

    def draw_grid(self, epoch: int) -> None:
        acc = self.acc
        if acc.is_main_process:
            grid = draw_grid(self.pipe, self.grid_texts, self.cfg.grid_seeds, self.cfg.num_steps,
                             self.cfg.guidance_scale, autocast_dtype=sampling_autocast(acc),
                             resolution=fixed_resolution(self.pipe, self.resolution), encoded=self.encoded)
            save_image_atomic(grid, self.output_dir / "samples" / f"epoch-{epoch}.png")
            log_grid(acc, "samples", grid, epoch)
        acc.wait_for_everyone()

    def replica_checksums(self) -> list[list[float]]:
        """Sum and sum of squares of the LoRA on every process: they differ if gradients were not synchronized."""
        flat = torch.cat([p.detach().float().flatten() for p in self.params])
        sums = torch.stack([flat.sum(), flat.pow(2).sum()]).to(self.acc.device)
        gathered = self.acc.gather(sums[None]).cpu()
        if not torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-5, atol=1e-7):
            raise RuntimeError(f"the stage-two LoRA differs across processes {gathered.tolist()}: "
                               "gradients were not synchronized")
        return gathered.tolist()

    def keep_best(self) -> None:
        """align.keep=best: put the best evaluated epoch's LoRA back before it is saved."""
        weights = self.watch.best_weights
        if self.cfg.keep != "best" or weights is None:
            return
        with torch.no_grad():
            for key, param in trainable_parameters(self.acc, self.models()).items():
                param.copy_(weights[key].to(param.device, param.dtype))
        if self.acc.is_main_process:
            logger.info("keeping epoch %d's LoRA (best held-out selection metric)", self.watch.best_epoch)

    def save_output(self) -> Path:
        self.keep_best()
        checksums = self.replica_checksums()
        if self.acc.is_main_process:
            unet = self.acc.unwrap_model(self.unet)
            write = lambda folder: save_lora(folder, self.family, {self.family.denoiser: unet},
                                                 adapter_name=ALIGN_ADAPTER)
            publish(self.output_dir, write, {
                "stage": "align", "rlbooth_version": __version__, "stage_one": str(self.stage_one.folder.resolve()),
                "subject": self.subject.to_dict(), "reward": self.cfg.reward, "epochs": self.cfg.num_epochs,
                "history": self.history, "epoch_seconds": self.epoch_seconds, "replica_checksums": checksums, "config": self.config.to_dict(),
            } | ({"heldout": self.watch.summary()} if self.cfg.eval_every else {}))
        self.acc.wait_for_everyone()
        return self.output_dir / "model"
