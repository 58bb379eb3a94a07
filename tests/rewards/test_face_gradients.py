"""The differentiable face identity: ArcFace's ONNX graph run by torch, the aligned crop warped by torch.

The converter is checked against onnxruntime on random recognition graphs written with onnx.helper: the
tiny ArcFace-shaped model of test_identity.py and two residual networks with insightface's layers
(Conv, BatchNormalization, PRelu, Add, Flatten/Reshape, Gemm/MatMul, BatchNormalization on the
features), one exported PyTorch-style and one MXNet-style (Sub/Mul at the input, which insightface
reads as raw 0-255 input).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlbooth.rewards import RewardError, backpropagating, build_reward, identity, reward_is_differentiable
from rlbooth.rewards.face_torch import TorchArcFace, alignment_matrices, load_torch_arcface, warp_crops
from rlbooth.rewards.identity import FaceIdentityReward, InsightfaceBackend
from tests.rewards.test_identity import save_onnx
from tests.rewards.test_identity import (  # noqa: F401  (fixtures)
    bright_centre_detector,
    insightface,
    pack,
    read_bgr,
    rec_path,
    rows,
    sample_images,
    textures,
    to_tensor,
)

WIDTH = 8  # channels of the random residual networks


def write_resnet_arcface(path: Path, mxnet_style: bool, seed: int = 0, dim: int = 32) -> Path:
    """A random IResNet-like recognition graph, N x 3 x 112 x 112 -> N x dim.

    stem conv (stride 2) + BN + PRelu; one residual block BN, conv, BN, PRelu, conv (stride 2), BN, plus a
    1x1 stride-2 conv + BN shortcut, Add; BN, Dropout, flatten, fully connected, BN on the features.
    `mxnet_style`: (x - 127.5) * 0.0078125 inside the graph (nodes named Sub/Mul), Reshape and MatMul + Add.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {}
    nodes = []

    def const(name: str, value: np.ndarray) -> str:
        inits[name] = value.astype(value.dtype if value.dtype == np.int64 else np.float32)
        return name

    def conv(x: str, name: str, cin: int, cout: int, kernel: int, stride: int) -> str:
        weight = const(name + ".w", rng.standard_normal((cout, cin, kernel, kernel)) / math.sqrt(cin * kernel ** 2))
        bias = const(name + ".b", 0.1 * rng.standard_normal(cout))
        pad = kernel // 2
        nodes.append(helper.make_node("Conv", [x, weight, bias], [name], name=name, kernel_shape=[kernel, kernel],
                                      strides=[stride, stride], pads=[pad] * 4))
        return name

    def bn(x: str, name: str, channels: int, variance: float = 1.0) -> str:
        params = [const(f"{name}.{key}", value) for key, value in (
            ("scale", 1 + 0.1 * rng.standard_normal(channels)), ("bias", 0.1 * rng.standard_normal(channels)),
            ("mean", 0.1 * rng.standard_normal(channels)), ("var", variance * (1 + 0.2 * rng.random(channels))))]
        nodes.append(helper.make_node("BatchNormalization", [x, *params], [name], name=name, epsilon=2e-5))
        return name

    def prelu(x: str, name: str) -> str:
        slope = const(name + ".slope", 0.25 + 0.05 * rng.standard_normal((WIDTH, 1, 1)))
        nodes.append(helper.make_node("PRelu", [x, slope], [name], name=name))
        return name

    x = "data" if mxnet_style else "input.1"
    if mxnet_style:
        nodes.append(helper.make_node("Sub", [x, const("mean", np.full((1,), 127.5))], ["sub"], name="Sub_0"))
        nodes.append(helper.make_node("Mul", ["sub", const("scale", np.full((1,), 0.0078125))], ["mul"], name="Mul_1"))
        x = "mul"
    x = prelu(bn(conv(x, "stem", 3, WIDTH, 3, 2), "stem_bn", WIDTH), "stem_act")
    body = bn(x, "block_bn1", WIDTH)
    body = prelu(bn(conv(body, "block_conv1", WIDTH, WIDTH, 3, 1), "block_bn2", WIDTH), "block_act")
    body = bn(conv(body, "block_conv2", WIDTH, WIDTH, 3, 2), "block_bn3", WIDTH)
    shortcut = bn(conv(x, "block_down", WIDTH, WIDTH, 1, 2), "block_down_bn", WIDTH)
    nodes.append(helper.make_node("Add", [body, shortcut], ["block"], name="block_add"))
    x = bn("block", "final_bn", WIDTH)
    nodes.append(helper.make_node("Dropout", [x], ["dropped"], name="dropout"))
    flat_width = WIDTH * 28 * 28
    fc_weight = rng.standard_normal((flat_width, dim)) / math.sqrt(flat_width)
    if mxnet_style:
        nodes.append(helper.make_node("Reshape", ["dropped", const("shape", np.array([0, -1], np.int64))], ["flat"]))
        nodes.append(helper.make_node("MatMul", ["flat", const("fc.w", fc_weight)], ["fc_mm"]))
        nodes.append(helper.make_node("Add", ["fc_mm", const("fc.b", 0.1 * rng.standard_normal(dim))], ["fc"]))
    else:
        nodes.append(helper.make_node("Flatten", ["dropped"], ["flat"], axis=1))
        nodes.append(helper.make_node("Gemm", ["flat", const("fc.w", fc_weight.T.copy()),
                                               const("fc.b", 0.1 * rng.standard_normal(dim))], ["fc"], transB=1))
    features = bn("fc", "features", dim, variance=1e-3)  # small: the epsilon (2e-5, not torch's 1e-5) matters
    graph = helper.make_graph(
        nodes, "random_iresnet", [helper.make_tensor_value_info(nodes[0].input[0], TensorProto.FLOAT,
                                                                ["N", 3, 112, 112])],
        [helper.make_tensor_value_info(features, TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(value, name) for name, value in inits.items()])
    return save_onnx(graph, path)


@pytest.fixture(scope="module")
def recognition_files(insightface, rec_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("recognition")
    return {"tiny": rec_path, "iresnet": write_resnet_arcface(folder / "iresnet.onnx", mxnet_style=False),
            "mxnet": write_resnet_arcface(folder / "mxnet.onnx", mxnet_style=True, seed=1)}


def onnx_model(path: Path):
    from insightface.model_zoo import get_model

    return get_model(str(path), providers=["CPUExecutionProvider"])


def face_crops(sample_images: Path) -> list[np.ndarray]:
    """BGR 112 px crops: insightface's aligned sample face, mirrored, and noise."""
    face = read_bgr(sample_images / "Tom_Hanks_54745.png")
    noise = np.random.default_rng(5).integers(0, 256, face.shape).astype(np.uint8)
    return [face, np.ascontiguousarray(face[:, ::-1]), noise]


@pytest.mark.parametrize("variant", ["tiny", "iresnet", "mxnet"])
def test_converted_arcface_equals_onnxruntime(recognition_files, sample_images, variant: str):
    model = onnx_model(recognition_files[variant])
    assert (model.input_mean, model.input_std) == ((0.0, 1.0) if variant == "mxnet" else (127.5, 127.5))
    arcface = load_torch_arcface(model, "field")
    assert list(arcface.parameters()) == [] and not arcface.training  # nothing to train
    crops = face_crops(sample_images)
    expected = identity.embed_aligned(model, crops)  # onnxruntime, normalized as the reward does
    with torch.no_grad():
        ours = arcface(to_tensor(crops))
    assert ours.shape == expected.shape  # seen: at most 6e-7 apart
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-4, rtol=0)
    assert float(np.abs(expected[0] - expected[2]).max()) > 1e-2  # the embeddings differ: a real comparison


def test_unknown_operator_is_refused_by_name(insightface, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("LeakyRelu", ["input.1"], ["act"], name="odd_act"),
         helper.make_node("Flatten", ["act"], ["embedding"])],
        "odd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 37632])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "odd.onnx"))
    with pytest.raises(RewardError, match=r"identity_face\.differentiable: .*odd\.onnx uses the ONNX operator "
                                          r"LeakyRelu \(node odd_act\)"):
        load_torch_arcface(onnx_model(tmp_path / "odd.onnx"), "align.reward_options.identity_face.differentiable")


def rotated_photo(sample_images: Path) -> tuple[np.ndarray, np.ndarray]:
    """The aligned sample face put into a 400 x 360 photo (1.8x, turned 25 degrees, moved), and its landmarks."""
    import cv2
    from insightface.utils.face_align import arcface_dst

    aligned = read_bgr(sample_images / "Tom_Hanks_54745.png")
    angle, scale = math.radians(25), 1.8
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    forward = np.hstack([rotation, [[150.0], [60.0]]]).astype(np.float32)
    return cv2.warpAffine(aligned, forward, (400, 360), flags=cv2.INTER_CUBIC), arcface_dst @ rotation.T + forward[:, 2]


def test_torch_warp_matches_norm_crop(sample_images):
    """The grid_sample crop equals insightface's cv2 crop within 0.6 pixel levels, 0.3 on average (seen: 0.50 and
    0.20, cv2's rounding of its output to 8 bits); a face at the image's border gets the same zero fill."""
    photo, kps = rotated_photo(sample_images)
    expected = identity.align_face(photo, kps).astype(np.float64)[:, :, ::-1]  # RGB
    images = to_tensor([photo]).double()
    ours = warp_crops(images, alignment_matrices([kps], 112), 112)[0].permute(1, 2, 0).numpy() * 255
    difference = np.abs(ours - expected)
    assert difference.max() < 0.6 and difference.mean() < 0.3
    # half the face outside the image: the zero fill matches cv2's borderValue=0
    shifted = kps - [kps[:, 0].mean() - 5, 0]
    expected = identity.align_face(photo, shifted).astype(np.float64)[:, :, ::-1]
    ours = warp_crops(images, alignment_matrices([shifted], 112), 112)[0].permute(1, 2, 0).numpy() * 255
    assert (expected == 0).mean() > 0.3 and np.abs(ours - expected).max() < 0.6


@pytest.fixture(scope="module")
def iresnet(recognition_files):
    return onnx_model(recognition_files["iresnet"])


@pytest.fixture
def subject_faces(sample_images, tmp_path) -> list[Path]:
    from PIL import Image

    face = Image.open(sample_images / "Tom_Hanks_54745.png").convert("RGB")
    face.save(tmp_path / "a.png")
    face.resize((96, 96)).save(tmp_path / "b.png")
    return [tmp_path / "a.png", tmp_path / "b.png"]


def small_faces(sample_images: Path, size: int = 40, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sample face at `size` px, its mirror with the colour channels apart (so that swapping them shows), and a
    dark image (no face for the stub detector), in [0, 1]."""
    face = to_tensor([read_bgr(sample_images / "Tom_Hanks_54745.png")]).to(dtype)
    face = torch.nn.functional.interpolate(face, size=(size, size), mode="area")
    apart = face.flip(-1) * torch.tensor([1.0, 0.6, 0.2], dtype=dtype).view(1, 3, 1, 1)
    return torch.cat([face, apart, torch.full_like(face, 0.05)])


def test_face_gradient_matches_finite_differences(iresnet, subject_faces, sample_images):
    """d(w . reward)/d(images) along random directions equals central differences (float64, step 1e-6,
    agreement to 1e-6 of the gradient's norm; seen: 1e-9 at most); the faceless image scores no_face_score with a
    zero gradient."""
    arcface = load_torch_arcface(iresnet, "field").double()
    reward = FaceIdentityReward(InsightfaceBackend(bright_centre_detector, iresnet, arcface), subject_faces,
                                no_face_score=-0.5)
    weights = torch.tensor([0.6, -1.1, 2.0], dtype=torch.float64)
    x = small_faces(sample_images, dtype=torch.float64).requires_grad_(True)
    with backpropagating():
        scores = reward(x, *rows(3))
        assert scores.requires_grad and scores.dtype == torch.float64 and scores[2] == -0.5
        (gradient,) = torch.autograd.grad((weights * scores).sum(), x)
    assert gradient[:2].abs().sum() > 0 and gradient[2].abs().sum() == 0
    with backpropagating():  # a batch without a face: constant scores, still connected (a zero gradient)
        faceless = reward(x[2:], *rows(1))
        assert faceless.requires_grad and torch.autograd.grad(faceless.sum(), x)[0].abs().sum() == 0
    generator, step = torch.Generator().manual_seed(2), 1e-6
    for _ in range(3):
        direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        direction /= direction.norm()
        with backpropagating():
            ahead = reward((x + step * direction).detach().requires_grad_(True), *rows(3)).detach()
            behind = reward((x - step * direction).detach().requires_grad_(True), *rows(3)).detach()
        numeric = float((weights * (ahead - behind)).sum() / (2 * step))
        assert abs(numeric - float((gradient * direction).sum())) <= 1e-6 * gradient.norm().item()


def test_face_reward_without_grad_is_the_onnx_path(iresnet, subject_faces, sample_images):
    """Without gradients the torch model is not used (the same numbers as a reward without it); with them the
    scores are within 2e-3 of the ONNX path's (seen: 5e-4; the torch crop is not rounded to 8 bits)."""
    onnx_only = FaceIdentityReward(InsightfaceBackend(bright_centre_detector, iresnet), subject_faces)
    both = FaceIdentityReward(InsightfaceBackend(bright_centre_detector, iresnet, load_torch_arcface(iresnet, "f")),
                              subject_faces)
    x = small_faces(sample_images, size=64)
    plain = onnx_only(x, *rows(3))
    assert torch.equal(both(x, *rows(3)), plain)
    with torch.no_grad():
        assert torch.equal(both(x.clone().requires_grad_(True), *rows(3)), plain)
    with backpropagating():
        smooth = both(x.clone().requires_grad_(True), *rows(3))
    assert smooth.requires_grad and smooth.dtype == torch.float32
    torch.testing.assert_close(smooth.detach(), plain, atol=2e-3, rtol=0)
    with backpropagating():  # images decoded in bf16 are embedded in the model's float32, scored in float32
        half = both(x.bfloat16().requires_grad_(True), *rows(3))
    assert half.requires_grad and half.dtype == torch.float32
    torch.testing.assert_close(half.detach(), plain, atol=0.02, rtol=0)
    assert both.log_stats()["identity_face/scored"] == 8  # 4 calls, 2 faces each: the torch path counts alike


def test_factory_option_and_registry(pack, textures, tmp_path):
    assert reward_is_differentiable("identity_face", {"differentiable": True})
    assert not reward_is_differentiable("identity_face", {})
    assert not reward_is_differentiable("identity_face", {"backend": "dlib", "differentiable": True})
    reward = build_reward("identity_face", pack=str(pack), det_size=128, differentiable=True, subject=textures)
    assert isinstance(reward.backend.arcface, TorchArcFace)
    assert build_reward("identity_face", pack=str(pack), det_size=128, subject=textures).backend.arcface is None
    from tests.rewards.test_identity import bright_texture

    own = torch.from_numpy(bright_texture(0)).permute(2, 0, 1)[None].float() / 255
    x = torch.cat([own, own.flip(-1)]).requires_grad_(True)
    with backpropagating():
        scores = reward(x, *rows(2))
        scores.sum().backward()
    assert scores.requires_grad and x.grad.abs().sum() > 0
    with pytest.raises(RewardError, match=r"identity_face\.differentiable=true needs backend=insightface"):
        build_reward("identity_face", backend="dlib", differentiable=True, subject=textures)
    with pytest.raises(RewardError, match="differentiable"):
        build_reward("identity_face", pack=str(pack), differentiable="yes", subject=textures)


def test_only_the_torch_arcface_is_offloadable(pack, textures):
    """align.offload_rewards moves the torch ArcFace; the ONNX detector and recognizer are not torch modules."""
    reward = build_reward("identity_face", pack=str(pack), det_size=128, differentiable=True, subject=textures)
    assert reward.torch_modules == [reward.backend.arcface]
    assert build_reward("identity_face", pack=str(pack), det_size=128, subject=textures).torch_modules == []
