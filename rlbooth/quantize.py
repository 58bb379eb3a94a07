"""A quantized frozen base (QLoRA): the denoiser's Linear weights stored in int8 or NF4 through diffusers'
quantization configs, the LoRA trained on top in fp32.

`int8` is torchao's int8 weight-only scheme, which runs on a CPU as on CUDA (so the tests run the very path a
GPU run takes); `nf4` is bitsandbytes' 4-bit NormalFloat (CUDA), the recipe of diffusers' FLUX QLoRA example.
Only the weights while training are quantized: the LoRA files hold fp32 adapters and load on the unquantized
base with plain diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlbooth.errors import RlboothError

if TYPE_CHECKING:
    import torch

EXTRA = {"int8": ("torchao", "quantize"), "nf4": ("bitsandbytes", "8bit")}
"""The package each scheme needs and the rlbooth extra that installs it."""


class QuantizationError(RlboothError, ImportError):
    """The package a `model.quantization` scheme needs is missing."""


def is_quantized(model: "torch.nn.Module") -> bool:
    """Whether diffusers loaded the model quantized (it then refuses a dtype cast)."""
    return bool(getattr(model, "is_quantized", False))


def require(kind: str) -> None:
    """Fail before any weight is read when the scheme's package is missing."""
    import importlib.util

    package, extra = EXTRA[kind]
    if importlib.util.find_spec(package) is None:
        raise QuantizationError(f"model.quantization={kind} needs {package}: pip install 'rlbooth[{extra}]'")


def quantization_config(kind: str, compute_dtype: "torch.dtype | None" = None) -> Any:
    """diffusers' quantization config of `model.quantization` (`int8` or `nf4`)."""
    require(kind)
    import torch
    from diffusers import BitsAndBytesConfig, TorchAoConfig

    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16)


def load_quantized_text_encoder(source: str, name: str, kind: str, **kwargs: Any) -> "torch.nn.Module":
    """The pipeline folder's text encoder `name` (a transformers model) with its Linear weights quantized."""
    import diffusers
    import torch
    import transformers

    require(kind)
    index = diffusers.DiffusionPipeline.load_config(source, **{k: v for k, v in kwargs.items() if k == "revision"})
    cls = getattr(transformers, index[name][1])
    dtype = kwargs.pop("torch_dtype", None) or torch.float32
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        config = transformers.TorchAoConfig(Int8WeightOnlyConfig())
    else:
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16)
    return cls.from_pretrained(source, subfolder=name, quantization_config=config, torch_dtype=dtype, **kwargs)


def load_quantized_denoiser(source: str, denoiser: str, kind: str, **kwargs: Any) -> "torch.nn.Module":
    """The pipeline folder's denoiser (`unet` or `transformer`) with its Linear weights quantized."""
    import diffusers
    import torch

    index = diffusers.DiffusionPipeline.load_config(source, **{k: v for k, v in kwargs.items() if k == "revision"})
    cls = getattr(diffusers, index[denoiser][1])
    kwargs["torch_dtype"] = kwargs.get("torch_dtype") or torch.float32  # else diffusers picks bf16 for torchao
    return cls.from_pretrained(source, subfolder=denoiser, quantization_config=quantization_config(
        kind, kwargs.get("torch_dtype")), **kwargs)


def stored_bytes(module: "torch.nn.Module") -> int:
    """The bytes the module's parameters and buffers occupy, a quantized tensor counted by the tensors it holds
    (int8 data, scales, zero points), not by the dtype it presents: the weights' memory a quantized base saves."""
    def size(t: "torch.Tensor") -> int:
        if type(t).__name__ not in ("Tensor", "Parameter") and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, name)) for name in names)
        return t.numel() * t.element_size()

    return sum(size(t) for t in [*module.parameters(), *module.buffers()])
