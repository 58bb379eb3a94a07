"""Loading reward models from a hub id or a local folder, with an error that says how to work offline."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

from rlbooth.rewards import RewardError

T = TypeVar("T")


def load_or_explain(load: Callable[[str], T], model_id: str, field: str) -> T:
    """Call `load(model_id)`; any failure becomes a RewardError naming the id, the config field and the fix.

    `field` is the dotted config key that holds the id, e.g. `align.reward_options.aesthetic.clip_model`.
    """
    try:
        return load(model_id)
    except Exception as err:  # hub, network, auth and file errors come in many classes; all mean "no weights"
        if Path(model_id).exists():
            raise RewardError(f"{field}={model_id!r}: the local copy could not be loaded "
                              f"({type(err).__name__}: {err})") from err
        raise RewardError(
            f"{field}={model_id!r}: could not load the model from the Hugging Face hub "
            f"({type(err).__name__}: {err}). Without network access, or for a gated model, download it where "
            f"you can (`hf download {model_id} --local-dir /path/to/copy`) and pass the folder: "
            f"`--set {field}=/path/to/copy`."
        ) from err
