"""The toy world's renderer, caption grammar, tokenizer and shipped subject photos."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from rlbooth.prompts import read_prompt_file
from rlbooth.subject import Subject
from rlbooth.toyworld import world
from rlbooth.toyworld.experiment import EXAMPLE_SUBJECT
from rlbooth.toyworld.model import IDENTIFIERS, MAX_TOKENS, toy_tokenizer
from tests.conftest import REPO


@pytest.mark.parametrize("scene", list(world.SCENES))
@pytest.mark.parametrize("shape", world.SHAPES)
def test_render_puts_the_scene_in_the_strips_and_the_object_over_the_centre(scene: str, shape: str) -> None:
    sky, ground = world.SCENES[scene]
    for seed in range(10):
        image = world.render(shape, "red", scene, random.Random(seed))
        assert image.shape == (world.SIZE, world.SIZE, 3) and image.dtype == np.uint8
        assert (image[:world.STRIP] == sky).all() and (image[-world.STRIP:] == ground).all()
        centre = image[world.CENTRE, world.CENTRE].reshape(-1, 3)
        red = (centre == world.COLOURS["red"]).all(axis=1).mean()
        assert red >= {"square": 1.0, "circle": 0.8, "triangle": 0.3}[shape]


def test_subject_is_painted_in_its_two_colours_only() -> None:
    image = world.render_subject("in a studio", random.Random(0))
    centre = {tuple(p) for p in image[world.CENTRE, world.CENTRE].reshape(-1, 3)}
    assert centre == set(world.SUBJECT_COLOURS)
    assert not set(world.SUBJECT_COLOURS) & set(world.COLOURS.values())


def test_captions_read_as_the_grammar_says() -> None:
    assert world.Caption("square", "red", "on the beach").text() == "a red square on the beach"
    assert world.Caption("circle").text() == "a circle"
    assert world.parse_scene("a sks square in a pink room") == "in a pink room"
    assert world.parse_scene("A Square On The Moon") == "on the moon"
    assert world.parse_scene("a square") is None
    # other wordings name a scene by its noun, which no other scene uses
    assert len(world.SCENE_NOUNS) == len(world.SCENES)
    assert world.parse_scene("a sks square at the beach") == "on the beach"
    assert world.parse_scene("a sks square in the grass") == "on the grass"
    assert world.parse_scene("a sks square in the night") == "at night"


def test_toy_prompt_sets_hold_out_wordings_and_scenes() -> None:
    """Held-out prompts word stage two's scenes otherwise; unseen ones name scenes no training image shows."""
    subject = Subject.from_yaml(EXAMPLE_SUBJECT)
    texts = {name: [subject.prompt(t) for t in read_prompt_file(f"toyworld-{name}")]
             for name in ("train", "heldout", "unseen")}
    scenes = {name: {world.parse_scene(t) for t in prompts} for name, prompts in texts.items()}
    assert not set(texts["heldout"]) & set(texts["train"])
    assert not any(phrase in p for p in texts["heldout"] for phrase in world.SCENES)  # no caption words it so
    assert scenes["heldout"] == scenes["train"] and None not in scenes["train"]
    assert not scenes["unseen"] & (scenes["train"] | set(world.SUBJECT_SCENES))
    for prompt in (p for prompts in texts.values() for p in prompts):  # words the base model has read
        assert set(prompt.split()) <= set(world.WORDS) | set(IDENTIFIERS), prompt


def test_pretraining_captions_never_show_a_heldout_composition() -> None:
    rng = random.Random(0)
    heldout = {(c.colour, c.shape, c.scene) for c in world.heldout_captions()}
    assert len(heldout) == 25
    seen = {(c.colour, c.shape, c.scene) for c in (world.sample_caption(rng, 1, 1) for _ in range(5000))}
    assert not seen & heldout
    assert len(seen) == 6 * 3 * 10 - 25  # every other composition is drawn


def test_every_world_word_is_one_token_and_other_words_still_tokenize() -> None:
    tokenizer = toy_tokenizer()
    for word in (*world.WORDS, *IDENTIFIERS):
        assert len(tokenizer.tokenize(word)) == 1, word
    assert tokenizer.tokenize("a zwx square") == ["a</w>", "z", "w", "x</w>", "square</w>"]
    ids = tokenizer("a sks square on the beach", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == MAX_TOKENS and ids[0] == tokenizer.bos_token_id and ids[7] == tokenizer.eos_token_id


def test_tokenizer_survives_a_save_and_load(tmp_path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = toy_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a sks square under the sea, zwx"
    assert loaded(text).input_ids == tokenizer(text).input_ids


def test_shipped_photos_are_the_renderers() -> None:
    folder = REPO / "examples" / "toyworld" / "photos"
    shipped = [np.asarray(Image.open(folder / f"{i}.png").convert("RGB")) for i in range(5)]
    assert sorted(p.name for p in folder.iterdir()) == [f"{i}.png" for i in range(5)]
    for photo, rendered in zip(shipped, world.subject_photos()):
        assert (photo == rendered).all()
