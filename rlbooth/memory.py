"""Memory savings that move frozen components off the device, and the measured peak memory of one training
pass of a denoiser with a LoRA (what `rlbooth plan` estimates) or of one decode of stage two's samples.

Offloading: each stage encodes every prompt it will use first, with the denoiser not yet on the device
(`to_device` leaves it out), then the frozen text encoders wait in host memory for good: grids and class images
are drawn from the embeddings. Stage one's VAE leaves once the photos' latents are cached and comes back to
decode validation grids (`on_device`).

A pass is the denoiser's forward and backward at a stage's batch: stage one's rows are the photos and the
prior-preservation images, stage two's the CFG pair of each trajectory (the PPO loss on top is a few
tensors per row). A decode is the VAE turning a sampling batch's latents into the rewards' images, whole or
`align.decode_slice` at a time. On CUDA the figure is the allocator's peak above what was allocated before the
pass; on a CPU, the process's peak RSS above the peak before it, so each measurement runs in a process of its
own (`measure`), where nothing earlier peaked higher.
"""

from __future__ import annotations

import multiprocessing
import resource
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch


def frozen_modules(pipe: Any, names: list[str], trained: list[str]) -> list[torch.nn.Module]:
    """The pipeline's components of these names that exist and are not trained."""
    return [getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None and n not in trained]


def to_device(pipe: Any, device: Any, but: list[str]) -> None:
    """The pipeline's modules on the device, except the components named in `but` (they stay where they are)."""
    if not but:
        pipe.to(device)
        return
    for module in frozen_modules(pipe, list(pipe.components), but):
        if isinstance(module, torch.nn.Module):
            module.to(device)


def offload(modules: list[torch.nn.Module]) -> None:
    """Move the modules to host memory."""
    for module in modules:
        module.to("cpu")


@contextmanager
def on_device(modules: list[torch.nn.Module], device: Any) -> Iterator[None]:
    """The offloaded modules on the device for a while (a sample grid), then back in host memory."""
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        offload(modules)


@dataclass
class Case:
    """One measurement: a denoiser built from its config with random weights, a LoRA, one pass."""

    library: str
    class_name: str
    config: dict
    family: str
    batch: int
    latent: int
    """Latent side (the image side over the VAE's factor, 8)."""
    dtype: str = "bfloat16"
    """Dtype of the frozen weights and the inputs; the LoRA is fp32."""
    checkpointing: bool = False
    quantization: str = "none"
    tokens: int = 77
    """Text tokens of the conditioning (T5's: 256 for SD3, 512 for FLUX)."""
    lora_targets: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])


@dataclass
class DecodeCase:
    """One decode of stage two's samples for the rewards (`rlbooth.align.rollout.decode`): an AutoencoderKL built
    from its config with random weights, `batch` random latents of side `latent`, `slice` per VAE call."""

    config: dict
    batch: int
    latent: int
    slice: int = 0
    """Latents per VAE call (align.decode_slice; 0: the whole batch at once)."""
    dtype: str = "float32"


def from_config(library: str, class_name: str, config: dict, dtype: str, device: str) -> torch.nn.Module:
    """A model with random weights, built in `dtype` on the device: no fp32 copy of a 12B model, and no transient
    that would raise the peak a measurement starts from."""
    import importlib

    cls = getattr(importlib.import_module(library), class_name)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            return cls.from_config(config)
    finally:
        torch.set_default_dtype(default)


def build(case: Case, device: str) -> torch.nn.Module:
    """The denoiser with random weights in `case.dtype` (Linear weights int8 with `int8`), and a rank-4 LoRA."""
    from rlbooth.models import add_lora

    model = from_config(case.library, case.class_name, case.config, case.dtype, device)
    if case.quantization == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    add_lora(model, 4, None, case.lora_targets)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if case.checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def real_inputs(case: Case, model: torch.nn.Module, device: str) -> dict:
    """Random inputs of the shapes `rlbooth.plan.denoiser_inputs` describes, on the device."""
    from rlbooth.plan import denoiser_inputs

    def materialize(value):
        if isinstance(value, dict):
            return {k: materialize(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor):
            if value.dtype in (torch.long, torch.int64):
                return torch.full(value.shape, 500, device=device, dtype=value.dtype)
            return torch.randn(value.shape, device=device, dtype=value.dtype) if value.dtype.is_floating_point \
                else value.to(device)
        return value

    meta = denoiser_inputs(case.family, model, case.batch, case.latent, {"t5_tokens": case.tokens})
    inputs = materialize(meta)
    if case.family in ("sd3", "flux"):
        inputs["timestep"] = torch.full((case.batch,), 500.0 if case.family == "sd3" else 0.5, device=device)
    if case.family == "flux":
        side = case.latent // 2
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        inputs["img_ids"] = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(device)
        inputs["txt_ids"] = torch.zeros(case.tokens, 3, device=device)
        inputs["guidance"] = torch.full((case.batch,), 3.5, device=device) if model.config.guidance_embeds else None
    return inputs


def one_pass(model: torch.nn.Module, inputs: dict) -> None:
    out = model(**inputs)
    out = out[0] if isinstance(out, tuple) else out.sample
    out.float().pow(2).mean().backward()


def host_peak_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM belongs to the address space, which exec replaces;
    ru_maxrss survives exec, so in a child started from a large process (pytest after many tests) it holds the
    parent's size and a pass below it would measure 0."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_while(run: Callable[[], Any], device: str) -> tuple[int, Any]:
    """What `run()` returns and its peak memory on the device: bytes above the peak before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = host_peak_bytes()
    result = run()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, result
    return host_peak_bytes() - before, result


def peak_of_pass(case: Case) -> dict:
    """Run one pass in this process and return its peak (bytes above the peak before it) and the LoRA grads'
    checksum (equal with checkpointing on and off)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(case, device)
    inputs = real_inputs(case, model, device)
    peak, _ = peak_while(lambda: one_pass(model, inputs), device)
    grads = sum(p.grad.double().sum().item() for p in model.parameters() if p.grad is not None)
    return {"peak_bytes": peak, "grad_sum": grads, "device": device}


def peak_of_decode(case: DecodeCase) -> dict:
    """Decode in this process and return its peak (bytes above the peak before it) and the images' checksum
    (equal, to float rounding, whatever the slice)."""
    from rlbooth.align.rollout import decode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = from_config("diffusers", "AutoencoderKL", case.config, case.dtype, device).eval()
    latents = torch.randn(case.batch, vae.config.latent_channels, case.latent, case.latent, device=device)
    peak, images = peak_while(lambda: decode(vae, latents, case.slice), device)
    return {"peak_bytes": peak, "image_sum": images.double().sum().item(), "device": device}


PRELOADED = [__name__, "rlbooth.align.rollout", "diffusers.models.autoencoders.autoencoder_kl",
             "diffusers.models.unets.unet_2d_condition"]  # the last brings diffusers.models.transformers
"""Imported once by `measure`'s server."""
MEASURED = {"Case": (Case, peak_of_pass), "DecodeCase": (DecodeCase, peak_of_decode)}
"""What `measure`'s child runs, by the case's class name."""


def measure(case: Case | DecodeCase, timeout: float = 900) -> dict:
    """`peak_of_pass` (or `peak_of_decode`) in a process of its own, forked from a server that imported torch
    and diffusers once (multiprocessing's forkserver), which saves a fresh interpreter's imports per case (about
    9 s of CPU here). A forked child's peak RSS (VmHWM) starts at its size at the fork, not at its parent's peak,
    and the server holds nothing but the imports, so the case measures its own peak as a fresh process would.
    The server never touches CUDA, so the child can. As with any forkserver, a script that calls this runs its
    top level again in the child unless that sits under `if __name__ == "__main__":`."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_measure_and_send, args=(type(case).__name__, asdict(case), sender), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise RuntimeError(f"memory measurement of {case} did not finish in {timeout:.0f} s")
        ok, result = receiver.recv()
    except EOFError:  # killed (the OOM killer) or crashed before it could send
        child.join()
        raise RuntimeError(f"memory measurement of {case} died (exit code {child.exitcode})") from None
    finally:
        child.kill()
        child.join()
        receiver.close()
    if not ok:
        raise RuntimeError(f"memory measurement of {case} failed:\n{result}")
    return result


def _measure_and_send(kind: str, fields: dict, sender: Any) -> None:
    case_class, run = MEASURED[kind]
    try:
        sender.send((True, run(case_class(**fields))))
    except BaseException:  # the traceback goes to the parent, which raises it
        sender.send((False, traceback.format_exc()))
    finally:
        sender.close()
