"""The subject spec: reading it, checking it, and filling prompt templates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rlbooth.subject import Subject, SubjectError, format_prompt

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny"


def spec(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- from_yaml


def test_example_spec():
    subject = Subject.from_yaml(EXAMPLE / "subject.yaml")
    assert subject.images == (EXAMPLE / "photos").resolve()
    assert subject.images.is_dir()
    assert (subject.name, subject.class_noun, subject.identifier, subject.description, subject.kind) == (
        "tiny-toy", "toy", "sks", "triangular", "object")
    assert subject.prompt("a {identifier} {description} {class_noun}") == "a sks triangular toy"


@pytest.mark.parametrize("images, expected", [
    ("photos", "specs/photos"),
    ("../photos", "photos"),
    ("./a/../b", "specs/b"),
])
def test_images_relative_to_spec_not_cwd(tmp_path: Path, monkeypatch, images: str, expected: str):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = spec(tmp_path / "specs" / "subject.yaml", f"images: {images}\nclass_noun: dog\n")
    subject = Subject.from_yaml(path)
    assert subject.images == (tmp_path / expected).resolve()
    assert subject.images.is_absolute()


def test_absolute_images_kept(tmp_path: Path):
    photos = tmp_path / "abs" / "photos"
    subject = Subject.from_yaml(spec(tmp_path / "s" / "subject.yaml", f"images: {photos}\nclass_noun: dog\n"))
    assert subject.images == photos.resolve()


def test_relative_spec_path(tmp_path: Path, monkeypatch):
    spec(tmp_path / "dir" / "subject.yaml", "images: photos\nclass_noun: dog\n")
    monkeypatch.chdir(tmp_path)
    assert Subject.from_yaml("dir/subject.yaml").images == (tmp_path / "dir" / "photos").resolve()


def test_defaults(tmp_path: Path):
    subject = Subject.from_yaml(spec(tmp_path / "s.yaml", "images: my_dog\nclass_noun: dog\ndescription: null\n"))
    assert subject.identifier == "sks"
    assert subject.description == ""
    assert subject.kind == "object"
    assert subject.name == "my_dog"  # the images folder's name


@pytest.mark.parametrize("text, key", [
    ("class_noun: dog\n", "images"),
    ("images: photos\n", "class_noun"),
    ("images: photos\nclass_noun: ''\n", "class_noun"),
    ("images: photos\nclass_noun: null\n", "class_noun"),
    ("images: ''\nclass_noun: dog\n", "images"),
    ("", "images"),
])
def test_missing_required_key(tmp_path: Path, text: str, key: str):
    path = spec(tmp_path / "subject.yaml", text)
    with pytest.raises(SubjectError) as err:
        Subject.from_yaml(path)
    assert f"`{key}`" in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("extra, named", [
    ("clas_noun: dog\n", "clas_noun"),
    ("identifer: xyz\n", "identifer"),
    ("photos: x\n", "photos"),
])
def test_unknown_key(tmp_path: Path, extra: str, named: str):
    path = spec(tmp_path / "subject.yaml", "images: photos\nclass_noun: dog\n" + extra)
    with pytest.raises(SubjectError) as err:
        Subject.from_yaml(path)
    message = str(err.value)
    assert named in message and "unknown" in message
    assert "identifier" in message  # lists the known keys


@pytest.mark.parametrize("field_yaml, field", [
    ("kind: animal", "subject.kind"),
    ("kind: Face", "subject.kind"),
    ("identifier: sks dog", "subject.identifier"),
    ("identifier: \"sks\\tdog\"", "subject.identifier"),
    ("identifier: ' sks'", "subject.identifier"),
    ("class_noun: '   '", "subject.class_noun"),
])
def test_bad_field_named(tmp_path: Path, field_yaml: str, field: str):
    text = "images: photos\nclass_noun: dog\n" if not field_yaml.startswith("class_noun") else "images: photos\n"
    path = spec(tmp_path / "subject.yaml", text + field_yaml + "\n")
    with pytest.raises(SubjectError, match=f"^{field}:"):
        Subject.from_yaml(path)


@pytest.mark.parametrize("kind", ["face", "live", "object"])
def test_every_kind_accepted(kind: str):
    assert Subject(images=Path("x"), class_noun="dog", kind=kind).kind == kind


def test_spec_not_found(tmp_path: Path):
    with pytest.raises(SubjectError, match="not found") as err:
        Subject.from_yaml(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err.value)


def test_spec_is_a_folder(tmp_path: Path):
    with pytest.raises(SubjectError, match="is a folder, not a file"):
        Subject.from_yaml(tmp_path)


@pytest.mark.parametrize("text", ["- images\n- class_noun\n", "just words\n"])
def test_spec_not_a_mapping(tmp_path: Path, text: str):
    with pytest.raises(SubjectError, match="mapping"):
        Subject.from_yaml(spec(tmp_path / "subject.yaml", text))


def test_invalid_yaml_is_subject_error(tmp_path: Path):
    path = spec(tmp_path / "subject.yaml", "images: photos\nclass_noun: [dog\n")
    with pytest.raises(SubjectError, match="subject.yaml"):
        Subject.from_yaml(path)


@pytest.mark.parametrize("field_yaml, field", [
    ("class_noun: 3", "class_noun"),
    ("identifier: 123", "identifier"),
    ("kind: 5", "kind"),
    ("description: [a, b]", "description"),
    ("images: [a]", "images"),
])
def test_wrong_type_is_subject_error(tmp_path: Path, field_yaml: str, field: str):
    base = ("" if field == "images" else "images: photos\n") + ("" if field == "class_noun" else "class_noun: dog\n")
    with pytest.raises(SubjectError, match=field):
        Subject.from_yaml(spec(tmp_path / "subject.yaml", base + field_yaml + "\n"))


def test_wrong_type_in_constructor_is_subject_error(tmp_path: Path):
    with pytest.raises(SubjectError, match="class_noun"):
        Subject(images=tmp_path, class_noun=3)  # type: ignore[arg-type]


def test_home_in_images_expanded(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    subject = Subject.from_yaml(spec(tmp_path / "s" / "subject.yaml", "images: ~/photos\nclass_noun: dog\n"))
    assert subject.images == (tmp_path / "home" / "photos").resolve()


def test_to_dict_round_trip(tmp_path: Path):
    subject = Subject(images=tmp_path / "p", class_noun="dog", identifier="zwx", description="fluffy", kind="live",
                      name="rex")
    data = subject.to_dict()
    assert data == {"images": str(tmp_path / "p"), "class_noun": "dog", "identifier": "zwx",
                    "description": "fluffy", "kind": "live", "name": "rex"}
    assert Subject(**data) == subject


def test_frozen_and_replace_rechecks(tmp_path: Path):
    subject = Subject(images=str(tmp_path), class_noun="dog")
    assert isinstance(subject.images, Path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        subject.class_noun = "cat"  # type: ignore[misc]
    with pytest.raises(SubjectError, match="subject.identifier"):
        dataclasses.replace(subject, identifier="two words")


# --------------------------------------------------------------------------- prompts


DEFAULT = "a {identifier} {description} {class_noun}"


@pytest.mark.parametrize("identifier, description, class_noun, template, with_identifier, expected", [
    ("sks", "", "dog", DEFAULT, True, "a sks dog"),
    ("sks", "", "dog", DEFAULT, False, "a dog"),
    ("sks", "triangular", "toy", DEFAULT, True, "a sks triangular toy"),
    ("sks", "triangular", "toy", DEFAULT, False, "a triangular toy"),
    ("zwx", "", "backpack", "{identifier} {description} {class_noun} on the beach", False, "backpack on the beach"),
    ("zwx", "", "backpack", "  photo of   {identifier}  {class_noun}  ", True, "photo of zwx backpack"),
    ("sks", "red", "car", "a {class_noun}", True, "a car"),
    ("sks", "", "dog", "{identifier}\n{description}\t{class_noun}", True, "sks dog"),
    ("sks", "", "dog", "no placeholders", True, "no placeholders"),
    ("sks", "", "dog", "{{literal}} {class_noun}", True, "{literal} dog"),
])
def test_prompt(identifier, description, class_noun, template, with_identifier, expected):
    subject = Subject(images=Path("x"), class_noun=class_noun, identifier=identifier, description=description)
    assert subject.prompt(template, with_identifier=with_identifier) == expected


@pytest.mark.parametrize("template, named", [
    ("a {identifer} {class_noun}", "identifer"),
    ("a {subject}", "subject"),
    ("a {class_noun} {} thing", "''"),
    ("a {0}", "'0'"),
    ("a {class_noun.upper}", "class_noun.upper"),
])
def test_unknown_placeholder_named(template: str, named: str):
    subject = Subject(images=Path("x"), class_noun="dog")
    with pytest.raises(SubjectError) as err:
        subject.prompt(template)
    message = str(err.value)
    assert named in message
    assert "class_noun" in message.split("use")[-1]  # lists the valid placeholders


def test_format_prompt_direct():
    assert format_prompt(DEFAULT, identifier="", description="", class_noun="cat") == "a cat"
