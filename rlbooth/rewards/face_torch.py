"""The face identity's differentiable path: the aligned crop warped by torch, and ArcFace run by torch.

Landmarks are found without gradients (on the image's 8-bit copy, as the ONNX path does) and the
similarity transform onto ArcFace's template is estimated from them without gradients (insightface's
`estimate_norm`, the matrix `norm_crop` warps with). Only the warp itself carries gradients: the crop's
pixels are bilinear mixtures of the image's, by `affine_grid` / `grid_sample` with the same matrix and
the same zero border as `cv2.warpAffine`. ArcFace is the recognition model's ONNX graph converted to
torch (`rlbooth.rewards.onnx_torch`), fed as insightface's `get_feat` feeds it (RGB, (x - mean) / std
on the 0-255 scale) and L2-normalized as the ONNX path is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rlbooth.rewards.onnx_torch import OnnxModule, load_onnx_module


def _pixel_to_normalized(height: int, width: int) -> torch.Tensor:
    """3x3: pixel coordinates (centres at integers, as cv2's) -> grid_sample's [-1, 1] (align_corners=False)."""
    return torch.tensor([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]],
                        dtype=torch.float64)


def warp_crops(images: torch.Tensor, matrices: np.ndarray, size: int) -> torch.Tensor:
    """(N, 3, H, W) images and (N, 2, 3) matrices taking image pixels to crop pixels (`cv2.warpAffine`'s M)
    -> (N, 3, size, size) bilinear crops, zero outside the image, differentiable in the images."""
    count, _, height, width = images.shape
    forward = torch.zeros(count, 3, 3, dtype=torch.float64)
    forward[:, :2] = torch.as_tensor(np.asarray(matrices), dtype=torch.float64).reshape(count, 2, 3)
    forward[:, 2, 2] = 1
    # grid_sample asks, for each crop pixel, where in the image to read: the inverse map, in normalized units
    theta = _pixel_to_normalized(height, width) @ torch.linalg.inv(forward) @ torch.linalg.inv(
        _pixel_to_normalized(size, size))
    grid = torch.nn.functional.affine_grid(theta[:, :2].to(images.dtype), [count, 3, size, size],
                                           align_corners=False)
    return torch.nn.functional.grid_sample(images, grid.to(images.device), mode="bilinear", padding_mode="zeros",
                                           align_corners=False)


def alignment_matrices(landmarks: Sequence[np.ndarray], size: int) -> np.ndarray:
    """(N, 2, 3): the similarity transforms `face_align.norm_crop` warps each face's 5 landmarks with."""
    from insightface.utils.face_align import estimate_norm

    return np.stack([estimate_norm(np.asarray(kps, np.float32), size) for kps in landmarks])


class TorchArcFace(torch.nn.Module):
    """insightface's ArcFace in torch: RGB crops in [0, 1] -> L2-normalized embeddings, as `embed_aligned` gives."""

    def __init__(self, graph: OnnxModule, input_mean: float, input_std: float, size: int):
        super().__init__()
        self.graph, self.input_mean, self.input_std, self.size = graph, float(input_mean), float(input_std), size

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        features = self.graph((crops * 255 - self.input_mean) / self.input_std)
        return torch.nn.functional.normalize(features.reshape(len(crops), -1), dim=-1)

    def embed_faces(self, images: torch.Tensor, landmarks: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1], one face's 5 landmarks per image -> (N, D) embeddings with gradients."""
        return self(warp_crops(images, alignment_matrices(landmarks, self.size), self.size))


def load_torch_arcface(rec_model: Any, field: str) -> TorchArcFace:
    """The torch twin of an insightface `ArcFaceONNX` (its `model_file`, `input_mean`, `input_std`, `input_size`)."""
    graph = load_onnx_module(rec_model.model_file, field)
    return TorchArcFace(graph, rec_model.input_mean, rec_model.input_std, int(rec_model.input_size[0])).eval()
