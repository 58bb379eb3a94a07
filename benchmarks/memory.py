"""Memory at the real models' size: `rlbooth plan`'s figures for the presets, measured training passes, and
measured decodes of stage two's samples.

    python benchmarks/memory.py plan [--preset sdxl-lora ...]          # estimates, every saving off and on
    python benchmarks/memory.py measure [--model sdxl sd35] [--px 256 512] [--batch 2] [--checkpointing off on]
    python benchmarks/memory.py decode [--px 256] [--batch 8] [--slice 0 1 2] [--dtype float32 bfloat16]

`measure` builds the SDXL UNet (2.6 B) and the SD3.5-Medium transformer (2.5 B) from their real configs
with random bf16 weights, adds a rank-4 LoRA, and runs one forward and backward at the batch both stages use
with these presets (stage one: a photo and a class image; stage two at train batch 1: the CFG pair), with
gradient checkpointing off and on, each in a process of its own (rlbooth.memory.measure). It prints the
measured peak above the loaded weights beside plan's estimate of the same pass (activations + LoRA gradients).
On a CPU the peak is RSS; on CUDA the allocator's. Check free memory first: a pass at 512 px without checkpointing needs
several GB beyond the 5 GB of weights.

`decode` builds the SD 1.5 / SDXL VAE (their configs are the same; SD3's and FLUX's differ in the decoder's first
conv only) with random weights and decodes a sampling batch of latents as stage two does for the rewards, whole
(slice 0) or `align.decode_slice` at a time, each in a process of its own; the peak above the loaded VAE.
"""

from __future__ import annotations

import argparse
import sys
import time

from rlbooth.config import load_config
from rlbooth.memory import Case, DecodeCase, measure
from rlbooth.plan import ARCHITECTURES, GIB, activations, build_meta, lora_parameters, plan

REAL = {"sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "unet", 77),
        "sd35": ("stabilityai/stable-diffusion-3.5-medium", "transformer", 256 + 77),
        "flux": ("black-forest-labs/FLUX.1-dev", "transformer", 512)}
"""Model, denoiser component and text tokens of the conditioning (SD3: CLIP's 77 then T5's 256)."""
FAMILY = {"sdxl": "sdxl", "sd35": "sd3", "flux": "flux"}
PRESETS = ["sd15-lora", "sdxl-lora", "sd35-lora", "flux-lora"]
SAVINGS_OFF = ["personalize.gradient_checkpointing=false", "align.gradient_checkpointing=false",
               "model.quantization=none", "personalize.use_8bit_adam=false", "personalize.offload_encoders=false",
               "align.offload_text_encoders=false"]


def plan_table(presets: list[str]) -> None:
    print("| preset | stage | savings off: peak | preset: while training | preset: peak | preset's savings |")
    print("| --- | --- | --- | --- | --- | --- |")
    for preset in presets:
        off, on = plan(load_config(preset, SAVINGS_OFF)), plan(load_config(preset, []))
        for a, b in zip(off, on):
            savings = ", ".join(k for k, v in b.savings.items() if v) or "none"
            print(f"| {preset} | {a.stage} | {a.peak / GIB:.1f} | {b.training / GIB:.1f} | {b.peak / GIB:.1f} | {savings} |")


def estimate(model: str, batch: int, px: int, checkpointing: bool) -> float:
    """plan's figure for the same pass: activations plus the LoRA's fp32 gradients."""
    import torch

    repo, component, tokens = REAL[model]
    denoiser = build_meta(*ARCHITECTURES[repo][component]).to(dtype=torch.bfloat16)
    targets = ["to_k", "to_q", "to_v", "to_out.0"]
    grads = 4 * lora_parameters(denoiser, 4, targets)
    saved = activations(FAMILY[model], denoiser, batch, px // 8, 4, targets, tokens - 77 if model == "sd35" else tokens)
    return (saved.checkpointed() if checkpointing else saved.total) + grads


def measure_table(models: list[str], sizes: list[int], batch: int, checkpointing: list[str]) -> None:
    print("| model | px | batch | checkpointing | measured peak above weights GiB | plan's estimate GiB | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model in models:
        repo, component, tokens = REAL[model]
        library, class_name, config = ARCHITECTURES[repo][component]
        for px in sizes:
            for on in checkpointing:
                case = Case(library, class_name, config, FAMILY[model], batch, px // 8, checkpointing=on == "on",
                            tokens=tokens - 77 if model == "sd35" else tokens)
                start = time.perf_counter()
                result = measure(case, timeout=3600)
                seconds = time.perf_counter() - start
                print(f"| {model} | {px} | {batch} | {on} | "
                      f"{result['peak_bytes'] / GIB:.2f} ({result['device']}) | "
                      f"{estimate(model, batch, px, on == 'on') / GIB:.2f} | {seconds:.0f} |", flush=True)


def decode_table(sizes: list[int], batch: int, slices: list[int], dtypes: list[str]) -> None:
    print("| px | batch | dtype | decode_slice | measured peak above the VAE GiB | of the whole batch's | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    config = ARCHITECTURES["stabilityai/stable-diffusion-xl-base-1.0"]["vae"][2]
    for px in sizes:
        for dtype in dtypes:
            whole = None
            for size in slices:
                start = time.perf_counter()
                result = measure(DecodeCase(config, batch, px // 8, size, dtype), timeout=3600)
                seconds = time.perf_counter() - start
                whole = whole or result["peak_bytes"]
                print(f"| {px} | {batch} | {dtype} | {size} | {result['peak_bytes'] / GIB:.2f} "
                      f"({result['device']}) | {result['peak_bytes'] / whole:.0%} | {seconds:.0f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--preset", nargs="+", default=PRESETS)
    p = sub.add_parser("measure")
    p.add_argument("--model", nargs="+", default=["sdxl", "sd35"], choices=list(REAL))
    p.add_argument("--px", nargs="+", type=int, default=[256, 512])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="1024 px without checkpointing needs more than 24 GB of host memory")
    p = sub.add_parser("decode")
    p.add_argument("--px", nargs="+", type=int, default=[256])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--slice", nargs="+", type=int, default=[0, 1, 2], help="the first is the baseline (0: whole)")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    if args.command == "plan":
        plan_table(args.preset)
    elif args.command == "measure":
        measure_table(args.model, args.px, args.batch, args.checkpointing)
    else:
        decode_table(args.px, args.batch, args.slice, args.dtype)


if __name__ == "__main__":
    sys.exit(main())
