"""Mutation check: each named mistake, made in a scratch copy of the package, must make its guards fail.

    python -m tests.mutations                 # every quick mutation; prints a Markdown table
    python -m tests.mutations --slow          # also those guarded by slow tests (toy worlds, sign tests)
    python -m tests.mutations ppo-surrogate-sign ddim-variance   # just these
    python -m tests.mutations --list

A mutation is one exact text replacement in one file. Its text must occur exactly once in the source,
so a refactor that moves the code makes the mutation fail loudly ("stale") instead of testing nothing.
The guards first run on the unmutated copy (a guard that already fails proves nothing), then once per
mutation; "caught" means pytest reported failed tests. Exit status 1 if any mutation is missed or stale.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPIED = ["rlbooth", "tests", "examples", "configs", "prompts", "dreambench", "benchmarks", "pyproject.toml", "setup.cfg",
          "setup.py", "README.md"]
DATA_PACKAGES = {"presets": "configs", "prompt_sets": "prompts", "dreambench": "dreambench"}
"""setup.py's mapping of the data folders into the package, rebuilt in the scratch copy."""


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    """Path relative to the repository."""
    old: str
    new: str
    tests: tuple[str, ...]
    """pytest node ids (or files) that must fail under the mutation."""
    slow: bool = False
    """The guards take minutes (toy worlds, sign tests): run only with --slow."""


SIGN_TEST = "tests/align/test_train.py::test_training_climbs_the_reward_in_its_sign"

MUTATIONS: list[Mutation] = [
    Mutation("ppo-surrogate-sign", "rlbooth/align/ppo.py",
             "loss = torch.mean(torch.maximum(unclipped, clipped))",
             "loss = -torch.mean(torch.maximum(unclipped, clipped))",
             ("tests/align/test_ppo.py", "tests/align/test_train.py::test_one_update_ascends_the_surrogate_on_its_samples")),
    Mutation("ppo-ratio-inverted", "rlbooth/align/ppo.py",
             "log_ratio = log_prob - old_log_prob", "log_ratio = old_log_prob - log_prob",
             ("tests/align/test_ppo.py",)),
    Mutation("ppo-clip-min-for-max", "rlbooth/align/ppo.py",
             "torch.maximum(unclipped, clipped)", "torch.minimum(unclipped, clipped)",
             ("tests/align/test_ppo.py",)),
    Mutation("advantage-clipping-off", "rlbooth/align/ppo.py",
             "return np.clip(advantages, -max_abs, max_abs)", "return advantages",
             ("tests/align/test_ppo.py::test_batch_and_clip_advantages", "tests/align/test_advantage_clipping.py")),
    Mutation("group-advantage-batch-mean", "rlbooth/align/ppo.py",
             "residuals = rewards - (np.bincount(inverse, weights=rewards) / counts)[inverse]",
             "residuals = rewards - rewards.mean()",
             ("tests/align/test_ppo.py",)),
    Mutation("tracker-batch-stats-forever", "rlbooth/align/ppo.py",
             "reference = np.asarray(buffer) if len(buffer) >= self.min_count else rewards",
             "reference = rewards",
             ("tests/align/test_ppo.py",)),
    Mutation("ddim-variance", "rlbooth/align/ddim.py",
             "variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)",
             "variance = (1 - alpha_t) / (1 - alpha_prev) * (1 - alpha_t / alpha_prev)",
             ("tests/align/test_ddim.py",)),
    Mutation("ddim-log-prob-summed", "rlbooth/align/ddim.py",
             "return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))",
             "return log_prob.sum(dim=tuple(range(1, log_prob.ndim)))",
             ("tests/align/test_ddim.py", "tests/align/test_flow.py")),
    Mutation("ddim-log-prob-gradient-through-sample", "rlbooth/align/ddim.py",
             "diff = sample.detach().to(torch.float32) - mean", "diff = sample.to(torch.float32) - mean",
             ("tests/align/test_ddim.py",)),
    Mutation("sde-mean-correction-sign", "rlbooth/align/flow.py",
             "mean = x + (v + std_t**2 / (2 * s) * (x + (1 - s) * v)) * dt",
             "mean = x + (v - std_t**2 / (2 * s) * (x + (1 - s) * v)) * dt",
             ("tests/align/test_flow.py",)),
    Mutation("sde-std-without-dt", "rlbooth/align/flow.py",
             "return mean, std_t * (-dt).sqrt()", "return mean, std_t",
             ("tests/align/test_flow.py",)),
    # Issue 27: Flow-GRPO's switches against transcriptions of the references.
    Mutation("flow-grpo-kl-with-dt", "rlbooth/align/flow.py",
             "return gaussian_kl(mean, ref_mean, std / (-dt).sqrt())", "return gaussian_kl(mean, ref_mean, std)",
             ("tests/align/test_reference_switches.py",)),
    Mutation("detach-uncond-ignored", "rlbooth/align/rollout.py",
             "uncond = uncond.detach() if detach_uncond else uncond", "uncond = uncond",
             ("tests/align/test_reference_switches.py",)),
    Mutation("first-steps-are-the-last", "rlbooth/align/steps.py",
             "return pool[:k].expand(len(sample_indices), k).clone()",
             "return pool[-k:].expand(len(sample_indices), k).clone()",
             ("tests/align/test_reference_switches.py",)),
    Mutation("flow-grpo-std-of-residuals", "rlbooth/align/ppo.py",
             "return residuals / (rewards.std() + _FLOW_GRPO_STD_EPS)",
             "return residuals / (residuals.std() + _FLOW_GRPO_STD_EPS)",
             ("tests/align/test_reference_switches.py",)),
    Mutation("sd3-precondition-sign", "rlbooth/personalize/flow_loss.py",
             "return noisy - _per_row(sigmas, noisy) * model_pred.to(noisy.dtype), latents",
             "return noisy + _per_row(sigmas, noisy) * model_pred.to(noisy.dtype), latents",
             ("tests/personalize/test_flow_loss.py",)),
    Mutation("family-density-ignored", "rlbooth/personalize/objective.py",
             "self.density = cfg.timestep_density or density", "self.density = cfg.timestep_density or 'logit_normal'",
             ("tests/personalize/test_flow_loss.py",)),
    Mutation("kl-sign", "rlbooth/align/algorithms/ppo.py",
             "loss = loss + cfg.kl_coef * kl", "loss = loss - cfg.kl_coef * kl",
             ("tests/align/test_train.py::test_kl_term_pulls_the_lora_towards_stage_one",)),
    Mutation("prior-preservation-halves-swapped", "rlbooth/personalize/loss.py",
             "pred_inst, pred_prior = model_pred.chunk(2)", "pred_prior, pred_inst = model_pred.chunk(2)",
             ("tests/personalize/test_loss.py",)),
    Mutation("min-snr-on-both-halves", "rlbooth/personalize/loss.py",
             "prior = _mse(pred_prior, target_prior, None)",
             "prior = _mse(pred_prior, target_prior, weights.chunk(2)[1] if weights is not None else None)",
             ("tests/personalize/test_loss.py",)),
    Mutation("identity-reference-unnormalized", "rlbooth/rewards/identity.py",
             "return torch.nn.functional.normalize(_normalize_rows(embeddings).mean(dim=0), dim=0)",
             "return _normalize_rows(embeddings).mean(dim=0)",
             ("tests/rewards/test_identity.py",)),
    Mutation("identity-embeddings-unnormalized", "rlbooth/rewards/identity.py",
             "return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)",
             "return features",
             ("tests/rewards/test_identity.py", "tests/rewards/test_identity_dlib.py")),
    # README, identity on real photos: skipping the alignment, or pixels as the embedding, fails (checked by hand once).
    Mutation("dlib-face-unaligned", "rlbooth/rewards/dlib_faces.py",
             "return np.asarray(dlib.get_face_chip(rgb, shape, size=CHIP_SIZE, padding=CHIP_PADDING))",
             "return np.asarray(dlib.resize_image(np.ascontiguousarray(rgb[max(y1, 0):y2, max(x1, 0):x2]), "
             "CHIP_SIZE, CHIP_SIZE))",
             ("tests/rewards/test_identity_dlib.py",)),
    Mutation("dlib-pixels-as-embedding", "rlbooth/rewards/dlib_faces.py",
             "descriptors = self.recognizer.compute_face_descriptor(chips)",
             "descriptors = [chip[::10, ::10].astype(np.float64).ravel() for chip in chips]",
             ("tests/rewards/test_identity_dlib.py",)),
    # Issue 29: DiffusionNFT.
    Mutation("nft-r-flipped", "rlbooth/align/algorithms/nft.py",
             "return (advantages / adv_clip_max / 2 + 0.5).clamp(0, 1)",
             "return (0.5 - advantages / adv_clip_max / 2).clamp(0, 1)",
             ("tests/align/test_nft.py::test_flow_loss_equals_the_reference_formula",
              "tests/align/test_nft.py::test_reward_weight_of_each_advantage_mode")),
    Mutation("nft-old-policy-is-the-trained-one", "rlbooth/align/algorithms/nft.py",
             "old.copy_(old * d + p.detach() * (1 - d))", "old.copy_(p.detach())",
             ("tests/align/test_nft.py::test_old_policy_samples_and_follows_the_decay_schedule",)),
    Mutation("nft-samples-with-trained-weights", "rlbooth/align/algorithms/nft.py",
             "return self._old_weights()", "return super().sampling_weights()",
             ("tests/align/test_nft.py::test_old_policy_samples_and_follows_the_decay_schedule",)),
    Mutation("nft-resume-loses-old-policy", "rlbooth/align/algorithms/nft.py",
             'old.copy_(tensors[f"old.{i}"])', "old.copy_(old)",
             ("tests/align/test_nft.py::test_killed_nft_run_resumes_to_the_same_weights",), slow=True),
    # Issue 30: held-out evaluation, the kept epoch, the alarm, per-reward advantages.
    Mutation("per-reward-advantages-unstandardized", "rlbooth/align/ppo.py",
             "return (total - total.mean()) / (total.std() + _STD_EPS)", "return total",
             ("tests/align/test_heldout.py::test_per_reward_advantages_equal_a_hand_computation",)),
    Mutation("hacking-alarm-or", "rlbooth/align/heldout.py",
             "if rose > 0 and fell < 0:", "if rose > 0 or fell < 0:",
             ("tests/align/test_heldout.py::test_alarm_fires_only_when_training_rises_and_heldout_falls",)),
    Mutation("best-epoch-is-the-worst", "rlbooth/align/heldout.py",
             'return max(table, key=lambda row: row["selection"], default=None) if table else None',
             'return min(table, key=lambda row: row["selection"], default=None) if table else None',
             ("tests/align/test_heldout.py::test_evaluations_since_best_counts_from_the_earliest_best",)),
    Mutation("keep-best-ignored", "rlbooth/align/train.py",
             "        self.keep_best()\n", "",
             ("tests/align/test_heldout.py::test_keep_best_outputs_the_best_epochs_lora",)),
    # Issue 28: the kill-and-resume helper's guards (tests/align/conftest.py).
    Mutation("resume-forgets-heldout-table", "rlbooth/align/train.py",
             'self.watch.load_state_dict(state.get("heldout", {"table": []}))', "pass",
             ("tests/align/test_heldout.py::test_resume_keeps_the_table_and_the_best_lora",)),
    Mutation("resume-forgets-reward-tracker", "rlbooth/align/train.py",
             'self.tracker.load_state_dict(state["tracker"])', "pass",
             ("tests/align/test_train.py::test_killed_run_resumes_to_the_same_result[tiny]",), slow=True),
    # Issue 34: LoRA files, reuse, locks, export metadata.
    Mutation("lora-mixed-layout", "rlbooth/models.py",
             'return {key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): value\n'
             "            for key, value in layers.items()}",
             "return layers",
             ("tests/test_lora_files.py::test_wide_target_lora_loads_every_module_in_plain_diffusers",)),
    Mutation("stage-reuse-ignores-config", "rlbooth/stages.py",
             "differing = sorted(key for key in request if made is not None and key in made and made[key] != "
             "request[key])",
             "differing = []",
             ("tests/test_output_folders.py::test_readme_sequence_toy_then_toy_flow_never_reuses_the_unet_stages",)),
    Mutation("output-lock-off", "rlbooth/lock.py",
             "fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass",
             ("tests/test_output_folders.py::test_a_lock_left_by_a_killed_process_is_taken_over",)),
    Mutation("export-without-base-version", "rlbooth/export.py",
             '"ss_base_model_version": ', '"ss_base_model": ',
             ("tests/test_export.py",)),
    # Issue 33: Qwen-Image's and Z-Image's guidance and conditioning against their pipelines.
    Mutation("qwen-cfg-without-norm-rescale", "rlbooth/families/qwenimage.py",
             "rescaled = combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))",
             "rescaled = combined",
             ("tests/families/test_qwenimage.py::test_two_true_cfg_steps_equal_the_pipelines",)),
    Mutation("qwen-template-tokens", "rlbooth/families/qwenimage.py",
             "DROPPED_TOKENS = 34", "DROPPED_TOKENS = 33",
             ("tests/families/test_qwenimage.py",)),
    Mutation("zimage-velocity-sign", "rlbooth/families/zimage.py",
             "return -torch.stack(out).squeeze(2)", "return torch.stack(out).squeeze(2)",
             ("tests/families/test_zimage.py::test_two_cfg_steps_equal_the_pipelines",)),
    # Memory (issue 31): the text encoders and the denoiser never share the device; frozen weights arrive cast.
    Mutation("offload-grid-prompts-not-encoded-first", "rlbooth/align/train.py",
             "self.embed([p.text for p in expand(templates, self.subject)] + self.grid_texts +",
             "self.embed([p.text for p in expand(templates, self.subject)] +",
             ("tests/align/test_memory_savings.py::test_offloaded_text_encoders_stay_off_for_grids_and_held_out_sets",)),
    Mutation("stage-one-frozen-weights-moved-uncast", "rlbooth/personalize/train.py",
             "    cast_frozen(pipe, family, cfg, weight_dtype(accelerator))\n", "",
             ("tests/test_memory.py::test_stage_one_frozen_weights_reach_the_device_in_the_runs_16_bit_dtype",)),
    Mutation("lora-targets-unchecked", "rlbooth/models.py",
             'if not any(name == target or name.endswith("." + target) for name in layers):', "if False:",
             ("tests/align/test_lora_targets.py",)),
    Mutation("lora-targets-exact-names-only", "rlbooth/models.py",
             'if not any(name == target or name.endswith("." + target) for name in layers):',
             "if not any(name == target for name in layers):",
             ("tests/align/test_lora_targets.py",)),
    Mutation("text-encoder-not-quantized", "rlbooth/models.py",
             "for name in family.large_text_encoders if cfg.quantize_text_encoders else ():",
             "for name in ():",
             ("tests/test_quantize.py::test_large_text_encoder_quantized_encodes_trains_and_the_lora_loads_unquantized",)),
    Mutation("plan-int8-two-bytes", "rlbooth/plan.py", '"int8": 1.0,', '"int8": 2.0,',
             ("tests/test_quantize.py::test_the_int8_base_stores_what_plan_counts",)),
    Mutation("stored-bytes-by-presented-dtype", "rlbooth/quantize.py",
             'if type(t).__name__ not in ("Tensor", "Parameter")', 'if False and type(t).__name__ not in ("Tensor", "Parameter")',
             ("tests/test_quantize.py::test_the_int8_base_stores_what_plan_counts",)),
    # Reward models on the device only while they score (align.offload_rewards).
    Mutation("offload-refl-before-backward", "rlbooth/rewards/composite.py",
             "with self._placed(name, until_backward=images):", "with self._placed(name):",
             ("tests/rewards/test_offload.py::test_refl_backpropagates_through_the_models_on_the_device",)),
    Mutation("offload-refl-never-back", "rlbooth/rewards/composite.py",
             "until_backward.register_hook(lambda grad: self._offload(modules))", "pass",
             ("tests/rewards/test_offload.py::test_refl_backpropagates_through_the_models_on_the_device",)),
    Mutation("offload-scores-on-the-host", "rlbooth/rewards/composite.py",
             "on_device(modules, self._devices[name])", "on_device(modules, 'cpu')",
             ("tests/rewards/test_offload.py::test_models_are_on_the_device_only_while_they_score",)),
    Mutation("aesthetic-head-not-listed", "rlbooth/rewards/clip_models.py",
             "reward.torch_modules = [encoder.model, mlp]", "reward.torch_modules = [encoder.model]",
             ("tests/rewards/test_offload.py::test_every_model_reward_lists_its_torch_modules",)),
    Mutation("offload-not-passed-to-evaluation", "rlbooth/align/train.py",
             "eval_reward_options(cfg), context=context, offload_models=cfg.offload_rewards)",
             "eval_reward_options(cfg), context=context)",
             ("tests/align/test_memory_savings.py::test_offloaded_reward_models_train_the_same_lora",)),
    Mutation("decode-slice-ignored", "rlbooth/align/rollout.py",
             "    if slice_size and len(latents) > slice_size:", "    if False:",
             ("tests/test_memory.py::test_sliced_decoding_lowers_the_measured_peak_of_a_decode",), slow=True),
    # Reward feedback learning (issue 32): the loss's sign, the weights, the refusal, the reward gradients.
    Mutation("refl-loss-sign", "rlbooth/align/algorithms/refl.py", "refl_loss(total, ", "refl_loss(-total, ",
             ("tests/align/test_refl.py::test_loss_is_minus_the_weighted_reward_of_the_decoded_x0_prediction",)),
    Mutation("refl-composite-unweighted", "rlbooth/rewards/composite.py",
             "self.weights[name] * score.to(", "score.to(", ("tests/rewards/test_differentiable.py",)),
    Mutation("refl-non-differentiable-accepted", "rlbooth/align/train.py",
             'differentiable=config.align.algorithm == "refl")', "differentiable=False)",
             ("tests/align/test_refl.py::test_non_differentiable_reward_is_refused_by_name_before_any_model_loads",)),
    Mutation("clip-reward-gradient-detached", "rlbooth/rewards/clip_models.py",
             "(chunk if grad else chunk.detach())", "chunk.detach()",
             ("tests/rewards/test_reward_gradients.py::test_gradient_matches_finite_differences",)),
    Mutation("reward-models-trainable", "rlbooth/rewards/clip_models.py",
             "return model.to(device).eval().requires_grad_(False)", "return model.to(device).eval()",
             ("tests/rewards/test_reward_gradients.py::test_reward_weights_stay_frozen",)),
    Mutation("face-warp-matrix-transposed", "rlbooth/rewards/face_torch.py",
             "torch.linalg.inv(forward) @ torch.linalg.inv(", "torch.linalg.inv(forward).transpose(1, 2) @ torch.linalg.inv(",
             ("tests/rewards/test_face_gradients.py::test_torch_warp_matches_norm_crop",)),
    Mutation("arcface-input-unnormalized", "rlbooth/rewards/face_torch.py",
             "features = self.graph((crops * 255 - self.input_mean) / self.input_std)",
             "features = self.graph(crops * 255)",
             ("tests/rewards/test_face_gradients.py::test_converted_arcface_equals_onnxruntime",)),
    Mutation("onnx-prelu-as-relu", "rlbooth/rewards/onnx_torch.py",
             "return torch.where(x >= 0, x, x * slope)", "return torch.relu(x)",
             ("tests/rewards/test_face_gradients.py::test_converted_arcface_equals_onnxruntime",)),
    Mutation("ode-sampler-sde-in-window", "rlbooth/align/policy.py",
             "noise_level=1.0, sde_steps=(), fixed_steps=True)", "noise_level=1.0, sde_steps=(), fixed_steps=False)",
             ("tests/align/test_policy.py::test_the_ode_sampler_stays_the_euler_ode_in_the_trained_window",)),
    Mutation("ddim-ode-prev-timestep-off-by-one", "rlbooth/align/policy.py",
             "prev_t = t - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps",
             "prev_t = t - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps + 1",
             ("tests/align/test_nft.py::test_ddpm_sampler_and_forward_process_are_diffusers_ddim_at_every_sampling_step",)),
    Mutation("ddpm-alpha-at-previous-timestep", "rlbooth/align/policy.py",
             "alphas_cumprod.float()[self._t(step)]", "alphas_cumprod.float()[self._t(step) - 1]",
             ("tests/align/test_nft.py::test_ddpm_sampler_and_forward_process_are_diffusers_ddim_at_every_sampling_step",)),
    # The toy worlds' guards: stage two's gain must vanish with the update's sign flipped (README, the toy world).
    Mutation("ppo-surrogate-sign-toy-worlds", "rlbooth/align/ppo.py",
             "loss = torch.mean(torch.maximum(unclipped, clipped))",
             "loss = -torch.mean(torch.maximum(unclipped, clipped))",
             ("tests/toyworld/test_experiment.py",), slow=True),
    Mutation("nft-r-flipped-toy-world", "rlbooth/align/algorithms/nft.py",
             "return (advantages / adv_clip_max / 2 + 0.5).clamp(0, 1)",
             "return (0.5 - advantages / adv_clip_max / 2).clamp(0, 1)",
             ("tests/toyworld/test_experiment.py::TestFlowWorld::test_nft_wins_the_scene_back_on_held_out_prompts",),
             slow=True),
    Mutation("no-gradient-sync", "rlbooth/align/train.py",
             "self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)",
             "self.optimizer, self.lr_scheduler = accelerator.prepare(optimizer, lr_scheduler); self.unet = denoiser",
             ("tests/align/test_distributed.py::test_two_processes_equal_one_process_with_the_same_global_batch[sd]",)),
    Mutation("class-images-at-the-pipelines-default-size", "rlbooth/personalize/class_images.py",
             "autocast_dtype, resolution, encoded)", "autocast_dtype, None, encoded)",
             ("tests/personalize/test_train.py::test_class_images_are_drawn_at_the_size_the_grids_are",)),
    Mutation("train-prompt-seeds-ignored", "rlbooth/toyworld/experiment.py",
             "return by_model if len(by_model) < len(by_set) else by_set", "return by_model",
             ("tests/toyworld/test_experiment_cli.py::"
              "test_each_model_and_prompt_set_is_scored_on_the_shorter_of_its_seed_lists",)),
    Mutation("class-images-without-autocast", "rlbooth/personalize/train.py",
             "autocast_dtype=sampling_autocast(accelerator))", "autocast_dtype=None)",
             ("tests/test_memory.py::test_stage_one_frozen_weights_reach_the_device_in_the_runs_16_bit_dtype",)),
    Mutation("nft-r-flipped-all-families", "rlbooth/align/algorithms/nft.py",
             "return (advantages / adv_clip_max / 2 + 0.5).clamp(0, 1)",
             "return (0.5 - advantages / adv_clip_max / 2).clamp(0, 1)",
             ("tests/align/test_nft.py::test_nft_climbs_the_reward_in_its_sign",), slow=True),
    Mutation("refl-loss-sign-all-families", "rlbooth/align/algorithms/refl.py", "refl_loss(total, ",
             "refl_loss(-total, ", ("tests/align/test_refl.py::test_refl_climbs_the_reward_in_its_sign",), slow=True),
    Mutation("ppo-surrogate-sign-all-families", "rlbooth/align/ppo.py",
             "loss = torch.mean(torch.maximum(unclipped, clipped))",
             "loss = -torch.mean(torch.maximum(unclipped, clipped))",
             (SIGN_TEST,), slow=True),
]


def scratch_copy(root: Path) -> Path:
    """The sources with the data folders mapped into the package as setup.py installs them; no bytecode."""
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.exists():
            shutil.copy2(source, root / name)
    for package, folder in DATA_PACKAGES.items():
        if not (root / "rlbooth" / package).exists():
            shutil.copytree(REPO / folder, root / "rlbooth" / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    """pytest's exit status on the scratch copy (its rlbooth first on the path, for subprocesses too)."""
    env = os.environ | {"PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "300"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        code, tail = -1, f"timed out after {timeout:.0f} s"
    return code, time.perf_counter() - start, tail


def check(mutation: Mutation, root: Path, timeout: float) -> tuple[str, float, str]:
    path = root / mutation.file
    original = path.read_text()
    count = original.count(mutation.old)
    if count != 1:
        return f"stale ({count} matches)", 0.0, f"{mutation.file}: the mutated text occurs {count} times"
    path.write_text(original.replace(mutation.old, mutation.new))
    try:
        code, seconds, tail = run_tests(root, mutation.tests, timeout)
    finally:
        path.write_text(original)
    verdict = {0: "MISSED", 1: "caught"}.get(code, f"error (pytest exit {code})")
    return verdict, seconds, tail


def failure(tail: str) -> str:
    """pytest's one-line summary of the first failure (-ra), so the table shows it was caught for its reason."""
    lines = [line for line in tail.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if not lines:
        return ""
    test, _, message = lines[0].partition(" - ")
    return f"{test.rsplit('::', 1)[-1]}: {message}"[:120].replace("|", "/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all quick ones)")
    parser.add_argument("--slow", action="store_true", help="include the mutations guarded by slow tests")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the guards unmutated first")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    if unknown := [n for n in args.names if n not in known]:
        parser.error(f"unknown mutation(s) {unknown}; --list shows them")
    chosen = [known[n] for n in args.names] if args.names else [m for m in MUTATIONS if args.slow or not m.slow]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:40s} {m.file}{'  (slow)' if m.slow else ''}")
        return 0
    with tempfile.TemporaryDirectory(prefix="rlbooth-mutations-") as tmp:
        root = scratch_copy(Path(tmp))
        if not args.no_baseline:
            guards = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            code, seconds, tail = run_tests(root, guards, args.timeout)
            print(f"baseline: the guards {'pass' if code == 0 else 'FAIL'} unmutated ({seconds:.0f} s)", flush=True)
            if code != 0:
                print(tail)
                return 1
        rows, bad = [], []
        for m in chosen:
            verdict, seconds, tail = check(m, root, args.timeout)
            why = failure(tail)
            rows.append(f"| {m.name} | `{m.file}` | {', '.join(f'`{t}`' for t in m.tests)} | {verdict} | {why} "
                        f"| {seconds:.0f} |")
            print(f"{m.name}: {verdict} ({seconds:.0f} s) {why}", flush=True)
            if verdict != "caught":
                bad.append(m.name)
                print(tail)
    print("\n| mutation | file | guards | result | first failure | seconds |\n| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if bad:
        print(f"\nnot caught: {', '.join(bad)}")
    return int(bool(bad))


if __name__ == "__main__":
    sys.exit(main())
