"""Sampling with the stage-two LoRA folded into the weights, and the weights put back exactly afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def adapter_layers(model: torch.nn.Module, adapter_name: str) -> list[torch.nn.Module]:
    """The peft LoRA layers of `model` that hold adapter `adapter_name` and apply it now."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A
            and adapter_name in m.active_adapters and not m.disable_adapters]


@contextmanager
def merged_lora(model: torch.nn.Module, adapter_name: str) -> Iterator[None]:
    """Adapter `adapter_name` merged into its layers' base weights inside the block; nothing outside it.

    A merged layer runs one matmul instead of three (the base and both LoRA factors). peft's merge adds
    B A x scale to W in place and its unmerge subtracts it again, which in floats does not give W back:
    each sampling phase would move the frozen weights by a rounding error, and the moves would add up
    over epochs. So the base weights are copied before the merge and copied back after the unmerge.
    """
    layers = adapter_layers(model, adapter_name)
    with torch.no_grad():
        saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
        for layer in layers:
            layer.merge(adapter_names=[adapter_name])
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.unmerge()  # peft's bookkeeping: the layer applies the adapter again in its forward
                layer.get_base_layer().weight.data.copy_(weight)
