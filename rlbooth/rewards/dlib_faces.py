"""dlib's face models as a backend of `identity_face`: offline, and licensed for commercial use.

Detection by dlib's HOG frontal-face detector (built into dlib, no weights) or its MMOD CNN
detector, the 5-point landmark model, alignment with `dlib.get_face_chip` (150 px, padding 0.25,
the chip dlib's ResNet was trained on) and the ResNet's 128-d face descriptor.

The weights are dlib's (Davis King's) `.dat` files, public domain / CC0: the PyPI package
`face_recognition_models` ships them (extra `faces-dlib`), or any folder holding them does. The
package is located without being imported: its `__init__` imports `pkg_resources`, which recent
setuptools no longer has. Its 68-point landmark model is never used (its training data, iBUG 300-W,
is for non-commercial use only).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlbooth.rewards import RewardError
from rlbooth.rewards.identity import DetectedFace, normalize_features

logger = logging.getLogger(__name__)

FIELD = "align.reward_options.identity_face"
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
CNN_FILE = "mmod_human_face_detector.dat"
DETECTORS = ("hog", "cnn")
CHIP_SIZE, CHIP_PADDING = 150, 0.25  # what compute_face_descriptor expects of a chip

RawDetector = Callable[[np.ndarray], list[tuple[Any, float]]]
"""RGB uint8 (H, W, 3) -> (dlib.rectangle, confidence) per face."""


class DlibBackend:
    """A `FaceBackend` from dlib objects: a raw detector, a 5-point shape predictor, the face recognition ResNet."""

    def __init__(self, detector: RawDetector, shape_predictor: Any, recognizer: Any) -> None:
        import dlib

        self._dlib = dlib
        self.detector = detector
        self.shape_predictor = shape_predictor
        self.recognizer = recognizer

    def detect(self, image_bgr: np.ndarray) -> list[DetectedFace]:
        rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
        faces = []
        for rect, confidence in self.detector(rgb):
            shape = self.shape_predictor(rgb, rect)
            kps = np.array([(point.x, point.y) for point in shape.parts()], np.float32)
            bbox = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], np.float32)
            faces.append(DetectedFace(bbox=bbox, kps=kps, score=float(confidence)))
        return faces

    def align(self, image_bgr: np.ndarray, face: DetectedFace) -> np.ndarray:
        """dlib's aligned 150 px RGB chip from the face's box and its five landmarks."""
        dlib = self._dlib
        kps = np.asarray(face.kps)
        if kps.shape != (5, 2):
            raise RewardError(f"identity_face: dlib alignment needs 5 landmarks (5, 2), got {kps.shape}")
        x1, y1, x2, y2 = (int(round(float(v))) for v in face.bbox[:4])
        points = dlib.points([dlib.point(int(round(float(x))), int(round(float(y)))) for x, y in kps])
        shape = dlib.full_object_detection(dlib.rectangle(x1, y1, x2, y2), points)
        rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
        return np.asarray(dlib.get_face_chip(rgb, shape, size=CHIP_SIZE, padding=CHIP_PADDING))

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, 0), dtype=np.float32)
        chips = [np.ascontiguousarray(chip, dtype=np.uint8) for chip in crops]
        descriptors = self.recognizer.compute_face_descriptor(chips)
        return normalize_features([np.asarray(d) for d in descriptors], len(chips))


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError as err:
        raise RewardError(f"{FIELD}.backend='dlib' needs dlib: pip install 'rlbooth[faces-dlib]' (dlib-bin and "
                          f"face_recognition_models) ({err})") from err
    return dlib


def model_folder(models: str | None) -> Path:
    """The folder of dlib's .dat files: `models`, or the installed face_recognition_models package's."""
    if models is not None:
        folder = Path(models).expanduser()
        if not folder.is_dir():
            raise RewardError(f"{FIELD}.dlib_models={models!r}: no such folder; give a folder holding "
                              f"{RECOGNITION_FILE} and {LANDMARKS_FILE} (and {CNN_FILE} for detector: cnn)")
        return folder
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RewardError(f"{FIELD}.backend='dlib': dlib's face models are not installed. Install them with "
                          "pip install 'rlbooth[faces-dlib]' (the PyPI package face_recognition_models, about "
                          f"100 MB), or put {RECOGNITION_FILE} and {LANDMARKS_FILE} in a folder and pass it: "
                          f"`--set {FIELD}.dlib_models=/path/to/folder`")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _model_file(folder: Path, name: str, given: str | None) -> str:
    path = folder / name
    if not path.is_file():
        where = f"{FIELD}.dlib_models={given!r}" if given is not None else f"the face_recognition_models package ({folder})"
        raise RewardError(f"{where} has no {name}; reinstall face_recognition_models, or download {name}.bz2 from "
                          "dlib's model files (dlib-models), unpack it into a folder and pass that folder as "
                          f"`--set {FIELD}.dlib_models=/path/to/folder`")
    return str(path)


def _load(loader: Callable[[str], Any], path: str) -> Any:
    try:
        return loader(path)
    except Exception as err:  # dlib raises RuntimeError on a truncated or foreign file
        raise RewardError(f"identity_face: {path} cannot be loaded as a dlib model ({type(err).__name__}: {err}); "
                          "replace the file") from err


def _check_device(dlib: Any, device: str) -> None:
    kind, _, index = str(device).partition(":")
    if kind == "cpu":
        return
    if kind != "cuda" or (index and not index.isdigit()):
        raise RewardError(f"identity_face: device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not getattr(dlib, "DLIB_USE_CUDA", False):
        logger.warning("identity_face: device %s asked for, but this dlib is built without CUDA (dlib-bin is CPU "
                       "only); the dlib face models run on the CPU", device)
        return
    dlib.cuda.set_device(int(index or 0))


def load_dlib_backend(models: str | None, detector: str, upsample: int, device: str) -> DlibBackend:
    """dlib's detector (`hog` or `cnn`, image upsampled `upsample` times), 5-point landmarks and ResNet."""
    if detector not in DETECTORS:
        raise RewardError(f"{FIELD}.detector={detector!r}: must be one of {list(DETECTORS)}")
    if isinstance(upsample, bool) or not isinstance(upsample, int) or not 0 <= upsample <= 3:
        raise RewardError(f"{FIELD}.upsample={upsample!r}: must be an integer from 0 to 3 (each doubles the image "
                          "the detector scans: faces down to about 80 px / 2**upsample are found)")
    dlib = _import_dlib()
    _check_device(dlib, device)
    folder = model_folder(models)
    recognizer = _load(dlib.face_recognition_model_v1, _model_file(folder, RECOGNITION_FILE, models))
    landmarks = _load(dlib.shape_predictor, _model_file(folder, LANDMARKS_FILE, models))
    if detector == "hog":
        hog = dlib.get_frontal_face_detector()

        def find(rgb: np.ndarray) -> list[tuple[Any, float]]:
            rects, scores, _ = hog.run(rgb, upsample, 0.0)
            return list(zip(rects, scores))
    else:
        cnn = _load(dlib.cnn_face_detection_model_v1, _model_file(folder, CNN_FILE, models))

        def find(rgb: np.ndarray) -> list[tuple[Any, float]]:
            return [(found.rect, found.confidence) for found in cnn(rgb, upsample)]

    return DlibBackend(find, landmarks, recognizer)
