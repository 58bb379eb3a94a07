"""The DreamBench data files match the original listing (google/dreambooth, dataset/prompts_and_classes.txt)."""

from __future__ import annotations

from rlbooth.dreambench import PROMPT_FILES, read_prompts, read_subjects

ORIGINAL = {  # subject_name,class from prompts_and_classes.txt
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal", "berry_bowl": "bowl",
    "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat", "clock": "clock",
    "colorful_sneaker": "sneaker", "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog",
    "dog7": "dog", "dog8": "dog", "duck_toy": "toy", "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal",
    "monster_toy": "toy", "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy",
    "red_cartoon": "cartoon", "robot_toy": "toy", "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase",
    "wolf_plushie": "stuffed animal",
}


def test_thirty_subjects_with_the_original_class_nouns():
    subjects = read_subjects()
    assert len(subjects) == 30
    assert {name: s.class_noun for name, s in subjects.items()} == ORIGINAL


def test_kinds_are_live_for_cats_and_dogs_only():
    subjects = read_subjects()
    assert (subjects["dog"].class_noun, subjects["dog"].kind) == ("dog", "live")
    assert (subjects["cat2"].class_noun, subjects["cat2"].kind) == ("cat", "live")
    assert (subjects["bear_plushie"].class_noun, subjects["bear_plushie"].kind) == ("stuffed animal", "object")
    assert subjects["red_cartoon"].kind == "object"
    live = {name for name, s in subjects.items() if s.kind == "live"}
    assert live == {name for name, noun in ORIGINAL.items() if noun in ("cat", "dog")}
    assert len(live) == 9
    assert {s.kind for s in subjects.values()} == {"live", "object"}


def test_twenty_five_prompts_each_with_identifier_and_class():
    for kind in PROMPT_FILES:
        prompts = read_prompts(kind)
        assert len(prompts) == 25 == len(set(prompts))
        assert all("{identifier}" in p and "{class_noun}" in p for p in prompts)
    assert read_prompts("object")[0] == "a {identifier} {class_noun} in the jungle"
    assert "a {identifier} {class_noun} wearing a red hat" in read_prompts("live")
    assert read_prompts("live") != read_prompts("object")
