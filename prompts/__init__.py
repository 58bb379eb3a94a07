"""Prompt sets as plain text, installed as `rlbooth.prompt_sets` (setup.py maps this folder); `rlbooth.prompts` reads them."""
