"""Where rlbooth's shipped data lies: found through importlib.resources, so a wheel works outside a checkout.

The repository keeps `configs/`, `prompts/` and `dreambench/` at its top level; setup.py installs them as
the subpackages `rlbooth.presets`, `rlbooth.prompt_sets` and `rlbooth.dreambench`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from rlbooth.errors import RlboothError

PRESETS = "rlbooth.presets"
PROMPT_SETS = "rlbooth.prompt_sets"
DREAMBENCH = "rlbooth.dreambench"


def data_dir(package: str) -> Path:
    """The folder of a data package; an install that predates the mapping gets told how to fix it."""
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        raise RlboothError(f"rlbooth's data package {package} is not installed; reinstall rlbooth "
                           "(`pip install -e .` in a checkout: setup.py maps configs/, prompts/ and dreambench/ "
                           "into the package)") from None
    return Path(str(root))
