"""Shared test set-up: CPU only, one thread, no network, a private cache, tiny models built in code."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

torch.set_num_threads(1)  # tiny models run ~50x slower when two threads fight for two busy cores

REPO = Path(__file__).resolve().parent.parent


LONGEST_FIRST = ("tests/toyworld/test_experiment.py::", "tests/align/test_train.py::", "tests/align/test_nft.py::",
                 "tests/align/test_refl.py::", "tests/test_memory.py::", "tests/align/test_speedups.py::",
                 "tests/align/test_distributed.py::", "tests/test_run.py::", "tests/personalize/test_train.py::",
                 "tests/align/test_heldout.py::", "tests/align/test_memory_savings.py::", "tests/test_export.py::",
                 "tests/test_wheel.py::", "tests/test_crash_safety.py::", "tests/toyworld/test_model.py::",
                 "tests/test_output_folders.py::", "tests/test_quiet.py::")
"""The longest scopes, longest first (2026-12-06: the toy worlds minutes a class, then these modules 132 s down
to 9 s). Collected in this order before the rest, so that under `pytest -n 2 --dist loadscope
--no-loadscope-reorder` (the README's test command) the two workers start on the worlds, share out the long
modules next and end on short ones, which leaves neither waiting long for the other (longest first)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = lambda nodeid: next((i for i, prefix in enumerate(LONGEST_FIRST) if nodeid.startswith(prefix)),
                               len(LONGEST_FIRST))
    items.sort(key=lambda item: rank(item.nodeid))  # stable: the rest keep their order


@pytest.fixture(autouse=True, scope="session")
def rlbooth_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the session, so the tiny models and class images are built once; under pytest-xdist one for
    all workers (the run's shared temporary folder): both are written by atomic renames of identical content."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / "rlbooth-cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("rlbooth-cache")
    os.environ["RLBOOTH_CACHE"] = str(path)
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run builds its own Accelerator; accelerate keeps process-wide singletons we reset between tests."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def draw_subject_photos(folder: Path, count: int = 4, size: int = 48) -> Path:
    """Photos of a made-up subject: a red triangle with a yellow dot on varied backgrounds."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = Image.new("RGB", (size, size), (40 * i + 60, 150, 220 - 30 * i))
        draw = ImageDraw.Draw(img)
        o = 4 + 3 * i
        draw.polygon([(o, o + 30), (o + 15, o), (o + 30, o + 30)], fill=(210, 40, 40))
        draw.ellipse([o + 12, o + 16, o + 18, o + 22], fill=(250, 220, 40))
        img.save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture
def subject_photos(tmp_path: Path) -> Path:
    return draw_subject_photos(tmp_path / "photos")


FACES = REPO / "tests" / "data" / "faces"  # real 256 px photos, public domain (see its README)


def real_photo_layouts() -> dict[str, Image.Image]:
    """Real photos at the sizes rewards meet: 256 px as is, a 512 px 2x2 mosaic (shrunk 2.3x, as an SD
    sample is), and a 256 x 180 crop (non-square: its short side is enlarged, its long side centre-cropped)."""
    photos = [Image.open(FACES / f"{name}.jpg").convert("RGB") for name in ("obama", "obama2", "obama3", "biden")]
    mosaic = Image.new("RGB", (512, 512))
    for i, photo in enumerate(photos):
        mosaic.paste(photo, (256 * (i % 2), 256 * (i // 2)))
    return {"photo": photos[0], "mosaic": mosaic, "wide": photos[3].crop((0, 30, 256, 210))}


def pil_to_batch(img: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1], exactly the photo's 8-bit pixels / 255: how a reward receives it."""
    import numpy as np

    return torch.from_numpy(np.array(img, dtype=np.float32) / 255).permute(2, 0, 1).unsqueeze(0)


def max_level_difference(ours: torch.Tensor, reference: torch.Tensor, std: tuple[float, ...]) -> float:
    """The largest difference of two normalized pixel tensors in 8-bit pixel levels (normalization undone)."""
    scale = torch.tensor(std).view(1, -1, 1, 1) * 255
    return float(((ours - reference).abs() * scale).max())


@pytest.fixture
def item_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Files of rlbooth's own `Tensor.item()` calls (each a host sync on a GPU) while the test runs."""
    import sys

    calls: list[str] = []
    item = torch.Tensor.item

    def counted(self: torch.Tensor) -> float:
        caller = sys._getframe(1).f_code.co_filename
        if f"{os.sep}rlbooth{os.sep}" in caller:
            calls.append(caller)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    return calls
