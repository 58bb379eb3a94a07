"""`python -m rlbooth.dreambench.evaluate` end to end, offline: two tiny models, two subjects, tiny DINO and CLIP."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from rlbooth.dreambench import evaluate, metrics
from rlbooth import sampling
from tests.align.conftest import make_stage_one
from tests.rewards.test_clip_models import tiny_clip  # noqa: F401  (fixture)
from tests.rewards.test_identity import tiny_vit  # noqa: F401  (fixture)


def write_photos(folder: Path, count: int, size: tuple[int, int], color: tuple[int, int, int]) -> Path:
    """JPEG photos in DreamBench's layout; non-square sizes exercise the central-square crop."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = Image.new("RGB", size, (color[0], 30 * i + 40, color[2]))
        ImageDraw.Draw(img).ellipse([4 + 2 * i, 6, 30 + 2 * i, 32], fill=(240, 240, 20 * i))
        img.save(folder / f"{i:02d}.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    stage_a = make_stage_one(root / "a", 32)
    stage_b = root / "b" / "out"
    shutil.copytree(stage_a, stage_b)
    mapping = root / "b" / "model-b.json"
    mapping.write_text(json.dumps({"dog": "out", "backpack": str(stage_b)}))
    photos = root / "dreambench"
    write_photos(photos / "dog", 3, (48, 40), (200, 120, 60))
    write_photos(photos / "backpack", 2, (40, 40), (30, 60, 200))
    (photos / "cat").mkdir()  # an empty subject folder
    return {"a": stage_a, "b": mapping, "photos": photos, "root": root}


def argv(bench: dict[str, Path], output: Path, vit: Path, clip: Path, *extra: str) -> list[str]:
    return ["--models", f"A={bench['a']}", "--models", f"B={bench['b']}", "--dreambench-root", str(bench["photos"]),
            "--subjects", "dog", "backpack", "--num-prompts", "2", "--num-images", "1", "--steps", "2",
            "--metrics", "dino", "clip_i", "clip_t", "--dino-model", str(vit), "--clip-model", str(clip),
            "--device", "cpu", "--output", str(output), *extra]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def no_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("sample_stage must not be called")

    monkeypatch.setattr(sampling, "sample_stage", fail)


@pytest.fixture(scope="module")
def first_run(bench, tiny_vit, tiny_clip) -> Path:  # noqa: F811
    output = bench["root"] / "eval"
    assert evaluate.main(argv(bench, output, tiny_vit, tiny_clip)) == 0
    return output


def test_first_run_writes_images_and_tables(first_run: Path):
    images = sorted(p.relative_to(first_run / "images").as_posix() for p in (first_run / "images").rglob("*.png"))
    assert images == [f"{m}/{s}/p{p:02d}-seed0.png" for m in "AB" for s in ("backpack", "dog") for p in (0, 1)]
    rows = read_csv(first_run / "scores.csv")
    assert list(rows[0]) == evaluate.SCORE_FIELDS
    assert len(rows) == 8
    dog = [r for r in rows if r["model"] == "A" and r["subject"] == "dog"]
    assert [r["prompt"] for r in dog] == ["a sks dog in the jungle", "a sks dog in the snow"]
    assert {r["kind"] for r in dog} == {"live"}
    backpack = [r for r in rows if r["model"] == "A" and r["subject"] == "backpack"]
    assert backpack[0]["prompt"] == "a sks backpack in the jungle" and backpack[0]["kind"] == "object"
    for row in rows:
        assert all(-1 <= float(row[m]) <= 1 for m in ("dino", "clip_i", "clip_t"))
        assert row["image_reward"] == row["pickscore"] == ""
    # model B is a copy of A: same seeds, same images, same scores
    by_key = {(r["model"], r["subject"], r["prompt_index"]): r for r in rows}
    for (model, subject, p), row in by_key.items():
        if model == "A":
            assert {m: row[m] for m in ("dino", "clip_i", "clip_t")} == \
                   {m: by_key["B", subject, p][m] for m in ("dino", "clip_i", "clip_t")}

    summary = read_csv(first_run / "summary.csv")
    assert [(r["model"], r["scope"], r["name"], r["num_images"]) for r in summary] == [
        (m, scope, name, n) for m in "AB" for scope, name, n in
        [("subject", "dog", "2"), ("subject", "backpack", "2"), ("kind", "live", "2"), ("kind", "object", "2"),
         ("all", "all", "4")]]
    overall = next(r for r in summary if r["model"] == "A" and r["scope"] == "all")
    a_rows = [r for r in rows if r["model"] == "A"]
    assert float(overall["dino"]) == pytest.approx(sum(float(r["dino"]) for r in a_rows) / 4, abs=1e-4)

    results = (first_run / "results.md").read_text()
    table = [line for line in results.splitlines() if line.startswith("|")]
    assert table[0] == "| Model | DINO | CLIP-I | CLIP-T | ImageReward | PickScore (0-1) |"
    assert table[2].startswith(f"| A | {overall['dino']} | {overall['clip_i']} | {overall['clip_t']} | – | – |")
    assert table[3].startswith("| B |")
    assert "| 0.668 | 0.803 | 0.305 | – | – |" in table[4]
    assert "| 0.661 | – | 0.306 | 0.651 | 0.217 |" in table[5]
    assert "2 subject(s), 2 prompt(s)" in results
    assert "divided by 100" in results


def test_table_puts_pickscore_on_the_published_scale():
    from rlbooth.dreambench.evaluate import _table_value

    assert _table_value("pickscore", "21.7000") == "0.2170"  # InstructBooth's 0.217 sits beside it
    assert _table_value("dino", "0.6680") == "0.6680" and _table_value("pickscore", "") == "–"


def test_scores_are_the_metrics_by_hand(first_run: Path, bench, tiny_vit, tiny_clip):  # noqa: F811
    row = next(r for r in read_csv(first_run / "scores.csv") if r["model"] == "A" and r["subject"] == "dog"
               and r["prompt_index"] == "1")
    image = metrics.load_images([first_run / "images/A/dog/p01-seed0.png"])[0]
    photos = metrics.load_images(sorted((bench["photos"] / "dog").iterdir()), square=True)
    dino = metrics.DinoEncoder(str(tiny_vit))
    real = torch.cat([dino(p) for p in photos])
    assert float(row["dino"]) == pytest.approx(metrics.pairwise_mean_cosine(dino(image), real), abs=1e-5)
    clip = metrics.clip_encoder(str(tiny_clip))
    real = torch.cat([clip.images(p) for p in photos])
    assert float(row["clip_i"]) == pytest.approx(metrics.pairwise_mean_cosine(clip.images(image), real), abs=1e-5)
    text = clip.texts(["a dog in the snow"])  # the identifier removed
    assert float(row["clip_t"]) == pytest.approx(float((clip.images(image) * text).sum()), abs=1e-5)


def test_rerun_generates_and_scores_nothing(first_run: Path, bench, tiny_vit, tiny_clip,  # noqa: F811
                                            monkeypatch: pytest.MonkeyPatch):
    before = (first_run / "scores.csv").read_bytes()
    no_generation(monkeypatch)
    monkeypatch.setattr(metrics, "DinoEncoder", None)  # loading a metric model would fail
    monkeypatch.setattr(metrics, "clip_encoder", None)
    assert evaluate.main(argv(bench, first_run, tiny_vit, tiny_clip)) == 0
    assert (first_run / "scores.csv").read_bytes() == before


def test_a_lost_row_is_scored_again_without_generation(first_run: Path, bench, tiny_vit, tiny_clip,  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch):
    rows = read_csv(first_run / "scores.csv")
    evaluate.write_rows(first_run / "scores.csv", evaluate.SCORE_FIELDS, rows[:-1])
    no_generation(monkeypatch)
    assert evaluate.main(argv(bench, first_run, tiny_vit, tiny_clip)) == 0
    again = read_csv(first_run / "scores.csv")
    assert len(again) == 8
    assert {m: float(again[-1][m]) for m in ("dino", "clip_t")} == \
           pytest.approx({m: float(rows[-1][m]) for m in ("dino", "clip_t")}, abs=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"--subjects": ["dog", "dogg"]}, "unknown DreamBench subject(s) ['dogg']"),
    ({"--subjects": ["dog", "cat"]}, "subject 'cat'"),
    ({"--subjects": ["dog", "can"]}, "subject 'can'"),
    ({"model": "A=/nonexistent/stage"}, "neither a stage output folder"),
    ({"model": "A={photos}"}, "is not a finished rlbooth stage output"),
    ({"--num-prompts": ["26"]}, "--num-prompts 26"),
])
def test_bad_input_fails_before_any_generation(bench, tiny_vit, tiny_clip, tmp_path: Path,  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch, capsys, change: dict, message: str):
    no_generation(monkeypatch)
    args = argv(bench, tmp_path / "eval", tiny_vit, tiny_clip)
    for flag, values in change.items():
        if flag == "model":
            args[args.index(f"A={bench['a']}")] = values.format(photos=bench["photos"])
        else:
            i = args.index(flag)
            args[i + 1:i + 1 + (2 if flag == "--subjects" else 1)] = values
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "eval").exists()


def test_mapping_file_must_name_every_subject(bench, tiny_vit, tiny_clip, tmp_path: Path,  # noqa: F811
                                              monkeypatch: pytest.MonkeyPatch, capsys):
    no_generation(monkeypatch)
    partial = tmp_path / "partial.yaml"
    partial.write_text(f"dog: {bench['a']}\n")
    args = argv(bench, tmp_path / "eval", tiny_vit, tiny_clip)
    args[args.index(f"B={bench['b']}")] = f"B={partial}"
    assert evaluate.main(args) == 2
    assert "names no stage folder for subject 'backpack'" in capsys.readouterr().err


def test_rlbooth_eval_forwards_its_arguments(bench, tiny_vit, tiny_clip, tmp_path: Path,  # noqa: F811
                                             monkeypatch: pytest.MonkeyPatch, capsys):
    from rlbooth.cli import main

    no_generation(monkeypatch)
    args = argv(bench, tmp_path / "eval", tiny_vit, tiny_clip)
    args[args.index("backpack")] = "nope"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *args])
    assert exit_info.value.code == 2
    assert "unknown DreamBench subject(s) ['nope']" in capsys.readouterr().err


def test_hub_root_downloads_the_subjects_in_the_original_layout(tmp_path, monkeypatch):
    import huggingface_hub

    from rlbooth.dreambench.evaluate import photo_root

    calls = {}

    def fake_snapshot(repo_id, repo_type, allow_patterns):
        calls.update(repo_id=repo_id, repo_type=repo_type, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert photo_root("hub", ["dog", "can"]) == tmp_path / "dataset"
    assert calls == {"repo_id": "google/dreambooth", "repo_type": "dataset",
                     "allow_patterns": ["dataset/dog/*", "dataset/can/*"]}
    assert photo_root(str(tmp_path), ["dog"]) == tmp_path


def test_hub_root_offline_explains_the_fix(monkeypatch):
    import huggingface_hub

    from rlbooth.dreambench.evaluate import EvalError, photo_root

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(EvalError, match="--dreambench-root dreambooth/dataset"):
        photo_root("hub", ["dog"])


@pytest.mark.slow
def test_rlbooth_eval_draws_and_scores_a_qwen_image_stage(tmp_path: Path, tiny_vit, tiny_clip):  # noqa: F811
    """`rlbooth eval` end to end on a tiny Qwen-Image stage one (true CFG through its pipeline)."""
    from rlbooth.cli import main

    stage = make_stage_one(tmp_path / "qwen", 32, "tiny-qwenimage")
    photos = write_photos(tmp_path / "bench" / "dog", 2, (40, 40), (200, 120, 60)).parent
    output = tmp_path / "eval"
    assert main(["eval", "--models", f"Q={stage}", "--dreambench-root", str(photos), "--subjects", "dog",
                 "--num-prompts", "2", "--num-images", "1", "--steps", "2", "--metrics", "dino", "clip_i", "clip_t",
                 "--dino-model", str(tiny_vit), "--clip-model", str(tiny_clip), "--device", "cpu",
                 "--output", str(output)]) == 0
    rows = read_csv(output / "scores.csv")
    assert [(r["model"], r["prompt"]) for r in rows] == [("Q", "a sks dog in the jungle"),
                                                         ("Q", "a sks dog in the snow")]
    for row in rows:
        assert all(-1 <= float(row[m]) <= 1 for m in ("dino", "clip_i", "clip_t"))
    assert sorted(p.name for p in (output / "images" / "Q" / "dog").iterdir()) == ["p00-seed0.png", "p01-seed0.png"]
