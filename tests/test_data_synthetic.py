"""Synthetic data: deterministic, and every caption / answer is true of its image."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import synthetic
from data_pipelines import synthetic_scenes as scenes
from test_data_fixtures import data_world  # noqa: F401  (pytest fixture)


def _colour_at(pixels: np.ndarray, x: float, y: float) -> str | None:
    rgb = tuple(int(v) for v in pixels[int(y), int(x)])
    for name, ref in scenes.COLOURS.items():
        if rgb == ref:
            return name
    return None


@pytest.mark.parametrize("seed", range(40))
def test_rendered_scene_matches_its_description(seed):
    rng = np.random.default_rng(seed)
    scene = scenes.random_scene(rng)
    width, height = (64, 48) if seed % 2 else (64, 64)
    pixels = scenes.render_scene(scene, width, height)
    assert pixels.shape == (height, width, 3) and pixels.dtype == np.uint8
    # The object named at each position has the named colour at its cell centre.
    for shape in scene.shapes:
        assert _colour_at(pixels, *scenes.cell_centre(shape, width, height)) == shape.colour
    # Empty cells are background: the count in the caption is the count in the image.
    occupied = {(s.row, s.col) for s in scene.shapes}
    for row in range(3):
        for col in range(3):
            if (row, col) not in occupied:
                probe = scenes.Shape("red", "circle", "small", row, col)
                x, y = scenes.cell_centre(probe, width, height)
                assert tuple(pixels[int(y), int(x)]) == scenes.BACKGROUND
    text = scenes.caption(scene)
    for shape in scene.shapes:
        assert f"{shape.colour} {shape.shape}" in text
    if len(scene.shapes) > 1:
        assert text.startswith(scenes.NUMBER_WORDS[len(scene.shapes)])
    # Answers are read off the image.
    for question, answer in scenes.questions_answers(scene):
        if question == "How many shapes are there?":
            assert answer == scenes.NUMBER_WORDS[len(scene.shapes)]
        elif question.startswith("What colour is the "):
            kind = question[len("What colour is the "):-1]
            matches = [s for s in scene.shapes if kind in (s.shape, "shape")]
            assert len(matches) == 1
            assert _colour_at(pixels, *scenes.cell_centre(matches[0], width, height)) == answer
        elif question.startswith("Where is the "):
            colour, kind = question[len("Where is the "):-1].split()
            (match,) = [s for s in scene.shapes if (s.colour, s.shape) == (colour, kind)]
            assert match.position == answer


def test_scene_variety_covers_colours_shapes_sizes_positions_and_counts():
    rng = np.random.default_rng(0)
    seen = {"colour": set(), "shape": set(), "size": set(), "cell": set(), "count": set()}
    for _ in range(300):
        scene = scenes.random_scene(rng)
        seen["count"].add(len(scene.shapes))
        for s in scene.shapes:
            seen["colour"].add(s.colour)
            seen["shape"].add(s.shape)
            seen["size"].add(s.size)
            seen["cell"].add((s.row, s.col))
    assert len(seen["colour"]) >= 6 and len(seen["shape"]) == 4 and len(seen["size"]) == 2
    assert len(seen["cell"]) == 9 and seen["count"] == {1, 2, 3}


@pytest.mark.parametrize("seed", range(8))
def test_video_shape_moves_the_way_the_caption_says(seed):
    frames, text, clip = synthetic.video_clip(seed, 0, image_size=48, num_frames=8)
    assert frames.shape == (8, 48, 48, 3)

    def centroid(frame):
        ys, xs = np.nonzero(np.any(frame != scenes.BACKGROUND, axis=-1))
        return xs.mean(), ys.mean()

    (x0, y0), (x1, y1) = centroid(frames[0]), centroid(frames[-1])
    dx, dy = scenes.MOTIONS[clip.motion]
    assert text == f"a {clip.shape.colour} {clip.shape.shape} {clip.motion}."
    assert np.sign(round(x1 - x0)) == dx and np.sign(round(y1 - y0)) == dy
    assert _colour_at(frames[0], x0, y0) == clip.shape.colour


def test_generation_is_deterministic_per_seed_and_item():
    a = synthetic.mmc4_document(seed=3, index=5, image_size=32)
    b = synthetic.mmc4_document(seed=3, index=5, image_size=32)
    c = synthetic.mmc4_document(seed=4, index=5, image_size=32)
    assert a[0] == b[0] and all(np.array_equal(x[0], y[0]) for x, y in zip(a[1], b[1]))
    assert a[0] != c[0]
    p1, t1, _ = synthetic.pair_example(0, 7, 32)
    p2, t2, _ = synthetic.pair_example(0, 7, 32)
    assert t1 == t2 and np.array_equal(p1, p2)


def test_eval_sets_follow_the_coco_and_vqav2_layouts(data_world):
    coco_dir = data_world.raw["coco_eval"]
    with open(os.path.join(coco_dir, "captions_val2014.json")) as f:
        coco = json.load(f)
    assert len(coco["images"]) == 4
    by_id = {im["id"]: im for im in coco["images"]}
    for ann in coco["annotations"]:
        image = by_id[ann["image_id"]]
        assert ann["caption"].endswith(".")
        path = os.path.join(coco_dir, "images", image["file_name"])
        assert Image.open(path).size == (image["width"], image["height"])
    vqa_dir = data_world.raw["vqav2_eval"]
    with open(os.path.join(vqa_dir, "v2_OpenEnded_mscoco_val2014_questions.json")) as f:
        questions = json.load(f)["questions"]
    with open(os.path.join(vqa_dir, "v2_mscoco_val2014_annotations.json")) as f:
        annotations = {a["question_id"]: a for a in json.load(f)["annotations"]}
    assert questions and set(annotations) == {q["question_id"] for q in questions}
    for q in questions:
        ann = annotations[q["question_id"]]
        assert ann["image_id"] == q["image_id"] and len(ann["answers"]) == 10
        assert all(a["answer"] == ann["multiple_choice_answer"] for a in ann["answers"])
    # A colour answer is the colour of the eval image at the described shape.
    colour_qs = [q for q in questions if q["question"].startswith("What colour is the ")]
    assert colour_qs
    for q in colour_qs:
        pixels = np.asarray(Image.open(os.path.join(vqa_dir, "images",
                                                    synthetic.coco_image_name(q["image_id"]))))
        answer = annotations[q["question_id"]]["multiple_choice_answer"]
        ref = np.array(scenes.COLOURS[answer])
        close = np.all(np.abs(pixels.astype(int) - ref) < 40, axis=-1)
        assert close.sum() >= 4  # JPEG at 32 px: a small shape still shows its colour
