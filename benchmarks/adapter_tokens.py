"""Where does stage two's adapter act? Toy-world alignment with the LoRA applied at some prompt words only.

    python benchmarks/adapter_tokens.py runs/toyworld-experiment/identifier-only-seed0 [--seeds 32]

The cross-attention LoRA changes each prompt token's key (and value) separately, so it can be switched
on at chosen token positions and off at the others (there the stage-one projection is used). Positions
are grouped as `subject` (start token to the class noun: `a sks square`, the same in every prompt, as
CLIP's text encoder is causal), `phrase` (the words between the class noun and the last word: `in the`,
shared by several scenes) and `scene` (the last word and the end and padding tokens, which see the whole
prompt). The unconditional branch of guidance keeps the adapter in every row except `stage one`.
A gain that lives in `subject` can carry to any scene; one that lives in `scene` is tied to the words
stage two was trained on.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import torch

from rlbooth.config import Config, from_dict
from rlbooth.prompts import read_prompt_file
from rlbooth.rewards import build_reward
from rlbooth.stages import load_stage_pipeline, read_stage
from rlbooth.subject import Subject
from rlbooth.toyworld.experiment import score

GROUPS = ("subject", "phrase", "scene")
ROWS: dict[str, set[str] | None] = {"stage one": None, "all words": set(GROUPS), "unconditional only": set(),
                                    **{f"{g} only": {g} for g in GROUPS}, "all but phrase": {"subject", "scene"}}


def position_groups(tokenizer, prompt: str, class_noun: str) -> list[str]:
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    words = [tokenizer.decode([i]).strip() for i in ids]
    noun = words.index(class_noun)
    last = len(tokenizer(prompt).input_ids) - 2  # the last word, before the end token
    return ["subject" if j <= noun else "phrase" if j < last else "scene" for j in range(len(ids))]


@contextlib.contextmanager
def masked_adapter(unet: torch.nn.Module, mask: list[torch.Tensor]):
    """Every LoRA projection returns base + mask * (adapted - base); mask[0] is (batch, tokens, 1)."""
    patched = [m for name, m in unet.named_modules() if "attn2" in name and hasattr(m, "base_layer")]
    originals = [m.forward for m in patched]

    def masked(module, forward):
        def call(x, *args, **kwargs):
            adapted, base = forward(x, *args, **kwargs), module.base_layer(x)
            return base + mask[0].to(base.dtype) * (adapted - base)
        return call

    for m, forward in zip(patched, originals):
        m.forward = masked(m, forward)
    try:
        yield
    finally:
        for m, forward in zip(patched, originals):
            m.forward = forward


def alignment(pipe, prompt: str, keep: set[str] | None, seeds: list[int], subject: Subject, mask: list,
              config: Config, rewards: dict) -> float:
    groups = position_groups(pipe.tokenizer, prompt, subject.class_noun)
    cond = torch.tensor([float(keep is not None and g in keep) for g in groups])
    uncond = torch.full_like(cond, float(keep is not None))
    n = len(seeds)  # `score` draws one prompt's seeds per pipeline call, [uncond, cond] as diffusers batches them
    mask[0] = torch.cat([uncond.expand(n, -1), cond.expand(n, -1)])[..., None]
    return score(pipe, [prompt], seeds, config, rewards).alignment


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage_two", type=Path, help="output folder of `rlbooth align` on the toy world")
    parser.add_argument("--seeds", type=int, default=32, help="images per prompt and row (seeds 1000...)")
    parser.add_argument("--prompts", nargs="+", default=["toyworld-heldout", "toyworld-unseen", "toyworld-train"])
    args = parser.parse_args(argv)
    stage = read_stage(args.stage_two, "align")
    subject = stage.subject
    config = from_dict(Config, stage.metadata["config"])  # its report settings: steps and guidance
    rewards = {"toy_alignment": build_reward("toy_alignment"),
               "toy_identity": build_reward("toy_identity", subject=subject)}
    pipe = load_stage_pipeline(stage)
    seeds = list(range(1000, 1000 + args.seeds))
    mask: list[torch.Tensor] = [torch.ones(1, 1, 1)]
    with masked_adapter(pipe.unet, mask):
        for prompt_set in args.prompts:
            prompts = [subject.prompt(t) for t in read_prompt_file(prompt_set)]
            print(f"\n{prompt_set}: toy_alignment, {args.seeds} images per prompt ({' / '.join(prompts)})")
            for row, keep in ROWS.items():
                scores = [alignment(pipe, p, keep, seeds, subject, mask, config, rewards) for p in prompts]
                print(f"{row:>20}: {np.mean(scores):.3f}  [{' '.join(f'{s:.2f}' for s in scores)}]", flush=True)


if __name__ == "__main__":
    main()
