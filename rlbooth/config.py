"""Typed configuration: one dataclass per concern, loaded from YAML presets that extend each other.

Each field is documented once, in the string under it; loading and coercion live in `rlbooth.config_io`
(re-exported here). A preset names its parent with `extends: other.yaml` (a path relative to the preset, or a preset name); command-line overrides
(`--set personalize.learning_rate=1e-4`) are applied last. Unknown keys and wrong types raise
`ConfigError` naming the dotted key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from rlbooth.errors import RlboothError
from rlbooth.resources import PRESETS, data_dir

CONFIG_DIR = data_dir(PRESETS)
"""The shipped presets (`configs/` in the repository, `rlbooth.presets` when installed)."""


class ConfigError(RlboothError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


LORA_INITS = ("ddpo", "peft")
"""The LoRA initializations `rlbooth.models.add_lora` offers (see `AlignConfig.lora_init`)."""


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class TinyModelConfig:
    """Sizes of the offline pipeline that `model.pretrained: tiny` builds from scratch (tests, CPU)."""

    resolution: int = 32
    """Image side in pixels; the VAE halves it once per extra entry of `vae_channels`."""
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])
    """UNet `block_out_channels`; one down/up block pair per entry."""
    vae_channels: list[int] = field(default_factory=lambda: [32, 64])
    """VAE `block_out_channels`."""
    text_hidden_size: int = 32
    """Width of the CLIP text encoder (also the UNet's cross-attention width)."""
    text_layers: int = 2
    """Number of CLIP text encoder layers."""
    seed: int = 0
    """Seed of the random initialization, so every build gives the same weights."""

    def __post_init__(self) -> None:
        _check(self.resolution % 2 ** (len(self.vae_channels) - 1) == 0, "model.tiny.resolution",
               "must be divisible by the VAE's downsampling factor")
        _check(len(self.unet_channels) >= 2, "model.tiny.unet_channels", "needs at least two blocks")


@dataclass
class ModelConfig:
    """Where the base text-to-image pipeline comes from."""

    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Hub id or local folder of a diffusers pipeline of a supported family; `tiny` for the random offline test
    model (of `family`), `toyworld` / `toyworld-flow` for the toy world's shipped 32 px models (rlbooth.toyworld;
    UNet / SD3 transformer)."""
    family: Literal["auto", "sd", "sdxl", "sd3", "flux", "qwenimage", "zimage"] = "auto"
    """Model family (rlbooth.families): `sd` (Stable Diffusion 1.x/2.x), `sdxl`, `sd3` (SD3/SD3.5), `flux`
    (FLUX.1), `qwenimage` (Qwen-Image), `zimage` (Z-Image); `auto` reads it from the model's model_index.json
    (`tiny` and `toyworld`: sd; `toyworld-flow`: sd3)."""
    vae: str | None = None
    """Hub id or local folder of a VAE that replaces the pipeline's own, e.g. madebyollin/sdxl-vae-fp16-fix
    (SDXL's VAE overflows in fp16)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `pretrained`."""
    variant: str | None = None
    """Weight variant of `pretrained` to load, e.g. `fp16`."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Architecture of the offline model; read only when `pretrained` is `tiny`."""
    quantization: Literal["none", "int8", "nf4"] = "none"
    """Store the frozen denoiser's Linear weights quantized (QLoRA; rlbooth.quantize), LoRA trains on top in
    fp32: `int8` torchao's int8 weight-only (CPU or CUDA; `pip install 'rlbooth[quantize]'`), `nf4` bitsandbytes'
    4-bit NormalFloat (CUDA; the `8bit` extra). Needs LoRA in both stages; the LoRA loads on the unquantized base."""
    quantize_text_encoders: bool = False
    """Also store the family's large frozen text encoder (T5-XXL of SD3 and FLUX, Qwen-Image's and Z-Image's Qwen)
    with `quantization`'s scheme, through transformers' quantization configs; on families without one, an error."""


@dataclass
class RuntimeConfig:
    """How and where the work runs."""

    seed: int = 0
    """Seed of every random draw in training (batches, noise, timesteps); a resumed run repeats them."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    """Autocast dtype; frozen weights are stored in it, trainable weights stay fp32. fp16 needs a GPU."""
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """Where accelerate sends the training logs and sample grids: TensorBoard (under `<output>/logs`), Weights &
    Biases (`pip install wandb`, then `wandb login`; its local files also go under `<output>/logs`), or nowhere."""
    allow_tf32: bool = True
    """Allow TF32 matmuls on Ampere or newer GPUs."""
    optimizer_impl: Literal["auto", "for-loop", "foreach", "fused"] = "auto"
    """torch's AdamW implementation in both stages: `auto` is `fused` for float parameters on a CPU or CUDA device
    (else torch's choice); `foreach` batches the tensors' updates; `fused` is one kernel per step (CUDA or CPU);
    `for-loop` is torch's CPU default. Same update."""


@dataclass
class PersonalizeConfig:
    """Stage one: DreamBooth with prior preservation (Ruiz et al. 2023)."""

    mode: Literal["full", "lora"] = "full"
    """`full` fine-tunes every UNet weight (the paper); `lora` trains adapters on its attention projections."""
    instance_prompt: str = "a {identifier} {description} {class_noun}"
    """Template of the prompt paired with the subject's photos (placeholders: identifier, description, class_noun)."""
    class_prompt: str = "a {class_noun}"
    """Template of the prompt for the prior-preservation images."""
    resolution: int = 512
    """Training resolution in pixels; photos are resized (shorter side) and cropped to it."""
    center_crop: bool = True
    """Crop the centre of each photo; otherwise a random (but seeded) crop per photo."""
    with_prior_preservation: bool = True
    """Add the prior-preservation loss on images of the class that the base model drew itself."""
    prior_loss_weight: float = 1.0
    """Weight of the prior-preservation loss: loss = instance + weight * prior."""
    num_class_images: int = 200
    """Class images to train against; only the missing ones are generated."""
    class_data_dir: str | None = None
    """Folder of class images; default: a cache folder per base model and class prompt."""
    class_generation_steps: int = 50
    """Denoising steps used to draw class images."""
    class_guidance_scale: float = 7.5
    """Classifier-free guidance scale used to draw class images."""
    class_batch_size: int = 4
    """Class images drawn per forward batch."""
    train_batch_size: int = 1
    """Instance images per micro-batch and process (as many class images join them)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated into one optimizer step."""
    max_train_steps: int = 800
    """Optimizer steps of the run."""
    learning_rate: float = 5e-6
    """Peak AdamW learning rate."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "polynomial"] = "constant"
    """Learning-rate schedule (diffusers' `get_scheduler`)."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    use_8bit_adam: bool = False
    """Use bitsandbytes' 8-bit AdamW (install the `8bit` extra)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    snr_gamma: float | None = None
    """Min-SNR weighting gamma (5.0 is the paper's) of the instance loss; the prior-preservation loss stays
    unweighted, as in diffusers' DreamBooth script. Off when null."""
    timestep_density: Literal["logit_normal", "mode", "uniform"] | None = None
    """Flow-matching families (sd3, flux): the density training timesteps are drawn from; logit-normal favours
    the middle of the schedule. null: the default of the family's diffusers DreamBooth-LoRA script, logit-normal
    for sd3 and uniform for flux (its `weighting_scheme none`). DDPM families draw uniformly."""
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep density."""
    logit_std: float = 1.0
    """Std of the logit-normal timestep density."""
    mode_scale: float = 1.29
    """How far the `mode` timestep density bends towards the middle of the schedule (0: uniform)."""
    flow_loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """Flow-matching families: weight of each image's squared error by its sigma (diffusers' scripts' options)."""
    precondition_outputs: bool = False
    """Flow-matching families: regress x0 with the prediction x_s - s v instead of the velocity eps - x0 (diffusers'
    SD3 script's `--precondition_outputs`, on there by default and in sd35-lora.yaml): per image the squared error
    times s^2, so low-noise timesteps count less. Off: the velocity loss, which the toy world measured."""
    training_guidance: float = 3.5
    """Guidance-distilled models (FLUX.1-dev): the guidance input while training (diffusers' FLUX script's
    default); unused by families that guide by classifier-free guidance."""
    train_text_encoder: bool = False
    """Also train the text encoder (full weights, or LoRA in `lora` mode); on SD3 and FLUX the CLIP encoders
    only, never T5 (what their LoRA loaders carry)."""
    lora_rank: int = 4
    """Rank of the LoRA adapters."""
    lora_alpha: float | None = None
    """LoRA alpha; defaults to the rank (scale 1)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    """UNet modules that get LoRA adapters."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    offload_encoders: bool = False
    """Encode every prompt (training, class images, validation grids) first, with the frozen text encoders alone
    on the device, then keep them in host memory (T5-XXL is about 9.5 GB in bf16) and draw from the embeddings;
    the VAE leaves too once the photos' latents are cached, and comes back only to decode validation grids."""
    checkpointing_steps: int = 200
    """Write a resumable checkpoint every this many optimizer steps."""
    checkpoints_total_limit: int | None = 2
    """Keep only this many checkpoints (oldest removed first); all when null."""
    validation_prompts: list[str] = field(default_factory=lambda: [
        "a {identifier} {description} {class_noun} on the beach",
        "a {identifier} {description} {class_noun} in the snow",
    ])
    """Templates of the prompts drawn for the validation grid."""
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seeds of the validation images (one grid column per seed)."""
    validation_steps: int = 200
    """Draw the validation grid every this many optimizer steps (and at the end); 0 turns it off."""
    validation_inference_steps: int = 25
    """Denoising steps of the validation images."""
    validation_guidance_scale: float = 7.5
    """Classifier-free guidance scale of the validation images."""

    def __post_init__(self) -> None:
        for name in ("resolution", "num_class_images", "class_generation_steps", "class_batch_size",
                     "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                     "checkpointing_steps", "lora_rank", "validation_inference_steps"):
            _check(getattr(self, name) > 0, f"personalize.{name}", "must be positive")
        for name in ("learning_rate", "max_grad_norm", "prior_loss_weight"):
            _check(getattr(self, name) > 0, f"personalize.{name}", "must be positive")
        _check(self.lr_warmup_steps >= 0, "personalize.lr_warmup_steps", "must not be negative")
        _check(self.validation_steps >= 0, "personalize.validation_steps", "must not be negative")
        _check(self.snr_gamma is None or self.snr_gamma > 0, "personalize.snr_gamma", "must be positive or null")
        _check(self.logit_std > 0, "personalize.logit_std", "must be positive")
        _check(self.mode_scale >= 0, "personalize.mode_scale", "must not be negative")
        _check(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
               "personalize.checkpoints_total_limit", "must be at least 1 or null")
        _check(bool(self.lora_target_modules), "personalize.lora_target_modules", "must name at least one module")


@dataclass
class AlignConfig:
    """Stage two: DDPO (Black et al. 2023) over denoising trajectories, with and without the identifier."""

    prompt_file: str | None = None
    """Prompt set: a name in prompts/ (`live`, `object`) or a path; default chosen by the subject's kind."""
    identifier_ratio: float = 0.5
    """Fraction of training prompts that carry the identifier; the others name only the class (InstructBooth)."""
    num_epochs: int = 100
    """Epochs; each samples trajectories, scores them, then trains on them."""
    sample_batch_size: int = 8
    """Trajectories sampled per forward and process."""
    num_batches_per_epoch: int = 4
    """Sampling batches per epoch and process: samples per epoch = this x sample_batch_size x processes."""
    num_steps: int = 50
    """Sampler steps of a trajectory (DDIM, or the flow families' SDE; also of the sample grids)."""
    eta: float = 1.0
    """DDIM noise scale (DDPM families; flow families use flow_noise_level); must be > 0, the log-prob of a
    deterministic step is undefined."""
    guidance_scale: float = 5.0
    """Classifier-free guidance, the same when sampling and when recomputing log-probs."""
    train_batch_size: int = 4
    """Trajectories per training forward and process."""
    gradient_accumulation_steps: int = 1
    """Training batches (each over all its trained timesteps) accumulated into one optimizer step."""
    num_inner_epochs: int = 1
    """Training passes over each epoch's samples."""
    timestep_fraction: float = 1.0
    """Fraction of the window's steps trained on, a random subset per sample (align.train_step_selection)."""
    timestep_window: list[float] = field(default_factory=lambda: [0.0, 1.0])
    """[start, end) of the trajectory, as fractions of num_steps from the first (noisiest) step, whose steps
    are trained on. Early steps decide the layout; with few steps the last big jump has a small noise and a
    log-prob gradient that drowns the others (README, the toy world)."""
    clip_range: float = 1e-4
    """PPO clip range of the importance ratio."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to +- this."""
    per_prompt_stat_tracking: bool = True
    """Normalize rewards per prompt (a buffer each); per batch when false. Unused when samples_per_noise > 1."""
    samples_per_noise: int = 1
    """Trajectories per initial noise x_T: above 1, groups of this many share a prompt and x_T (unless
    align.group_noise is `independent`), differ in their steps, and each advantage is the reward minus its
    group's mean (the start decides much of the reward but is no action of the policy; README, the toy world)."""
    stat_buffer_size: int = 16
    """Rewards kept per prompt for its mean and std."""
    stat_min_count: int = 16
    """Below this many rewards for a prompt, the batch's mean and std are used instead."""
    learning_rate: float = 3e-4
    """AdamW learning rate of the stage-two LoRA."""
    adam_weight_decay: float = 1e-4
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the stage-one model (the adapter switched off) per trained step; 0 = off."""
    lora_rank: int = 4
    """Rank of the stage-two LoRA."""
    lora_alpha: float | None = None
    """LoRA alpha; defaults to the rank."""
    lora_init: Literal["ddpo", "peft"] = "ddpo"
    """Init of the stage-two LoRA's A (down) matrices; B (up) starts at zero either way, so epoch 0 samples the
    stage-one model. `ddpo`: A ~ N(0, 1/rank^2), as ddpo-pytorch trained (diffusers' LoRALinearLayer of then),
    which DDPO's learning rate 3e-4 was tuned with; `peft`: peft's default kaiming-uniform A, std 1/sqrt(3 fan_in),
    8-16x smaller on SD 1.5's attention widths, so the same learning rate moves the model 8-16x less per step."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    """UNet modules that get the stage-two adapter."""
    reward: dict[str, float] = field(default_factory=lambda: {"jpeg_compressibility": 1.0})
    """Reward components (names in the reward registry) and their weights in the sum."""
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Options of each reward's factory by reward name, e.g. {aesthetic: {clip_model: /local/clip}}."""
    reward_standardize: list[str] = field(default_factory=list)
    """Components rescaled to zero mean and unit std over each epoch's samples (all processes) before weighting."""
    reward_modules: list[str] = field(default_factory=list)
    """Your own reward modules, imported before the rewards are built so their `@register(name)` calls run: a
    module name on the Python path (`my_rewards`) or a `.py` file (relative to the current directory). Installed
    packages can declare theirs in the entry-point group `rlbooth.rewards` instead (README, custom rewards)."""
    checkpointing_epochs: int = 5
    """Write a resumable checkpoint every this many epochs (and at the end)."""
    checkpoints_total_limit: int | None = 2
    """Keep only this many checkpoints; all when null."""
    grid_prompts: list[str] = field(default_factory=lambda: [
        "a {identifier} {description} {class_noun} with a pagoda in the background",
        "a {identifier} {description} {class_noun} next to a birthday cake",
    ])
    """Templates of the fixed prompts of the per-epoch sample grids (from the held-out sets, never trained on)."""
    grid_seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seeds of the sample grids (one column each)."""
    grid_every: int = 5
    """Draw the sample grid every this many epochs (and at the end); 0 turns it off."""
    reward_thread: bool | None = None
    """Score each batch's rewards in a worker thread while the next batch samples; null: only on a CUDA device,
    where reward models' kernels overlap sampling. On a CPU both would share the same cores, so rewards are
    scored inline."""
    merge_lora_for_sampling: bool | None = None
    """Fold the stage-two LoRA into the UNet's weights while sampling (one matmul per layer instead of three;
    base weights restored exactly afterwards). null: on when frozen weights are float32; true needs
    runtime.mixed_precision=no, since a LoRA delta added to half-precision weights is rounded away."""
    gradient_checkpointing: bool = False
    """Recompute the denoiser's activations in the backward pass of the training passes (sampling keeps none)."""
    offload_text_encoders: bool = False
    """Encode every prompt of the run (training, sample grids, held-out set) at the start, before the denoiser
    comes to the device, then keep the text encoders in host memory (T5-XXL is about 9.5 GB in bf16): grids and
    held-out sets are drawn from the embeddings."""
    offload_rewards: bool = False
    """Keep the model-based rewards' torch models (CLIP, BLIP, DINO, the torch ArcFace) in host memory and bring
    each to the device only while it scores (align.eval_rewards' too); with align.algorithm refl, a training pass's
    rewards stay until its backward pass has gone through them. ONNX and dlib models stay where they are."""
    decode_slice: int = 0
    """Samples the VAE decodes per call for the rewards (0: a whole sampling batch at once); the decoder's
    activations at full resolution are the largest transient of sampling (SDXL at 1024 px: about 1 GB per image)."""
    compile_denoiser: bool = False
    """torch.compile the UNet used for sampling (training stays eager); the first epoch pays the compile."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile's mode for align.compile_denoiser. `reduce-overhead` replays the fixed-shape sampling step
    as a CUDA graph (on a GPU; elsewhere it is `default`); `max-autotune` also searches kernel configurations."""
    timesteps_per_pass: int = 1
    """Trained timesteps of each trajectory that share one forward and backward pass: k stacks k of them into a
    pass of k x train_batch_size rows. An optimizer step sums the same terms either way (it covers every trained
    timestep of gradient_accumulation_steps batches), so only speed and activation memory (k times) change;
    1 is ddpo-pytorch's and TRL's loop. Must divide the trained timesteps per trajectory."""
    flow_noise_level: float = 0.7
    """Flow-matching families (sd3, flux): the noise level a of Flow-GRPO's SDE sampler, whose steps are Gaussian
    with std sigma_t sqrt(-dt); sigma_t = a sqrt(s / (1 - s)) at sigma s (`flow_grpo`) or a (`constant`)."""
    flow_noise_schedule: Literal["flow_grpo", "constant"] = "flow_grpo"
    """Flow-matching families: sigma_t of the SDE, Flow-GRPO's (`flow_grpo`) or DanceGRPO's constant (`constant`)."""
    ode_outside_window: bool = False
    """Flow-matching families: SDE steps only inside align.timestep_window and the deterministic Euler ODE
    elsewhere (MixGRPO); off: every step is an SDE step."""
    window_shift_every: int = 0
    """Slide align.timestep_window over training (MixGRPO's progressive strategy): every this many epochs it moves
    align.window_stride steps later, and after the last position that still holds all its steps it starts again
    at its first (MixGRPO's roll_back); 0: the window stays put."""
    window_stride: int | None = None
    """Steps the sliding window moves at a time; null: its own length (MixGRPO without prog_overlap)."""
    kl_form: Literal["gaussian", "flow_grpo"] = "gaussian"
    """The KL term that align.kl_coef weights: `gaussian` is the exact KL of each step's Gaussians,
    dmean^2 / (2 std^2) with std = sigma_t sqrt(-dt); `flow_grpo` (flow-matching families) is Flow-GRPO's code,
    dmean^2 / (2 sigma_t^2), the exact KL times -dt (20-110x smaller per step on SD3 at 10 steps): Flow-GRPO's
    beta carries over only with it. The exact KL is the default: it is the KL, on every family."""
    detach_uncond: bool = False
    """Classifier-free guidance while training: drop the unconditional branch's gradient (its value stays).
    Off (DDPO, and the Flow-GRPO train_sd3.py read here): both branches backpropagate, and with one LoRA in
    both the unconditional gradient enters with weight 1 - guidance_scale."""
    train_step_selection: Literal["random", "first"] = "random"
    """Which timestep_fraction of the window's steps are trained: a random subset per sample and inner epoch
    (`random`, DDPO), or the first floor(steps x fraction) of every trajectory (`first`, Flow-GRPO, whose 0.99
    at 10 steps leaves out the last, near-deterministic step)."""
    group_noise: Literal["shared", "independent"] = "shared"
    """With samples_per_noise > 1: a group's trajectories share the prompt and x_T (`shared`, DanceGRPO's
    init_same_noise), or only the prompt, each drawing its own x_T (`independent`, Flow-GRPO)."""
    group_std: Literal["residuals", "rewards"] = "residuals"
    """With samples_per_noise > 1: the group advantages' divisor, the std of the rewards minus their group's mean
    (`residuals`), or the std of all the epoch's rewards + 1e-4 (`rewards`, Flow-GRPO's global_std)."""
    algorithm: Literal["ppo", "nft", "refl"] = "ppo"
    """Stage two's algorithm (rlbooth.align.algorithms; README, choosing an algorithm). `ppo`: DDPO (DDPM
    families) or Flow-GRPO (flow families), the importance-clipped objective over stored trajectories of the
    stochastic sampler. `nft`: DiffusionNFT, trained on the forward process at the sampling timesteps from the
    clean latents alone, sampled by a lagging "old" copy of the LoRA; the nft_* fields are its settings.
    `refl`: reward feedback learning (ImageReward's ReFL; DRaFT-K), the reward's own gradient through the
    decoded x0 prediction of a late step of the deterministic sampler; every weighted reward must be
    differentiable; the refl_* fields are its settings."""
    nft_beta: float = 1.0
    """DiffusionNFT's beta: the implicit policies are beta v + (1 - beta) v_old and (1 + beta) v_old - beta v
    (the reference uses 1.0; 0.1 for OCR)."""
    nft_decay_type: int = 1
    """DiffusionNFT's old-policy schedule: after each epoch old <- d old + (1 - d) trained, with
    d = min(max(steps - flat, 0) x rate, cap) at the run's optimizer steps so far; 0 (copy: d = 0), 1 (flat 0,
    rate 0.001, cap 0.5, the reference's default) or 2 (flat 75, rate 0.0075, cap 0.999)."""
    nft_adv_mode: Literal["all", "positive_only", "negative_only", "one_only", "binary"] = "all"
    """DiffusionNFT's advantage modes before r = clip(A / adv_clip_max) / 2 + 1/2: all advantages, only the
    positive or negative ones (others 0), 1 for positive and 0 otherwise, or their sign."""
    nft_sampler: Literal["ode", "sde"] = "ode"
    """DiffusionNFT's sampler: `ode` the deterministic one (DDIM at eta 0, the flow Euler ODE), `sde` ppo's
    stochastic one (DDIM at align.eta, Flow-GRPO's SDE at align.flow_noise_level)."""
    nft_guidance_scale: float = 1.0
    """DiffusionNFT's guidance while sampling; 1 runs the conditional prediction alone (CFG-free, the reference's
    point); training is always CFG-free. align.guidance_scale stays ppo's and the grids'."""
    refl_window: list[int] = field(default_factory=lambda: [1, 10])
    """ReFL: [first, last] of the steps whose x0 prediction is trained, counted from the end (1: the last step);
    one is drawn per sample and epoch. The reference draws one of the last 10 of 40 steps."""
    refl_backprop_steps: int = 1
    """ReFL: denoising steps backpropagated through, the drawn one and those after it (each gradient-checkpointed
    when above 1), the last predicting x0: 1 is ReFL, K > 1 DRaFT-K. Activation memory grows with K."""
    refl_shaping: Literal["linear", "relu"] = "linear"
    """ReFL: the loss of the weighted reward r, -r (`linear`) or the reference's relu(refl_relu_margin - r)
    (`relu`), which stops pushing a sample once its reward passes the margin."""
    refl_relu_margin: float = 2.0
    """ReFL: the margin of refl_shaping=relu (the reference's 2, on ImageReward's scale)."""
    refl_pretrain_weight: float = 0.0
    """ReFL: weight of stage one's denoising loss on the subject photos (its objective, resolution and instance
    prompt; one photo, noise and timestep per trained sample) added to the loss, the regularizer
    ReFL and ID-Aligner add; 0 = off."""
    advantage_mode: Literal["sum", "per_reward"] = "sum"
    """`sum`: advantages of the weighted reward sum (DDPO). `per_reward`: each component standardized within
    its group first (initial-noise groups, else prompts with per_prompt_stat_tracking, else the epoch), then
    weighted, summed and standardized over the epoch (GDPO), so one reward's scale cannot drown the others."""
    eval_every: int = 0
    """Score held-out prompts every this many epochs (and at the end), drawn with the pipeline's own
    deterministic sampler from fixed seeds; the table goes to rlbooth.json and the trackers. 0 turns it off."""
    eval_prompt_file: str | None = None
    """Prompt set of the held-out evaluation (with the identifier); default: the held-out set for the subject's
    kind (report.prompt_file where set)."""
    eval_num_prompts: int = 8
    """Held-out prompts evaluated: the first this many of the set."""
    eval_seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seeds of the held-out images; each prompt is drawn once per seed."""
    eval_num_steps: int | None = None
    """Denoising steps of the held-out images; null: align.num_steps."""
    eval_rewards: dict[str, float] | None = None
    """Rewards scored on the held-out images and their weights in the selection metric (the weighted sum of
    their held-out means); null: align.reward. May name rewards not trained on (a "gold" set)."""
    eval_reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Options of the evaluation rewards' factories by name, over align.reward_options of the same name."""
    keep: Literal["last", "best"] = "last"
    """The stage's output LoRA: the last epoch's, or that of the evaluation with the highest selection metric
    (needs align.eval_every)."""
    early_stop_patience: int = 0
    """Stop after this many evaluations in a row without a new best selection metric; 0 never stops early."""
    hacking_window: int = 3
    """Evaluations the reward-hacking alarm looks back over: it warns when the training reward rose while the
    held-out selection metric fell from the first of them to the last."""

    def __post_init__(self) -> None:
        for name in ("num_epochs", "sample_batch_size", "num_batches_per_epoch", "num_steps", "train_batch_size",
                     "gradient_accumulation_steps", "num_inner_epochs", "stat_buffer_size", "stat_min_count",
                     "samples_per_noise", "lora_rank", "checkpointing_epochs", "timesteps_per_pass"):
            _check(getattr(self, name) > 0, f"align.{name}", "must be positive")
        for name in ("learning_rate", "max_grad_norm", "adv_clip_max", "guidance_scale"):
            _check(getattr(self, name) > 0, f"align.{name}", "must be positive")
        _check(self.eta > 0, "align.eta", "must be > 0: at eta = 0 DDIM is deterministic and a step has no "
               "log-probability (DDPO uses 1.0)")
        _check(0 < self.clip_range < 1, "align.clip_range", f"must be in (0, 1), got {self.clip_range}")
        _check(0 < self.timestep_fraction <= 1, "align.timestep_fraction",
               f"must be in (0, 1], got {self.timestep_fraction}")
        _check(len(self.timestep_window) == 2 and 0 <= self.timestep_window[0] < self.timestep_window[1] <= 1,
               "align.timestep_window", f"must be [start, end] with 0 <= start < end <= 1, got {self.timestep_window}")
        _check(self.algorithm == "refl" or bool(self.train_steps), "align.timestep_window",
               f"{self.timestep_window} holds none of the {self.num_steps} steps (step i sits at i / num_steps)")
        _check(0 <= self.identifier_ratio <= 1, "align.identifier_ratio", "must be in [0, 1]")
        _check(self.window_shift_every >= 0, "align.window_shift_every", "must not be negative (0: a static window)")
        _check(self.window_stride is None or self.window_stride > 0, "align.window_stride", "must be positive or null")
        _check(self.kl_coef >= 0, "align.kl_coef", "must not be negative")
        _check(self.lora_init in LORA_INITS, "align.lora_init",
               f"must be one of {list(LORA_INITS)}, got {self.lora_init!r}")
        _check(self.grid_every >= 0, "align.grid_every", "must not be negative")
        _check(self.flow_noise_level > 0, "align.flow_noise_level",
               "must be > 0: at 0 the flow sampler is the deterministic ODE, whose steps have no log-probability")
        _check(self.stat_min_count <= self.stat_buffer_size, "align.stat_min_count",
               f"must not exceed align.stat_buffer_size ({self.stat_buffer_size})")
        _check(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
               "align.checkpoints_total_limit", "must be at least 1 or null")
        _check(bool(self.reward), "align.reward", "name at least one reward, e.g. {jpeg_compressibility: 1.0}")
        for name in self.reward_standardize:
            _check(name in self.reward, "align.reward_standardize", f"{name!r} is not a weighted reward in align.reward")
        _check(self.decode_slice >= 0, "align.decode_slice", f"must be 0 (no slicing) or positive, got {self.decode_slice}")
        _check(self.sample_batch_size % self.samples_per_noise == 0, "align.samples_per_noise",
               f"must divide align.sample_batch_size ({self.sample_batch_size}), got {self.samples_per_noise}")
        samples = self.sample_batch_size * self.num_batches_per_epoch
        _check(samples % self.train_batch_size == 0, "align.train_batch_size",
               f"must divide the samples per epoch and process (sample_batch_size x num_batches_per_epoch "
               f"= {samples}), got {self.train_batch_size}")
        batches = samples // self.train_batch_size
        _check(batches % self.gradient_accumulation_steps == 0, "align.gradient_accumulation_steps",
               f"must divide the training batches per epoch and process ({batches}), "
               f"got {self.gradient_accumulation_steps}")
        _check(self.algorithm in ("ppo", "nft", "refl"), "align.algorithm",
               f"must be ppo, nft or refl, got {self.algorithm!r}")
        _check(self.nft_beta > 0, "align.nft_beta", f"must be positive, got {self.nft_beta}")
        _check(self.nft_decay_type in (0, 1, 2), "align.nft_decay_type",
               f"must be 0, 1 or 2, got {self.nft_decay_type}")
        _check(self.nft_guidance_scale >= 1, "align.nft_guidance_scale",
               f"must be at least 1 (1: no guidance), got {self.nft_guidance_scale}")
        _check(not (self.algorithm == "nft" and self.nft_sampler == "ode" and self.samples_per_noise > 1),
               "align.samples_per_noise", "must be 1 with align.algorithm=nft and nft_sampler=ode: the deterministic "
               "sampler draws one image per x_T, so a group's advantages would all be 0")
        for prefix, owner in (("nft", "DiffusionNFT"), ("refl", "ReFL")):
            changed = [f"align.{f.name}" for f in dataclasses.fields(self)
                       if f.name.startswith(f"{prefix}_") and getattr(self, f.name) != _default(f)]
            _check(self.algorithm == prefix or not changed, changed[0] if changed else "", f"is {owner}'s and "
                   f"read only with align.algorithm={prefix}; set that or remove the field")
        if self.algorithm == "refl":
            self._check_refl()
        _check(self.num_train_timesteps % self.timesteps_per_pass == 0, "align.timesteps_per_pass",
               f"must divide the trained timesteps per trajectory ({self.num_train_timesteps}: align.num_steps, "
               f"timestep_window and timestep_fraction), got {self.timesteps_per_pass}")
        self._check_evaluation()

    def _check_refl(self) -> None:
        first, last = (self.refl_window + [0, 0])[:2]
        _check(len(self.refl_window) == 2 and 1 <= first <= last, "align.refl_window",
               f"must be [first, last] steps from the end with 1 <= first <= last, got {self.refl_window}")
        _check(self.refl_backprop_steps > 0, "align.refl_backprop_steps", "must be positive")
        _check(self.refl_pretrain_weight >= 0, "align.refl_pretrain_weight", "must not be negative (0 turns it off)")
        _check(bool(self.train_steps), "align.refl_window",
               f"{self.refl_window} leaves no step of the {self.num_steps} from which "
               f"{self.refl_backprop_steps} steps (align.refl_backprop_steps) fit before the end")
        _check(self.samples_per_noise == 1 or self.group_noise == "independent", "align.samples_per_noise",
               "must be 1 with align.algorithm=refl (or align.group_noise independent): its deterministic sampler "
               "draws one image per x_T, so a group sharing x_T would train on copies of one sample")
        _check(self.window_shift_every == 0, "align.window_shift_every",
               "slides the ppo/nft window; with align.algorithm=refl set align.refl_window and leave this 0")

    def _check_evaluation(self) -> None:
        _check(self.eval_every >= 0, "align.eval_every", "must not be negative (0 turns the evaluation off)")
        _check(self.eval_num_prompts > 0, "align.eval_num_prompts", "must be positive")
        _check(bool(self.eval_seeds), "align.eval_seeds", "must hold at least one seed")
        _check(self.eval_num_steps is None or self.eval_num_steps > 0, "align.eval_num_steps",
               "must be positive or null")
        _check(self.eval_rewards is None or bool(self.eval_rewards), "align.eval_rewards",
               "name at least one reward, or null for align.reward")
        for name in self.eval_reward_options:
            _check(name in (self.eval_rewards or self.reward), "align.eval_reward_options",
                   f"{name!r} is not an evaluation reward (align.eval_rewards, else align.reward)")
        _check(self.early_stop_patience >= 0, "align.early_stop_patience", "must not be negative (0: never)")
        _check(self.hacking_window >= 2, "align.hacking_window", "must be at least 2 evaluations")
        for name, wanted in (("keep", self.keep == "best"), ("early_stop_patience", self.early_stop_patience > 0)):
            _check(not wanted or self.eval_every > 0, f"align.{name}",
                   "needs the held-out evaluation: set align.eval_every to a positive number of epochs")

    @property
    def train_steps(self) -> list[int]:
        """Indices (0 = first) of the steps in the timestep window, the pool trained steps are drawn from; with
        align.algorithm=refl, the steps of align.refl_window from which refl_backprop_steps steps fit."""
        if self.algorithm == "refl":
            first, last = self.refl_window
            return [i for i in range(self.num_steps - self.refl_backprop_steps + 1)
                    if first <= self.num_steps - i <= last]
        start, end = self.timestep_window
        return [i for i in range(self.num_steps) if start <= i / self.num_steps < end]

    @property
    def num_train_timesteps(self) -> int:
        """Steps trained per trajectory (one for refl: its drawn step, and the refl_backprop_steps - 1 after it)."""
        if self.algorithm == "refl":
            return 1
        return max(1, int(len(self.train_steps) * self.timestep_fraction))

    @property
    def passes_per_optimizer_step(self) -> int:
        """Backward passes accumulated into one optimizer step."""
        return self.gradient_accumulation_steps * self.num_train_timesteps // self.timesteps_per_pass


@dataclass
class ReportConfig:
    """The sample sheet of `rlbooth run`: held-out prompts drawn by stage one and stage two side by side."""

    prompt_file: str | None = None
    """Prompt set of the sheet: a name in prompts/ or a path; default: the held-out set for the subject's kind."""
    num_prompts: int = 4
    """Rows of the sheet: the first this many prompts of the set, with the identifier."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seeds of the sheet; each gives a stage-one and a stage-two column, from the same noise."""
    num_inference_steps: int = 50
    """Denoising steps of the sheet's images (the model's own scheduler)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the sheet's images."""

    def __post_init__(self) -> None:
        _check(self.num_prompts > 0, "report.num_prompts", "must be positive")
        _check(bool(self.seeds), "report.seeds", "must hold at least one seed")
        _check(self.num_inference_steps > 0, "report.num_inference_steps", "must be positive")


@dataclass
class Config:
    """Everything a run needs besides the subject."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The base pipeline."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Seeds, precision, logging."""
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    """Stage one."""
    align: AlignConfig = field(default_factory=AlignConfig)
    """Stage two."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """The sample sheet and report of `rlbooth run`."""

    def __post_init__(self) -> None:
        _check(not self.model.quantize_text_encoders or self.model.quantization != "none",
               "model.quantize_text_encoders", "quantizes with model.quantization's scheme: set it to int8 or nf4")
        if self.model.quantization != "none":
            _check(self.personalize.mode == "lora", "model.quantization",
                   "a quantized base trains LoRA only: set personalize.mode=lora, or model.quantization=none")
            _check(self.align.merge_lora_for_sampling is not True, "align.merge_lora_for_sampling",
                   "cannot fold a LoRA into quantized weights: leave it null with model.quantization")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


from rlbooth.config_io import (  # noqa: E402  (loading needs the dataclasses above)
    apply_overrides, deep_merge, from_dict, load_config, read_preset, resolve_preset, type_name,
)
