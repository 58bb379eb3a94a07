"""AdamW for both stages, with torch's implementation chosen by `runtime.optimizer_impl`.

The three implementations compute the same update; they differ in how many kernels a step launches,
which on a GPU with thousands of small LoRA tensors is most of an optimizer step's time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

OptimizerImpl = Literal["auto", "for-loop", "foreach", "fused"]
IMPL_FLAGS: dict[str, dict[str, bool]] = {"auto": {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True},
                                          "fused": {"fused": True}}
"""torch.optim.AdamW's flags per `runtime.optimizer_impl`."""


def adamw(params: Iterable[torch.nn.Parameter], impl: OptimizerImpl = "auto", **kwargs: Any) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, **kwargs, **IMPL_FLAGS[impl])
