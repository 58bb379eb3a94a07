"""Identity rewards, offline: a tiny DINO ViT built in code, and face identity on insightface's sample photos.

No face detection weights can be downloaded here, so the face reward is tested three ways:
- its building blocks (alignment, largest face, ArcFace embedding) with known landmarks and a
  tiny ArcFace-shaped ONNX model written with onnx.helper;
- the whole reward on real photos with dlib's HOG face detector (built into the dlib-bin wheel,
  no weights) standing in for SCRFD through the `detect` seam; it gives boxes only, so the five
  landmarks are insightface's template scaled into the box;
- the real factory (pack folder, routing, SCRFD decoding, alignment, ArcFace) end to end on a
  fake SCRFD-shaped ONNX detector that calls every bright 32-pixel cell a face.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlbooth.rewards import CompositeReward, RewardError, build_reward, identity, reward_parameters
from rlbooth.rewards.identity import DetectedFace, FaceIdentityReward, InsightfaceBackend, largest_face
from rlbooth.subject import Subject
from tests.conftest import draw_subject_photos


def save_onnx(graph, path: Path) -> Path:
    """A graph saved as an ONNX model of opset 13 / IR 8 (what onnxruntime here reads), checked first."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# DINO


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)
    path = tmp_path_factory.mktemp("tiny-dino")
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


@pytest.fixture
def toy(tmp_path: Path) -> Subject:
    return Subject(images=draw_subject_photos(tmp_path / "photos"), class_noun="toy")


@pytest.fixture
def dino(tiny_vit: Path, toy: Subject) -> identity.DinoIdentityReward:
    return build_reward("identity_dino", model=str(tiny_vit), subject=toy)


def rows(batch: int) -> tuple[list[str], list[dict]]:
    return ["a photo of sks toy"] * batch, [{"with_identifier": True}] * batch


def noise(batch: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_reference_is_the_normalized_mean_of_normalized_embeddings():
    # a long and a short embedding count the same: the mean is taken after normalizing each
    reference = identity.reference_embedding(torch.tensor([[10.0, 0.0], [0.0, 0.5]]))
    torch.testing.assert_close(reference, torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]))


def test_dino_returns_cpu_float32_scores_without_grad(dino):
    images = noise(4).requires_grad_()
    scores = dino(images, *rows(4))
    assert scores.shape == (4,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert not scores.requires_grad
    assert bool(((scores >= -1 - 1e-6) & (scores <= 1 + 1e-6)).all())
    assert dino.identifier_only is True
    assert dino(noise(0), [], []).shape == (0,)


def test_dino_is_deterministic_and_batch_invariant(dino):
    images = noise(4, size=64)
    scores = dino(images, *rows(4))
    assert torch.equal(scores, dino(images, *rows(4)))
    one_by_one = torch.cat([dino(images[i:i + 1], *rows(1)) for i in range(4)])
    torch.testing.assert_close(one_by_one, scores, atol=1e-5, rtol=0)


def _by_hand_cls(model, images: torch.Tensor) -> torch.Tensor:
    """The documented recipe, written out again: 8-bit image, PIL bicubic to the model's size, ImageNet mean/std,
    CLS token."""
    size = model.config.image_size
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    resized = [np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC)) for p in pixels]
    x = torch.from_numpy(np.stack(resized).astype(np.float32) / 255).permute(0, 3, 1, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state[:, 0]


def test_dino_score_is_cosine_to_the_mean_of_normalized_photo_embeddings(dino, tiny_vit, toy):
    from transformers import ViTModel

    model = ViTModel.from_pretrained(tiny_vit, add_pooling_layer=False).eval()
    photos = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255).permute(2, 0, 1)
                          for p in sorted(toy.images.iterdir())])  # square 48 px photos: no crop needed
    embeddings = _by_hand_cls(model, photos)
    mean = torch.stack([e / e.norm() for e in embeddings]).mean(0)
    reference = mean / mean.norm()
    images = torch.cat([photos[:1], noise(2)])
    cls = _by_hand_cls(model, images)
    expected = (cls @ reference) / cls.norm(dim=1)
    torch.testing.assert_close(dino(images, *rows(3)), expected, atol=1e-5, rtol=0)


def test_dino_reward_is_dreambench_dino_over_the_length_of_the_mean(dino, tiny_vit, toy):
    """Per image, reward = `rlbooth eval`'s DINO (mean cosine to the photos) / |mean of normalized photo embeddings|.

    Pins the relation README states; the metric's encoder (dreambench.metrics' DinoEncoder) preprocesses alike.
    """
    from rlbooth.dreambench.metrics import DinoEncoder, cosine_matrix, embed_all, load_images

    encoder = DinoEncoder(str(tiny_vit))
    real = embed_all(encoder, load_images(sorted(toy.images.iterdir()), square=True))
    images = torch.cat([noise(2), 1 - noise(1, seed=3)])
    metric = cosine_matrix(encoder(images), real).mean(1)
    length = torch.nn.functional.normalize(real, dim=-1).mean(0).norm()
    assert length < 0.999  # the photos' embeddings differ, so the factor is not 1
    torch.testing.assert_close(dino(images, *rows(3)), metric / length, atol=1e-5, rtol=0)
    assert not torch.allclose(dino(images, *rows(3)), metric, atol=1e-4)


def test_dino_crops_non_square_photos_to_their_centre(tiny_vit, tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    square = draw_subject_photos(tmp_path / "square", count=1)
    photo = Image.open(square / "00.png")
    wide = Image.new("RGB", (96, 48), (0, 0, 0))
    wide.paste(photo, (24, 0))
    wide.save(folder / "wide.png")
    from_wide = build_reward("identity_dino", model=str(tiny_vit), subject=Subject(images=folder, class_noun="toy"))
    from_square = build_reward("identity_dino", model=str(tiny_vit), subject=Subject(images=square, class_noun="toy"))
    torch.testing.assert_close(from_wide.reference, from_square.reference)


def test_dino_errors_name_the_field_or_the_fix(tiny_vit, toy, tmp_path):
    with pytest.raises(RewardError, match=r"align\.reward_options\.identity_dino\.model"):
        build_reward("identity_dino", model=str(tmp_path / "missing"), subject=toy)
    with pytest.raises(RewardError, match="subject"):
        build_reward("identity_dino", model=str(tiny_vit))
    with pytest.raises(RewardError, match="dtype"):
        build_reward("identity_dino", model=str(tiny_vit), subject=toy, dtype="float8")
    with pytest.raises(RewardError, match="holds no images"):
        (tmp_path / "empty").mkdir()
        build_reward("identity_dino", model=str(tiny_vit), subject=Subject(images=tmp_path / "empty", class_noun="x"))
    dino = build_reward("identity_dino", model=str(tiny_vit), subject=toy)
    with pytest.raises(RewardError, match=r"\[0, 1\]"):
        dino(noise(1) * 2 - 1, *rows(1))


def test_dino_in_the_composite_scores_only_identifier_prompts(tiny_vit, toy):
    assert {"device", "dtype", "subject"} <= set(reward_parameters("identity_dino"))
    composite = CompositeReward({"identity_dino": 1.0, "brightness": 0.5},
                                options={"identity_dino": {"model": str(tiny_vit)}},
                                context={"device": "cpu", "dtype": "float32", "subject": toy})
    images = noise(3)
    meta = [{"with_identifier": True}, {"with_identifier": False}, {"with_identifier": True}]
    total, components = composite(images, ["a sks toy", "a toy", "a sks toy"], meta)
    dino = components["identity_dino"]
    assert math.isnan(dino[1]) and not math.isnan(dino[0]) and not math.isnan(dino[2])
    expected = composite.components["identity_dino"](images[[0, 2]], *rows(2))
    torch.testing.assert_close(dino[[0, 2]], expected)
    torch.testing.assert_close(total[1], 0.5 * images[1].mean())


# ---------------------------------------------------------------------------------------------
# faces: shared pieces


@pytest.fixture(scope="module")
def insightface():
    return pytest.importorskip("insightface")


@pytest.fixture(scope="module")
def sample_images(insightface) -> Path:
    folder = Path(insightface.__file__).parent / "data" / "images"
    if not (folder / "t1.jpg").is_file() or not (folder / "Tom_Hanks_54745.png").is_file():
        pytest.skip("this insightface wheel ships no sample photos")
    return folder


def write_tiny_arcface(path: Path, dim: int = 512, seed: int = 0, batch: int | str = "N") -> Path:
    """An ArcFace-shaped ONNX model (N x 3 x 112 x 112 -> N x dim): an 8x8 average pool, then a random projection.

    Node names avoid `Sub`/`Mul`, so insightface reads it as a PyTorch-style model: input (x - 127.5) / 127.5.
    An int `batch` exports the batch axis fixed, as some recognition models are (onnxruntime then refuses
    any other batch size).
    """
    from onnx import TensorProto, helper, numpy_helper

    weight = (np.random.default_rng(seed).standard_normal((3 * 14 * 14, dim)) / math.sqrt(588)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8], name="pool"),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
         helper.make_node("Gemm", ["flat", "proj_w"], ["embedding"], name="proj")],
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, dim])],
        [numpy_helper.from_array(weight, "proj_w")])
    return save_onnx(graph, path)


def write_fake_scrfd(path: Path) -> Path:
    """An SCRFD-shaped ONNX detector (9 outputs: scores, boxes, 5-point landmarks at strides 8, 16, 32).

    Only stride 32 fires: a 32-pixel cell brighter than mid-grey is a face whose box spans 1.5 strides
    around the anchor and whose landmarks are insightface's template scaled into that box.
    """
    from insightface.utils.face_align import arcface_dst
    from onnx import TensorProto, helper, numpy_helper

    half = 48.0  # box half-width in pixels at stride 32
    kps = ((arcface_dst / 112 * 2 * half - half) / 32).reshape(1, 10).astype(np.float32)
    consts = {"zero": np.zeros((1, 1), np.float32), "one": np.ones((1, 1), np.float32),
              "shape": np.array([-1, 1], np.int64), "box": np.full((1, 4), half / 32, np.float32),
              "kps": kps}
    nodes, outputs = [], {"score": [], "bbox": [], "kps": []}
    for stride in (8, 16, 32):
        gain, bias = (20.0, 0.0) if stride == 32 else (0.0, -20.0)
        consts[f"gain{stride}"] = np.full((1, 1, 1, 1), gain, np.float32)
        consts[f"bias{stride}"] = np.full((1, 1, 1, 1), bias, np.float32)
        s = str(stride)
        nodes += [
            helper.make_node("AveragePool", ["input.1"], ["pool" + s], kernel_shape=[stride, stride],
                             strides=[stride, stride]),
            helper.make_node("ReduceMean", ["pool" + s], ["bright" + s], axes=[1], keepdims=1),
            helper.make_node("Mul", ["bright" + s, "gain" + s], ["scaled" + s]),
            helper.make_node("Add", ["scaled" + s, "bias" + s], ["logit" + s]),
            helper.make_node("Sigmoid", ["logit" + s], ["prob" + s]),
            helper.make_node("Concat", ["prob" + s, "prob" + s], ["anchors" + s], axis=1),  # 2 anchors per cell
            helper.make_node("Transpose", ["anchors" + s], ["hwa" + s], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", ["hwa" + s, "shape"], ["score_" + s]),
            helper.make_node("Mul", ["score_" + s, "zero"], ["zeros" + s]),
            helper.make_node("Add", ["zeros" + s, "one"], ["ones" + s]),
            helper.make_node("Mul", ["ones" + s, "box"], ["bbox_" + s]),
            helper.make_node("Mul", ["ones" + s, "kps"], ["kps_" + s]),
        ]
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            outputs[kind].append(helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, ["A" + s, width]))
    graph = helper.make_graph(
        nodes, "fake_scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "H", "W"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        [numpy_helper.from_array(value, name) for name, value in consts.items()])
    return save_onnx(graph, path)


@pytest.fixture(scope="module")
def rec_path(insightface, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_arcface(tmp_path_factory.mktemp("rec") / "tiny_arcface.onnx")


@pytest.fixture(scope="module")
def rec_model(rec_path):
    from insightface.model_zoo import get_model

    return get_model(str(rec_path), providers=["CPUExecutionProvider"])


def read_bgr(path: Path) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1])


def to_tensor(bgr_images: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(img[:, :, ::-1].astype(np.float32) / 255).permute(2, 0, 1)
                        for img in bgr_images])


def template_face(x1: float, y1: float, x2: float, y2: float) -> DetectedFace:
    """A face whose landmarks are insightface's ArcFace template scaled into the box."""
    from insightface.utils.face_align import arcface_dst

    scale = np.array([(x2 - x1) / 112, (y2 - y1) / 112], np.float32)
    return DetectedFace(bbox=np.array([x1, y1, x2, y2], np.float32), kps=arcface_dst * scale + [x1, y1])


# ---------------------------------------------------------------------------------------------
# faces: building blocks


def test_tiny_model_routes_to_arcface_with_pytorch_style_input(rec_model):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    assert isinstance(rec_model, ArcFaceONNX)
    assert (rec_model.input_mean, rec_model.input_std, rec_model.input_size) == (127.5, 127.5, (112, 112))


def test_largest_face_picks_the_biggest_box():
    small, big, also_big = (DetectedFace(np.array(b, np.float32), np.zeros((5, 2), np.float32))
                            for b in ([0, 0, 10, 10], [5, 5, 40, 30], [50, 50, 85, 75]))
    assert largest_face([small, big, also_big]) is big
    assert largest_face([also_big, small, big]) is also_big
    assert largest_face([]) is None


def test_alignment_maps_known_landmarks_onto_the_arcface_template(sample_images):
    from insightface.utils.face_align import arcface_dst, estimate_norm

    aligned = read_bgr(sample_images / "Tom_Hanks_54745.png")  # an already aligned 112 px ArcFace crop
    assert aligned.shape == (112, 112, 3)
    # Put the face into a bigger photo by a known similarity: 1.8x, turned 25 degrees, moved.
    angle, scale = math.radians(25), 1.8
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    forward = np.hstack([rotation, [[150.0], [60.0]]]).astype(np.float32)
    import cv2

    photo = cv2.warpAffine(aligned, forward, (400, 360), flags=cv2.INTER_CUBIC)
    kps = arcface_dst @ rotation.T + forward[:, 2]

    crop = identity.align_face(photo, kps)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    matrix = estimate_norm(kps.astype(np.float32), 112)
    landed = kps @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(landed, arcface_dst, atol=0.5)
    inner = (slice(8, 104), slice(8, 104))  # the border was resampled twice
    assert np.abs(crop[inner].astype(float) - aligned[inner].astype(float)).mean() < 6
    # the template's own landmarks on the aligned crop give back the crop
    again = identity.align_face(aligned, arcface_dst)
    assert np.abs(again.astype(float) - aligned.astype(float)).mean() < 1
    with pytest.raises(RewardError, match="5 landmarks"):
        identity.align_face(aligned, arcface_dst[:4])


def test_embed_aligned_gives_unit_rows_independent_of_batching(rec_model, sample_images):
    face = read_bgr(sample_images / "Tom_Hanks_54745.png")
    other = np.ascontiguousarray(face[:, ::-1])
    both = identity.embed_aligned(rec_model, [face, other])
    assert both.shape == (2, 512) and both.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(identity.embed_aligned(rec_model, [other])[0], both[1], atol=1e-5)
    assert both[0] @ both[1] < 0.999


# ---------------------------------------------------------------------------------------------
# faces: the reward through the detector seam


def bright_centre_detector(image_bgr: np.ndarray) -> list[DetectedFace]:
    """Stub: a face filling the central square when the image is not dark, none otherwise."""
    if image_bgr.mean() < 40:
        return []
    h, w = image_bgr.shape[:2]
    side = min(h, w)
    x1, y1 = (w - side) / 2, (h - side) / 2
    return [template_face(x1, y1, x1 + side, y1 + side)]


@pytest.fixture
def tom(sample_images, tmp_path) -> Path:
    folder = tmp_path / "tom"
    folder.mkdir()
    face = Image.open(sample_images / "Tom_Hanks_54745.png").convert("RGB")
    face.save(folder / "a.png")
    face.transpose(Image.FLIP_LEFT_RIGHT).save(folder / "b.png")
    return folder


def test_face_score_is_cosine_to_the_mean_reference_and_no_face_is_counted(rec_model, tom):
    reward = FaceIdentityReward(InsightfaceBackend(bright_centre_detector, rec_model), sorted(tom.iterdir()),
                                no_face_score=-2.0)
    assert reward.identifier_only is True
    photos = [read_bgr(p) for p in sorted(tom.iterdir())]
    refs = identity.embed_aligned(rec_model, photos)  # the stub's landmarks are the template: crops = photos
    reference = refs.mean(0) / np.linalg.norm(refs.mean(0))

    stranger = np.ascontiguousarray(photos[0][::-1])  # upside down: same pixels, not the same face
    dark = np.full((112, 112, 3), 10, np.uint8)
    images = to_tensor([photos[0], stranger, dark]).requires_grad_()
    scores = reward(images, *rows(3))
    assert scores.shape == (3,) and scores.dtype == torch.float32 and not scores.requires_grad
    expected = identity.embed_aligned(rec_model, [photos[0], stranger]) @ reference
    np.testing.assert_allclose(scores[:2].numpy(), expected, atol=1e-5)
    assert scores[0] > scores[1]
    assert scores[2] == -2.0
    assert reward.log_stats() == {"identity_face/no_face": 1.0, "identity_face/several_faces": 0.0,
                                  "identity_face/scored": 2.0}
    assert reward.log_stats() == {"identity_face/no_face": 0.0, "identity_face/several_faces": 0.0,
                                  "identity_face/scored": 0.0}
    assert torch.equal(reward(images[:2], *rows(2)), scores[:2])


@pytest.mark.parametrize("batch", [1, 2])
def test_recognition_model_with_a_fixed_batch_embeds_any_number_of_crops(insightface, rec_model, sample_images,
                                                                         tmp_path, batch):
    """A recognition ONNX exported with a fixed batch axis gets the crops in chunks of that size (the last one
    padded); the embeddings equal those of the same weights with a free batch axis."""
    from insightface.model_zoo import get_model

    fixed = get_model(str(write_tiny_arcface(tmp_path / "fixed.onnx", batch=batch)),
                      providers=["CPUExecutionProvider"])
    assert identity.fixed_batch_size(fixed) == batch and identity.fixed_batch_size(rec_model) is None
    face = read_bgr(sample_images / "Tom_Hanks_54745.png")
    crops = [face, np.ascontiguousarray(face[:, ::-1]), np.ascontiguousarray(face[::-1])]
    embeds = identity.embed_aligned(fixed, crops)
    assert embeds.shape == (3, 512)
    np.testing.assert_allclose(embeds, identity.embed_aligned(rec_model, crops), atol=1e-5)
    # the whole reward: three subject photos make one reference, a batch of three images is scored
    folder = tmp_path / "subject"
    folder.mkdir()
    for i, crop in enumerate(crops):
        Image.fromarray(crop[:, :, ::-1]).save(folder / f"{i}.png")
    rewards = [FaceIdentityReward(InsightfaceBackend(bright_centre_detector, model), sorted(folder.iterdir()))
               for model in (fixed, rec_model)]
    images = to_tensor(crops)
    np.testing.assert_allclose(rewards[0](images, *rows(3)).numpy(), rewards[1](images, *rows(3)).numpy(), atol=1e-5)


def test_subject_photo_without_a_face_is_an_error_naming_it(rec_model, tom):
    Image.new("RGB", (64, 64), (5, 5, 5)).save(tom / "c_dark.png")
    with pytest.raises(RewardError, match="c_dark.png"):
        FaceIdentityReward(InsightfaceBackend(bright_centre_detector, rec_model), sorted(tom.iterdir()))


# ---------------------------------------------------------------------------------------------
# faces: real photos, with dlib's HOG detector standing in for SCRFD

T1_FACES = {"subject": (870, 67, 999, 196), "other": (67, 283, 175, 390)}  # two of t1.jpg's six faces


@pytest.fixture(scope="module")
def hog_detector():
    dlib = pytest.importorskip("dlib", reason="dlib-bin gives a weight-free face detector for these tests")
    detector = dlib.get_frontal_face_detector()

    def detect(image_bgr: np.ndarray) -> list[DetectedFace]:
        rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
        return [template_face(r.left(), r.top(), r.right(), r.bottom()) for r in detector(rgb, 0)]

    return detect


def face_crop(t1: np.ndarray, box: tuple[int, int, int, int], margin: float, size: int = 160) -> np.ndarray:
    import cv2

    x1, y1, x2, y2 = box
    pad = int(margin * (x2 - x1))
    crop = t1[max(0, y1 - pad):y2 + pad, max(0, x1 - pad):x2 + pad]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def test_real_photos_same_person_scores_higher_than_another(rec_model, hog_detector, sample_images, tmp_path):
    t1 = read_bgr(sample_images / "t1.jpg")
    folder = tmp_path / "person"
    folder.mkdir()
    for margin in (0.3, 0.7):
        Image.fromarray(face_crop(t1, T1_FACES["subject"], margin)[:, :, ::-1]).save(folder / f"m{margin}.png")
    reward = FaceIdentityReward(InsightfaceBackend(hog_detector, rec_model), sorted(folder.iterdir()))
    same = face_crop(t1, T1_FACES["subject"], 0.5)
    other = face_crop(t1, T1_FACES["other"], 0.5)
    scores = reward(to_tensor([same, other]), *rows(2))
    assert scores[0] > scores[1] + 0.1
    assert reward.log_stats()["identity_face/scored"] == 2

    # the whole group photo: six faces found, the largest one scored, counted as several
    faces = hog_detector(t1)
    assert len(faces) == 6
    biggest = max(faces, key=lambda face: face.area)
    expected = identity.embed_aligned(rec_model, [identity.align_face(t1, biggest.kps)]) @ reward.reference
    np.testing.assert_allclose(reward(to_tensor([t1]), *rows(1)).numpy(), expected, atol=1e-5)
    assert reward.log_stats()["identity_face/several_faces"] == 1


def test_real_detector_rejects_a_subject_photo_without_a_face(rec_model, hog_detector, sample_images, tmp_path):
    folder = tmp_path / "person"
    folder.mkdir()
    Image.fromarray(face_crop(read_bgr(sample_images / "t1.jpg"), T1_FACES["subject"], 0.5)[:, :, ::-1]).save(
        folder / "face.png")
    Image.open(sample_images / "mask_blue.jpg").save(folder / "mask_blue.jpg")  # a face-mask texture, no face
    with pytest.raises(RewardError, match="mask_blue.jpg"):
        FaceIdentityReward(InsightfaceBackend(hog_detector, rec_model), sorted(folder.iterdir()))


# ---------------------------------------------------------------------------------------------
# faces: the registered factory, end to end, on a local pack folder


@pytest.fixture(scope="module")
def pack(insightface, rec_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pack")
    write_fake_scrfd(folder / "det_fake.onnx")
    (folder / "w_tiny.onnx").write_bytes(rec_path.read_bytes())
    return folder


def bright_texture(seed: int, size: int = 128) -> np.ndarray:
    """RGB uint8: light (every 32 px cell brighter than mid-grey), with a seeded pattern."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(150, 255, (size // 16, size // 16, 3)).astype(np.uint8)
    return np.kron(coarse, np.ones((16, 16, 1), np.uint8))


@pytest.fixture
def textures(tmp_path) -> Subject:
    folder = tmp_path / "textures"
    folder.mkdir()
    for seed in (0, 1):
        Image.fromarray(bright_texture(seed)).save(folder / f"{seed}.png")
    return Subject(images=folder, class_noun="person", kind="face")


def test_factory_loads_a_pack_folder_and_scores_end_to_end(pack, textures, rec_path, tmp_path):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    reward = build_reward("identity_face", pack=str(pack), det_size=128, no_face_score=-1.5, subject=textures,
                          device="cpu", dtype="bfloat16")
    assert reward.identifier_only is True
    assert isinstance(reward.backend.detect, identity.ScrfdDetector) and isinstance(reward.backend.detect.model, SCRFD)
    assert isinstance(reward.backend.rec_model, ArcFaceONNX) and reward.backend.crop_size == 112
    own = bright_texture(0)
    images = torch.from_numpy(np.stack([own, bright_texture(7), np.full_like(own, 20)])).permute(0, 3, 1, 2) / 255.0
    scores = reward(images.float(), *rows(3))
    assert scores[0] > scores[1] and scores[2] == -1.5
    stats = reward.log_stats()
    assert stats["identity_face/no_face"] == 1 and stats["identity_face/scored"] == 2
    assert stats["identity_face/several_faces"] == 2  # every bright cell is a "face" to the fake detector

    # the same numbers with the recognition model given as its own file, beside a detection-only pack
    det_only = tmp_path / "det_only"
    det_only.mkdir()
    (det_only / "det_fake.onnx").write_bytes((pack / "det_fake.onnx").read_bytes())
    separate = build_reward("identity_face", pack=str(det_only), recognition=str(rec_path), det_size=128,
                            no_face_score=-1.5, subject=textures)
    assert isinstance(separate.backend.detect.model, SCRFD) and separate.backend.rec_model.model_file == str(rec_path)
    torch.testing.assert_close(separate(images.float(), *rows(3)), scores)

    # a subject photo in which the detector finds no face is named
    Image.fromarray(np.full((128, 128, 3), 30, np.uint8)).save(textures.images / "2_dark.png")
    with pytest.raises(RewardError, match="2_dark.png"):
        build_reward("identity_face", pack=str(pack), det_size=128, subject=textures)


def test_factory_errors_name_the_option(pack, textures, rec_path, tmp_path):
    rec_only = tmp_path / "rec_only"
    rec_only.mkdir()
    (rec_only / "w_tiny.onnx").write_bytes(rec_path.read_bytes())
    with pytest.raises(RewardError, match=r"identity_face\.pack="):
        build_reward("identity_face", pack=str(rec_only), subject=textures)
    with pytest.raises(RewardError, match="no such folder"):
        build_reward("identity_face", pack=str(tmp_path / "nowhere"), subject=textures)
    with pytest.raises(RewardError, match=r"identity_face\.recognition=.*not a face recognition model"):
        build_reward("identity_face", pack=str(pack), recognition=str(pack / "det_fake.onnx"), subject=textures)
    with pytest.raises(RewardError, match="no such ONNX file"):
        build_reward("identity_face", pack=str(pack), recognition=str(tmp_path / "x.onnx"), subject=textures)
    with pytest.raises(RewardError, match="det_size"):
        build_reward("identity_face", pack=str(pack), det_size=100, subject=textures)
    with pytest.raises(RewardError, match="no_face_score"):
        build_reward("identity_face", pack=str(pack), no_face_score=float("nan"), subject=textures)
    with pytest.raises(RewardError, match="device"):
        build_reward("identity_face", pack=str(pack), device="tpu", subject=textures)
    with pytest.raises(RewardError, match="subject"):
        build_reward("identity_face", pack=str(pack))
    assert {"device", "dtype", "subject"} <= set(reward_parameters("identity_face"))
