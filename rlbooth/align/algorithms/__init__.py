"""Stage-two algorithms behind one interface (`Algorithm`): `ppo` (DDPO / Flow-GRPO), `nft` (DiffusionNFT)
and `refl` (reward feedback learning), chosen by `align.algorithm`. Adding one is adding a module here."""

from __future__ import annotations

from typing import Any

from rlbooth.align.algorithms.base import Algorithm
from rlbooth.align.algorithms.nft import NFT
from rlbooth.align.algorithms.ppo import PPO
from rlbooth.align.algorithms.refl import ReFL

ALGORITHMS: dict[str, type[Algorithm]] = {a.name: a for a in (PPO, NFT, ReFL)}
"""Every algorithm by its `align.algorithm` name."""


def make_algorithm(name: str, trainer: Any) -> Algorithm:
    if name not in ALGORITHMS:
        raise KeyError(f"unknown stage-two algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
    return ALGORITHMS[name](trainer)


__all__ = ["ALGORITHMS", "Algorithm", "make_algorithm"]
