"""YAML presets, installed as `rlbooth.presets` (setup.py maps this folder); `rlbooth.config` reads them."""
