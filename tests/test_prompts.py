"""Prompt sets: reading and checking files, expanding with and without the identifier, the shipped sets, sampling."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlbooth.prompts import (
    DREAMBENCH_DIR,
    PROMPT_DIR,
    Prompt,
    PromptFileError,
    PromptSampler,
    default_prompt_set,
    dreambench_prompt_set,
    expand,
    heldout_prompt_set,
    read_prompt_file,
    resolve_prompt_file,
)
from rlbooth.subject import Subject

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(PROMPT_DIR.glob("*.txt")) + sorted(DREAMBENCH_DIR.glob("*.txt"))
TRAINING = ["live", "object", "dreambench-train-live", "dreambench-train-object"]
HELDOUT = ["heldout-live", "heldout-object"]
DREAMBENCH = ["dreambench/prompts-object", "dreambench/prompts-live"]
TOY = Subject(images=Path("photos"), class_noun="plushie", description="triangular")
PLAIN = Subject(images=Path("photos"), class_noun="dog", kind="live")


def write(tmp_path: Path, text: str, name: str = "set.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def texts(name: str, subject: Subject = PLAIN) -> set[str]:
    return {p.text for p in expand(read_prompt_file(name), subject)}


# --------------------------------------------------------------------------- expansion


@pytest.mark.parametrize("template, subject, with_id, without_id", [
    # without the identifier the description stays: only the rare word goes (Subject.prompt)
    ("a {identifier} {description} {class_noun} playing", TOY, "a sks triangular plushie playing",
     "a triangular plushie playing"),
    # an empty description leaves no double space
    ("a {identifier} {description} {class_noun} playing", PLAIN, "a sks dog playing", "a dog playing"),
    ("  a {identifier}   {description} {class_noun}  ", PLAIN, "a sks dog", "a dog"),
    # DreamBench's templates have no description: it is dropped, as in the benchmark
    ("a {identifier} {class_noun} in the jungle", TOY, "a sks plushie in the jungle", "a plushie in the jungle"),
    ("a red {identifier} {class_noun}", PLAIN, "a red sks dog", "a red dog"),
    ("{class_noun} of {identifier}", PLAIN, "dog of sks", "dog of"),
])
def test_expand_with_and_without_identifier(template, subject, with_id, without_id):
    assert expand([template], subject) == [Prompt(with_id, True, template), Prompt(without_id, False, template)]
    assert subject.prompt(template) == with_id
    assert subject.prompt(template, with_identifier=False) == without_id


def test_expand_two_per_template_in_order():
    templates = read_prompt_file("live")
    prompts = expand(templates, TOY)
    assert len(prompts) == 2 * len(templates)
    assert [p.template for p in prompts] == [t for t in templates for _ in range(2)]
    assert [p.with_identifier for p in prompts] == [True, False] * len(templates)
    assert all(("sks" in p.text.split()) == p.with_identifier for p in prompts)
    assert all("triangular plushie" in p.text for p in prompts)
    assert expand([], TOY) == []


# --------------------------------------------------------------------------- shipped sets


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_file_parses_without_duplicates(path: Path):
    templates = read_prompt_file(path)
    assert len(templates) == len(set(templates)), "duplicate template"
    for subject in (TOY, PLAIN):
        with_id = [p.text for p in expand(templates, subject) if p.with_identifier]
        assert len(with_id) == len(set(with_id)), "two templates expand alike"
        assert all("  " not in text and "{" not in text for text in with_id)


@pytest.mark.parametrize("path", sorted(PROMPT_DIR.glob("*.txt")), ids=lambda p: p.name)
def test_prompt_sets_keep_identifier_description_class_together(path: Path):
    for template in read_prompt_file(path):
        assert "{identifier} {description} {class_noun}" in template, template


@pytest.mark.parametrize("name, low, high", [
    ("live", 15, 30), ("object", 15, 30), ("dreambench-train-live", 15, 30), ("dreambench-train-object", 15, 30),
    ("heldout-live", 6, 12), ("heldout-object", 6, 12),
])
def test_shipped_set_sizes(name: str, low: int, high: int):
    assert low <= len(read_prompt_file(name)) <= high


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("other", HELDOUT + DREAMBENCH)
def test_training_sets_disjoint_from_evaluation(training: str, other: str):
    # an empty description makes `a {identifier} {description} {class_noun} X` and DreamBench's
    # `a {identifier} {class_noun} X` expand alike, so an overlap shows up in the text
    assert not texts(training) & texts(other)
    assert not texts(training, TOY) & texts(other, TOY)


def context(template: str) -> str:
    """The words of a template other than its placeholders and articles."""
    words = re.sub(r"\{\w+\}", " ", template).lower().split()
    return " ".join(w for w in words if w not in {"a", "an", "the"})


# DreamBench's backgrounds, surfaces, outfits and properties, which no training prompt may reuse
DREAMBENCH_CONCEPTS = [
    "jungle", "snow", "beach", "cobblestone", "fabric", "floor", "city", "mountain", "house", "rug", "forest",
    "wheat", "autumn", "leaves", "eiffel", "water", "ocean", "milk", "grass", "sunflowers?", "mirror",
    "sidewalk", "street", "dirt road", "hat", "santa", "rainbow", "scarf", "monocle", "chef", "firefighter",
    "police", "glasses", "shirt", "wizard", "red", "purple", "shiny", "wet", "cube",
]


@pytest.mark.parametrize("name", TRAINING)
def test_training_sets_avoid_dreambench_concepts(name: str):
    dreambench = {context(t) for d in DREAMBENCH for t in read_prompt_file(d)}
    for template in read_prompt_file(name):
        assert context(template) not in dreambench, template
        for concept in DREAMBENCH_CONCEPTS:
            assert not re.search(rf"\b{concept}\b", context(template)), (template, concept)


@pytest.mark.parametrize("held", HELDOUT)
def test_heldout_sets_avoid_training_and_dreambench_concepts(held: str):
    seen = {context(t) for name in TRAINING + DREAMBENCH for t in read_prompt_file(name)}
    for template in read_prompt_file(held):
        assert context(template) not in seen, template
        for concept in DREAMBENCH_CONCEPTS:
            assert not re.search(rf"\b{concept}\b", context(template)), (template, concept)


@pytest.mark.parametrize("name, line", [
    ("dreambench/prompts-object", "a {identifier} {class_noun} in the jungle"),
    ("dreambench/prompts-object", "a {identifier} {class_noun} floating in an ocean of milk"),
    ("dreambench/prompts-object", "a {identifier} {class_noun} with the Eiffel Tower in the background"),
    ("dreambench/prompts-object", "a cube shaped {identifier} {class_noun}"),
    ("dreambench/prompts-live", "a {identifier} {class_noun} in the jungle"),
    ("dreambench/prompts-live", "a {identifier} {class_noun} in a chef outfit"),
    ("dreambench/prompts-live", "a {identifier} {class_noun} wearing a black top hat and a monocle"),
    ("dreambench/prompts-live", "a wet {identifier} {class_noun}"),
])
def test_dreambench_spot_checks(name: str, line: str):
    assert line in read_prompt_file(name)


@pytest.mark.parametrize("name", DREAMBENCH)
def test_dreambench_files(name: str):
    templates = read_prompt_file(name)
    assert len(templates) == 25 == len(set(templates))
    assert all("{identifier} {class_noun}" in t and "{description}" not in t for t in templates)
    # the original listing: 10 shared recontextualizations first, 5 shared property changes last
    assert templates[0] == "a {identifier} {class_noun} in the jungle"
    assert templates[9] == "a {identifier} {class_noun} on top of a purple rug in a forest"
    assert templates[20:] == [f"a {p} {{identifier}} {{class_noun}}"
                              for p in ("red", "purple", "shiny", "wet", "cube shaped")]
    header = resolve_prompt_file(name).read_text()
    assert "CC BY 4.0" in header and "google/dreambooth" in header


def test_dreambench_object_and_live_share_exactly_fifteen():
    obj, live = (read_prompt_file(n) for n in DREAMBENCH)
    assert obj[:10] == live[:10] and obj[20:] == live[20:]
    assert not set(obj[10:20]) & set(live[10:20])


@pytest.mark.parametrize("kind, default, heldout, dreambench", [
    ("object", "object", "heldout-object", "dreambench/prompts-object"),
    ("live", "live", "heldout-live", "dreambench/prompts-live"),
    ("face", "live", "heldout-live", "dreambench/prompts-live"),
])
def test_sets_by_kind(kind, default, heldout, dreambench):
    subject = Subject(images=Path("photos"), class_noun="x", kind=kind)
    assert (default_prompt_set(subject), heldout_prompt_set(subject), dreambench_prompt_set(subject)) == (
        default, heldout, dreambench)
    for name in (default, heldout, dreambench):
        assert read_prompt_file(name)


@pytest.mark.parametrize("name, expected", [
    ("live", PROMPT_DIR / "live.txt"),
    ("heldout-object.txt", PROMPT_DIR / "heldout-object.txt"),
    ("dreambench/prompts-live", DREAMBENCH_DIR / "prompts-live.txt"),
    ("dreambench/prompts-object.txt", DREAMBENCH_DIR / "prompts-object.txt"),
])
def test_resolve_from_any_directory(tmp_path: Path, monkeypatch, name: str, expected: Path):
    monkeypatch.chdir(tmp_path)
    assert resolve_prompt_file(name) == expected


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("text, line, message", [
    ("a {identifier} {class_noun}\na {identifier} {subjct} {class_noun}\n", 2, "subjct"),
    ("# fine\n\na {identifier} {description} dog\n", 3, "class_noun"),
    ("a {identifier} {class_noun}\na {identifier {class_noun}\n", 2, "{"),
    ("a {identifier} {class_noun} }\n", 1, "}"),
    ("a {0} {1}\n", 1, "placeholder"),
    ("a {} {class_noun}\n", 1, "placeholder"),
])
def test_bad_line_names_file_and_line(tmp_path: Path, text: str, line: int, message: str):
    path = write(tmp_path, text)
    with pytest.raises(PromptFileError) as err:
        read_prompt_file(path)
    assert f"{path}:{line}:" in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # and another\n\n", "#{subjct}\n"])
def test_file_without_prompts(tmp_path: Path, text: str):
    path = write(tmp_path, text)
    with pytest.raises(PromptFileError, match="no prompts") as err:
        read_prompt_file(path)
    assert str(path) in str(err.value)


def test_missing_file_names_it_and_known_sets(tmp_path: Path):
    with pytest.raises(PromptFileError) as err:
        read_prompt_file(tmp_path / "nope.txt")
    assert "nope.txt" in str(err.value)
    assert "heldout-live" in str(err.value) and "dreambench/prompts-live" in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("a {identifier} {class_noun} # swimming {subjct}\n", ["a {identifier} {class_noun}"]),
    ("  a {identifier} {class_noun}  \n#a {identifier} {class_noun} x\n", ["a {identifier} {class_noun}"]),
    ("a {class_noun}#\nb {class_noun}\n", ["a {class_noun}", "b {class_noun}"]),
])
def test_hash_starts_a_comment(tmp_path: Path, text: str, expected: list[str]):
    assert read_prompt_file(write(tmp_path, text)) == expected


# --------------------------------------------------------------------------- sampling


TEMPLATES = read_prompt_file("live")


@pytest.mark.parametrize("seed, epoch, index", [(0, 0, 0), (1, 3, 17), (12345, 99, 4095)])
def test_sampler_deterministic_and_order_free(seed: int, epoch: int, index: int):
    a = PromptSampler(TEMPLATES, TOY, 0.5, seed)
    b = PromptSampler(TEMPLATES, TOY, 0.5, seed)
    first = a(epoch, index)
    for i in range(20):  # other draws in between change nothing
        b(epoch + 1, i)
        a(epoch, index + i + 1)
    assert b(epoch, index) == first == a(epoch, index)
    assert first.text == TOY.prompt(first.template, first.with_identifier)


def test_sampler_depends_on_seed_epoch_index():
    draws = {key: PromptSampler(TEMPLATES, TOY, 0.5, key[0])(key[1], key[2]) for key in
             [(s, e, i) for s in range(3) for e in range(3) for i in range(6)]}
    assert len({(p.template, p.with_identifier) for p in draws.values()}) > 15
    forward = [PromptSampler(TEMPLATES, TOY, 0.5, 7)(0, i) for i in range(64)]
    backward = [PromptSampler(TEMPLATES, TOY, 0.5, 7)(0, i) for i in reversed(range(64))][::-1]
    assert forward == backward
    assert forward != [PromptSampler(TEMPLATES, TOY, 0.5, 8)(0, i) for i in range(64)]
    assert len({p.template for p in forward}) > len(TEMPLATES) // 2


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_sampler_ratio_exact_at_ends(ratio: float):
    sampler = PromptSampler(TEMPLATES, TOY, ratio, 0)
    draws = [sampler(e, i) for e in range(4) for i in range(250)]
    assert all(p.with_identifier is bool(ratio) for p in draws)
    assert all(("sks" in p.text.split()) is bool(ratio) for p in draws)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.8])
def test_sampler_ratio_close(ratio: float):
    sampler = PromptSampler(TEMPLATES, PLAIN, ratio, 3)
    share = sum(sampler(i // 100, i % 100).with_identifier for i in range(2000)) / 2000
    assert abs(share - ratio) < 0.04


@pytest.mark.parametrize("templates, ratio", [([], 0.5), (TEMPLATES, -0.1), (TEMPLATES, 1.5)])
def test_sampler_rejects_bad_arguments(templates, ratio):
    with pytest.raises(ValueError):
        PromptSampler(templates, TOY, ratio, 0)


# --------------------------------------------------------------------------- example subject specs


@pytest.mark.parametrize("name, kind, class_noun, prompt_set", [
    ("person", "face", "man", "live"),
    ("pet", "live", "dog", "live"),
    ("object", "object", "backpack", "object"),
])
def test_example_specs_load(name: str, kind: str, class_noun: str, prompt_set: str):
    path = REPO / "examples" / f"{name}.yaml"
    head = path.read_text().split("\n")[:3]
    assert all(line.startswith("#") for line in head) and "`photos/`" in " ".join(head)
    subject = Subject.from_yaml(path)
    assert (subject.name, subject.kind, subject.class_noun, subject.identifier, subject.description) == (
        name, kind, class_noun, "sks", "")
    assert subject.images == (REPO / "examples" / "photos").resolve()
    assert default_prompt_set(subject) == prompt_set
    with_id, without_id = expand(["a {identifier} {description} {class_noun} playing"], subject)
    assert (with_id.text, without_id.text) == (f"a sks {class_noun} playing", f"a {class_noun} playing")
