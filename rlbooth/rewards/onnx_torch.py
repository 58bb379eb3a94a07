"""An ONNX graph run by torch ops, for the differentiable face identity: insightface's ArcFace models as a module.

insightface ships its recognition models as ONNX only, and onnxruntime cuts the graph. `onnx2torch`
converts ONNX graphs but requires torchvision, which rlbooth avoids; this converter covers the operators
insightface's recognition graphs use (IResNet and MobileFaceNet exported from PyTorch or MXNet: Conv,
BatchNormalization, PRelu, Add, Sub, Mul, Flatten / Reshape, Gemm / MatMul, and a few more) and refuses
any other operator by name before anything runs. The graph's initializers become buffers, so the module
has no parameters: a backward pass reaches the input and trains nothing. `onnx` is imported inside
`load_onnx_module` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rlbooth.rewards import RewardError

Op = Callable[[list[torch.Tensor | None], dict[str, Any]], torch.Tensor]


def _pads(attrs: dict[str, Any], op: str) -> tuple[int, int]:
    """ONNX `pads` [top, left, bottom, right] as torch's symmetric (height, width) padding."""
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise RewardError(f"ONNX {op} with auto_pad={attrs['auto_pad']!r} is not supported (explicit pads only)")
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    if (top, left) != (bottom, right):
        raise RewardError(f"ONNX {op} with asymmetric pads {attrs['pads']} is not supported")
    return top, left


def _conv(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> torch.Tensor:
    x, weight, bias = (inputs + [None])[:3]
    return F.conv2d(x, weight, bias, stride=tuple(attrs.get("strides", [1, 1])), padding=_pads(attrs, "Conv"),
                    dilation=tuple(attrs.get("dilations", [1, 1])), groups=attrs.get("group", 1))


def _batch_norm(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> torch.Tensor:
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=attrs.get("epsilon", 1e-5))


def _prelu(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> torch.Tensor:
    x, slope = inputs[:2]
    return torch.where(x >= 0, x, x * slope)  # ONNX broadcasts the slope as it is shaped ((C, 1, 1) from PyTorch)


def _flatten(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> torch.Tensor:
    x, axis = inputs[0], attrs.get("axis", 1)
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _reshape(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> torch.Tensor:
    x, shape = inputs[:2]
    # ONNX: 0 copies the input's size on that axis (unless allowzero), -1 is inferred
    sizes = [x.shape[i] if size == 0 and not attrs.get("allowzero", 0) else size
             for i, size in enumerate(shape.tolist())]
    return x.reshape(sizes)


def _gemm(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> torch.Tensor:
    a, b, c = (inputs + [None])[:3]
    a = a.transpose(0, 1) if attrs.get("transA", 0) else a
    b = b.transpose(0, 1) if attrs.get("transB", 0) else b
    out = attrs.get("alpha", 1.0) * (a @ b)
    return out if c is None else out + attrs.get("beta", 1.0) * c


def _average_pool(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> torch.Tensor:
    kernel = tuple(attrs["kernel_shape"])
    return F.avg_pool2d(inputs[0], kernel, stride=tuple(attrs.get("strides", kernel)),
                        padding=_pads(attrs, "AveragePool"), ceil_mode=bool(attrs.get("ceil_mode", 0)),
                        count_include_pad=bool(attrs.get("count_include_pad", 0)))


OPS: dict[str, Op] = {
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "PRelu": _prelu,
    "Relu": lambda inputs, attrs: F.relu(inputs[0]),
    "Sigmoid": lambda inputs, attrs: torch.sigmoid(inputs[0]),
    "Add": lambda inputs, attrs: inputs[0] + inputs[1],
    "Sub": lambda inputs, attrs: inputs[0] - inputs[1],
    "Mul": lambda inputs, attrs: inputs[0] * inputs[1],
    "Div": lambda inputs, attrs: inputs[0] / inputs[1],
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Gemm": _gemm,
    "MatMul": lambda inputs, attrs: torch.matmul(inputs[0], inputs[1]),
    "AveragePool": _average_pool,
    "GlobalAveragePool": lambda inputs, attrs: inputs[0].mean(dim=(2, 3), keepdim=True),
    "Identity": lambda inputs, attrs: inputs[0],
    "Dropout": lambda inputs, attrs: inputs[0],  # inference: the identity
}
"""The supported ONNX operators (domain ai.onnx), each as torch ops on its inputs and attributes."""


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict[str, Any]


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph's nodes in order with torch ops; its one input in, its first output out.

    `constants` (initializers and Constant nodes' values) are buffers: `.to(device)` and `.double()` move
    them, and nothing is trainable.
    """

    def __init__(self, nodes: list[Node], constants: dict[str, torch.Tensor], input_name: str, output_name: str):
        super().__init__()
        self.nodes, self.input_name, self.output_name = nodes, input_name, output_name
        self._buffer_of = {}
        for i, (name, value) in enumerate(constants.items()):
            self._buffer_of[name] = f"constant_{i}"
            self.register_buffer(f"constant_{i}", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {name: getattr(self, buffer) for name, buffer in self._buffer_of.items()}
        values[self.input_name] = x
        for node in self.nodes:
            inputs = [values[name] if name else None for name in node.inputs]
            values[node.output] = OPS[node.op](inputs, node.attrs)
        return values[self.output_name]


def load_onnx_module(path: str | Path, field: str) -> OnnxModule:
    """Reads an ONNX file into an `OnnxModule`; an operator outside `OPS` is an error naming it, the node and `field`."""
    import onnx
    from onnx import helper, numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as err:
        raise RewardError(f"{field}: cannot read the ONNX file {path} ({type(err).__name__}: {err})") from err
    graph = model.graph
    constants = {init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in graph.initializer}
    nodes = []
    for index, proto in enumerate(graph.node):
        attrs = {attr.name: helper.get_attribute_value(attr) for attr in proto.attribute}
        attrs = {key: value.decode() if isinstance(value, bytes) else value for key, value in attrs.items()}
        name = proto.name or f"#{index}"
        if proto.domain not in ("", "ai.onnx"):
            raise RewardError(f"{field}: {path} uses operator {proto.domain}.{proto.op_type} (node {name}), which "
                              f"the torch conversion does not support")
        if proto.op_type == "Constant":
            constants[proto.output[0]] = torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
            continue
        if proto.op_type not in OPS:
            raise RewardError(f"{field}: {path} uses the ONNX operator {proto.op_type} (node {name}), which the torch "
                              f"conversion does not support (it supports {', '.join(sorted(OPS))}); use the ONNX path "
                              "(differentiable: false)")
        nodes.append(Node(proto.op_type, tuple(proto.input), proto.output[0], attrs))
    inputs = [value.name for value in graph.input if value.name not in constants]
    if len(inputs) != 1:
        raise RewardError(f"{field}: {path} has inputs {inputs}; a recognition model takes one image batch")
    return OnnxModule(nodes, constants, inputs[0], graph.output[0].name).eval()
