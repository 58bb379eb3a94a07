"""Packaging glue that setup.cfg cannot say: the repository's top-level data folders ship inside `rlbooth`.

`configs/`, `prompts/` and `dreambench/` stay where the layout puts them, and install as the
subpackages `rlbooth.presets`, `rlbooth.prompt_sets` and `rlbooth.dreambench` (no generic top-level
import name). Code finds their files with importlib.resources, so a wheel works outside a checkout.
"""

from setuptools import find_packages, setup

DATA_PACKAGES = {"rlbooth.presets": "configs", "rlbooth.prompt_sets": "prompts", "rlbooth.dreambench": "dreambench"}

setup(packages=find_packages(include=["rlbooth", "rlbooth.*"]) + list(DATA_PACKAGES), package_dir=DATA_PACKAGES)
