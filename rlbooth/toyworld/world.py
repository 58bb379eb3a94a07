"""The toy world: 32 px scenes of one coloured shape, drawn exactly from a caption.

A caption is `a [<colour>] <shape> [<scene>]`: a shape of one of three classes in one of six
colours, centred (with a little jitter) on a two-tone background that the scene names (sky over
ground). Because the renderer is exact, every caption's truth is known, and rewards can read an
image back: the background strips say which scene it shows, the centre says what the object is.

The subject that stage one learns is a shape the world has never drawn: a square in quarters of two
colours no object ever has. Its photos show it in two scenes only, so DreamBooth overfits to them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

SIZE = 32
"""Image side in pixels."""
HORIZON = 20
"""First row of the ground; rows above it are the sky."""
STRIP = 4
"""Rows at the top and bottom that the object never reaches: the background read back by the rewards."""
CENTRE = slice(11, 21)
"""Rows and columns of the centre crop that every object covers: the object read back by the rewards."""

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (40, 70, 230),
    "yellow": (245, 225, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (140, 40, 180),
}
SCENES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    # phrase: (sky, ground)
    "on the beach": ((110, 180, 240), (235, 215, 150)),
    "in the snow": ((190, 200, 215), (250, 250, 250)),
    "at night": ((15, 20, 60), (45, 45, 55)),
    "in the forest": ((20, 90, 30), (100, 65, 30)),
    "in the desert": ((245, 165, 80), (200, 120, 60)),
    "under the sea": ((20, 90, 170), (10, 40, 100)),
    "on the grass": ((160, 210, 245), (60, 170, 60)),
    "in a studio": ((150, 150, 150), (110, 110, 110)),
    "on the moon": ((0, 0, 0), (170, 170, 170)),
    "in a pink room": ((240, 180, 200), (200, 130, 160)),
}
SUBJECT_COLOURS = ((0, 160, 160), (255, 120, 180))
"""The subject's quarters: teal and pink, colours no object of the base world has."""
SUBJECT_SCENES = ("in a studio", "in a pink room")
"""The only scenes the subject's photos show."""
WORDS = ("a", *SHAPES, *COLOURS, *(w for phrase in SCENES for w in phrase.split()))
"""Every word a caption of the world uses (the toy tokenizer gives each one token)."""


@dataclass(frozen=True)
class Caption:
    """What an image shows; None leaves that part to chance when drawing and out of the text."""

    shape: str
    colour: str | None = None
    scene: str | None = None

    def text(self) -> str:
        words = ["a", self.colour, self.shape, self.scene]
        return " ".join(w for w in words if w)


SCENE_NOUNS = {phrase.split()[-1]: phrase for phrase in SCENES}
"""Each scene by its last word, which no other scene uses: other wordings (`at the beach`) name it by that."""


def parse_scene(prompt: str) -> str | None:
    """The scene a prompt names: its phrase (the longest found), else the scene noun among its words, or None.

    Captions always use the phrase; the noun lets prompts word a scene otherwise (`in the grass`), as
    the experiment's held-out prompts do.
    """
    text = prompt.lower()
    found = [phrase for phrase in SCENES if phrase in text]
    if found:
        return max(found, key=len)
    nouns = [SCENE_NOUNS[w] for w in text.replace(",", " ").split() if w in SCENE_NOUNS]
    return nouns[-1] if nouns else None


def render(shape: str, colour: str, scene: str, rng: random.Random, quarters: bool = False) -> np.ndarray:
    """One (32, 32, 3) uint8 image: the scene's background, then the shape in `colour`.

    `quarters` paints the subject's pattern instead: the shape's box split in four, the quarters
    alternating between the two subject colours.
    """
    sky, ground = SCENES[scene]
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:HORIZON], image[HORIZON:] = sky, ground
    side = rng.randint(14, 18)
    top, left = SIZE // 2 - side // 2 + rng.randint(-2, 2), SIZE // 2 - side // 2 + rng.randint(-2, 2)
    mask = shape_mask(shape, top, left, side)
    if quarters:
        rows, cols = np.mgrid[:SIZE, :SIZE]
        odd = ((rows - top) * 2 // side + (cols - left) * 2 // side) % 2 == 1
        image[mask & ~odd], image[mask & odd] = SUBJECT_COLOURS
    else:
        image[mask] = COLOURS[colour]
    return image


def shape_mask(shape: str, top: int, left: int, side: int) -> np.ndarray:
    rows, cols = np.mgrid[:SIZE, :SIZE] + 0.5
    y, x = rows - top, cols - left
    inside = (y >= 0) & (y < side) & (x >= 0) & (x < side)
    if shape == "square":
        return inside
    if shape == "circle":
        return (y - side / 2) ** 2 + (x - side / 2) ** 2 <= (side / 2) ** 2
    if shape == "triangle":  # apex up: the half-width grows from 0 at the top to side/2 at the base
        return inside & (np.abs(x - side / 2) <= y / 2)
    raise ValueError(f"unknown shape {shape!r}; the toy world draws {', '.join(SHAPES)}")


def render_caption(caption: Caption, rng: random.Random) -> np.ndarray:
    """An image of a base-world caption; parts the caption leaves out are drawn at random."""
    colour = caption.colour or rng.choice(list(COLOURS))
    scene = caption.scene or rng.choice(list(SCENES))
    return render(caption.shape, colour, scene, rng)


def render_subject(scene: str, rng: random.Random) -> np.ndarray:
    """A photo of the subject (a square in teal and pink quarters) in a scene."""
    return render("square", "", scene, rng, quarters=True)


def is_heldout(colour: str, shape: str, scene: str) -> bool:
    """Combinations the base model never sees in pretraining; its compositional test set."""
    return (list(COLOURS).index(colour) + SHAPES.index(shape) + list(SCENES).index(scene)) % 7 == 0


def sample_caption(rng: random.Random, p_colour: float = 0.8, p_scene: float = 0.8) -> Caption:
    """A pretraining caption outside the held-out combinations; colour and scene are sometimes left out.

    Leaving words out teaches the model short prompts (`a square`, DreamBooth's class prompt) and lets
    a new word take the colour's place (`a sks square on the beach`).
    """
    while True:
        shape, colour, scene = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SCENES))
        if not is_heldout(colour, shape, scene):
            break
    return Caption(shape, colour if rng.random() < p_colour else None, scene if rng.random() < p_scene else None)


def heldout_captions() -> list[Caption]:
    return [Caption(shape, colour, scene) for colour in COLOURS for shape in SHAPES for scene in SCENES
            if is_heldout(colour, shape, scene)]


def subject_photos(seed: int = 0) -> list[np.ndarray]:
    """The subject's five photos as shipped in examples/toyworld/photos: three in a studio, two in a pink room."""
    rng = random.Random(seed)
    return [render_subject(scene, rng) for scene in (SUBJECT_SCENES[0],) * 3 + (SUBJECT_SCENES[1],) * 2]
