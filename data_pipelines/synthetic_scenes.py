"""Procedural scenes of coloured shapes, with the text that describes them.

Everything a caption or an answer says is a fact of the rendered image: the colour, shape
and size of each object, how many there are and which cell of a 3x3 grid each occupies.
A model that reads the image can therefore answer the questions, which the demo checks.
Scenes are deterministic functions of `numpy.random.Generator` draws, so a dataset built
from a seed is reproducible item by item.
"""

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {  # name -> RGB, all far from the background and from each other
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 235),
    "yellow": (245, 225, 30),
    "purple": (150, 50, 200),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "cyan": (30, 215, 225),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
BACKGROUND = (60, 60, 60)
MOTIONS = {  # caption phrase -> unit (dx, dy) in image coordinates (y grows downward)
    "moving to the right": (1, 0),
    "moving to the left": (-1, 0),
    "moving up": (0, -1),
    "moving down": (0, 1),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
_RADIUS = {"small": 0.22, "large": 0.42}  # fraction of a grid cell


@dataclasses.dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    row: int  # 0..2, index into ROWS
    col: int  # 0..2, index into COLUMNS

    @property
    def position(self) -> str:
        """'top left', 'middle right', ..., 'centre' for the middle cell."""
        if self.row == 1 and self.col == 1:
            return "centre"
        if self.col == 1:
            return ROWS[self.row]
        if self.row == 1:
            return COLUMNS[self.col]
        return f"{ROWS[self.row]} {COLUMNS[self.col]}"

    def phrase(self) -> str:
        where = {"centre": "in the centre", "left": "on the left", "right": "on the right"}.get(
            self.position, f"at the {self.position}")
        return f"a {self.size} {self.colour} {self.shape} {where}"


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]


def random_scene(rng: np.random.Generator, max_shapes: int = 3) -> Scene:
    """1..max_shapes shapes in distinct grid cells."""
    n = int(rng.integers(1, max_shapes + 1))
    cells = rng.choice(9, size=n, replace=False)
    colours = list(COLOURS)
    shapes = []
    for cell in cells:
        shapes.append(
            Shape(
                colour=colours[int(rng.integers(len(colours)))],
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                size=SIZES[int(rng.integers(len(SIZES)))],
                row=int(cell) // 3,
                col=int(cell) % 3,
            )
        )
    return Scene(tuple(shapes))


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, rgb):
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=rgb)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
    else:
        raise ValueError(f"Unknown shape {kind!r}; expected one of {SHAPES}.")


def cell_centre(shape: Shape, width: int, height: int) -> tuple[float, float]:
    return ((shape.col + 0.5) * width / 3, (shape.row + 0.5) * height / 3)


def render_scene(scene: Scene, width: int, height: int | None = None) -> np.ndarray:
    """Renders the scene; returns uint8 [height, width, 3]."""
    height = width if height is None else height
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = min(width, height) / 3
    for s in scene.shapes:
        cx, cy = cell_centre(s, width, height)
        _draw_shape(draw, s.shape, cx, cy, _RADIUS[s.size] * cell, COLOURS[s.colour])
    return np.asarray(image)


def caption(scene: Scene) -> str:
    """'a large red circle at the top left.' or 'two shapes: a ... and a ....'"""
    phrases = [s.phrase() for s in scene.shapes]
    if len(phrases) == 1:
        return phrases[0] + "."
    listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{NUMBER_WORDS[len(phrases)]} shapes: {listed}."


def questions_answers(scene: Scene) -> list[tuple[str, str]]:
    """Questions whose answers are read off the image: colour, shape, count, position."""
    qa = [("How many shapes are there?", NUMBER_WORDS[len(scene.shapes)])]
    if len(scene.shapes) == 1:
        s = scene.shapes[0]
        qa.append(("What colour is the shape?", s.colour))
    kinds = [s.shape for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    for s in scene.shapes:
        if kinds.count(s.shape) == 1:
            qa.append((f"What colour is the {s.shape}?", s.colour))
        if colours.count(s.colour) == 1:
            qa.append((f"What shape is the {s.colour} object?", s.shape))
        if kinds.count(s.shape) == 1 and colours.count(s.colour) == 1:
            qa.append((f"Where is the {s.colour} {s.shape}?", s.position))
    return qa


@dataclasses.dataclass(frozen=True)
class Clip:
    shape: Shape  # row/col give the start cell; the motion moves it across the frame
    motion: str   # a key of MOTIONS


def random_clip(rng: np.random.Generator) -> Clip:
    motion = list(MOTIONS)[int(rng.integers(len(MOTIONS)))]
    dx, dy = MOTIONS[motion]
    # Start on the side the shape moves away from; the other coordinate is random.
    col = 0 if dx > 0 else 2 if dx < 0 else int(rng.integers(3))
    row = 0 if dy > 0 else 2 if dy < 0 else int(rng.integers(3))
    shape = Shape(
        colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        size="small",
        row=row,
        col=col,
    )
    return Clip(shape, motion)


def render_clip(clip: Clip, num_frames: int, size: int) -> np.ndarray:
    """Renders the moving shape; returns uint8 [num_frames, size, size, 3]."""
    dx, dy = MOTIONS[clip.motion]
    cell = size / 3
    x0, y0 = cell_centre(clip.shape, size, size)
    travel = 2 * cell  # from one outer cell centre to the opposite one
    frames = []
    for t in range(num_frames):
        frac = t / max(num_frames - 1, 1)
        image = Image.new("RGB", (size, size), BACKGROUND)
        _draw_shape(
            ImageDraw.Draw(image), clip.shape.shape, x0 + dx * travel * frac,
            y0 + dy * travel * frac, _RADIUS["small"] * cell, COLOURS[clip.shape.colour],
        )
        frames.append(np.asarray(image))
    return np.stack(frames)


def clip_caption(clip: Clip) -> str:
    return f"a {clip.shape.colour} {clip.shape.shape} {clip.motion}."


_INTROS = (
    "Here are some pictures of shapes.",
    "I drew a few shapes today.",
    "This page collects my favourite drawings.",
    "Look at these pictures.",
)
_LEADS = ("This picture shows", "Here we see", "The next image has", "In this one we see")
_FILLERS = (
    "The background is dark grey.",
    "I like this one.",
    "It took a minute to draw.",
    "The shapes do not overlap.",
)
_OUTROS = ("That is all for today.", "Thanks for looking.", "More pictures soon.")


def document_text(rng: np.random.Generator, scenes: Sequence[Scene]) -> tuple[list[str], list[int]]:
    """Interleaved text for `scenes`, MMC4-style.

    Returns (text_list, matched_text_index): image i is placed right before text chunk
    matched_text_index[i], which describes it (so the text after an image is about it).
    """
    texts = []
    if rng.random() < 0.5:
        texts.append(_INTROS[int(rng.integers(len(_INTROS)))])
    matched = []
    for scene in scenes:
        matched.append(len(texts))
        lead = _LEADS[int(rng.integers(len(_LEADS)))]
        texts.append(f"{lead} {caption(scene)}")
        if rng.random() < 0.4:
            texts.append(_FILLERS[int(rng.integers(len(_FILLERS)))])
    if rng.random() < 0.5:
        texts.append(_OUTROS[int(rng.integers(len(_OUTROS)))])
    return texts, matched


def vocabulary_sentences() -> list[str]:
    """Sentences covering every word the generators and the evaluation prompts use."""
    out = list(_INTROS + _LEADS + _FILLERS + _OUTROS)
    out.append("Output: Question: Answer:")
    for colour in COLOURS:
        for kind in SHAPES:
            for size in SIZES:
                for cell in range(9):
                    out.append(Shape(colour, kind, size, cell // 3, cell % 3).phrase() + ".")
            for motion in MOTIONS:
                out.append(f"a {colour} {kind} {motion}.")
    out.extend(f"{w} shapes" for w in NUMBER_WORDS)
    return out
