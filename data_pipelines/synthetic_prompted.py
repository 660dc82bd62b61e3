"""Synthetic interleaved documents in the few-shot prompt formats, and text-only documents.

Flamingo learns in-context use of images from interleaved web pages; on the synthetic
shapes the closest such pages are sequences of images each followed by its caption or by
a question and answer about it, exactly the layouts of the evaluation prompts (SPEC §7):

    <image>Output: a large red circle at the top left.<EOC><image>Output: ...<EOC>
    <image>Question: What colour is the square? Answer: blue<EOC><image>Question: ...<EOC>

`write_prompted_mmc4` writes such documents in the MMC4 layout (jsonl shards + images/),
read by the "mmc4" source like any other interleaved data. A document holds one kind of
text (all captions, or all questions). Question documents, QUESTION_SHARE of all, ask
mostly colour questions (every colour of synthetic_scenes.COLOURS occurs), half of them
about one-shape scenes as in the colour-question evaluation, and otherwise count, shape and
position ones. `write_text_documents` writes text-only documents (one per line, for the
"text" source): the same prompts and the interleaved pages' text without images, for
pretraining the LM that Flamingo then freezes.

Item i is drawn from `numpy.random.default_rng([seed, stream, i])` (streams 20+, apart
from synthetic.py's and synthetic_eval.py's), so it does not depend on how many are written.
"""

import contextlib
import json
import os

import numpy as np

from data_pipelines import synthetic
from data_pipelines import synthetic_scenes as scenes

_PROMPTED, _TEXT = 20, 21  # rng streams
KINDS = ("captions", "questions")
QUESTION_SHARE = 0.75  # of the documents
COLOUR_SHARE = 0.9  # of the questions in question documents
SINGLE_SHAPE_SHARE = 0.5  # of the scenes in question documents


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def caption_prompt(scene: scenes.Scene) -> str:
    return f"Output: {scenes.caption(scene)}"


def question_prompt(rng: np.random.Generator, scene: scenes.Scene) -> str:
    """One question about `scene` with its answer: a colour question with probability
    COLOUR_SHARE when the scene has one, else any."""
    qa = scenes.questions_answers(scene)
    colour = [x for x in qa if x[0].startswith("What colour")]
    pool = colour if colour and rng.random() < COLOUR_SHARE else qa
    q, a = pool[int(rng.integers(len(pool)))]
    return f"Question: {q} Answer: {a}"


def prompted_document(seed: int, index: int, max_images: int = 5):
    """(kind, [(scene, text)]) of document `index`: 1..max_images scenes, each with the
    prompt text that follows its image."""
    rng = _rng(seed, _PROMPTED, index)
    kind = KINDS[int(rng.random() < QUESTION_SHARE)]
    n = int(rng.integers(1, max_images + 1))
    items = []
    for _ in range(n):
        if kind == "captions":
            scene = scenes.random_scene(rng)
            text = caption_prompt(scene)
        else:
            scene = scenes.random_scene(rng, 1 if rng.random() < SINGLE_SHAPE_SHARE else 3)
            text = question_prompt(rng, scene)
        items.append((scene, text))
    return kind, items


def write_prompted_mmc4(out_dir: str, num_docs: int, seed: int = 0, image_size: int = 64,
                        num_shards: int = 2, max_images: int = 5) -> list[str]:
    """Writes `num_docs` prompt-format documents (MMC4 layout: jsonl shards + images/)."""
    images_dir = os.path.join(out_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"docs-{k:05d}-of-{num_shards:05d}.jsonl")
             for k in range(num_shards)]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(p, "w", encoding="utf-8")) for p in paths]
        for i in range(num_docs):
            _, items = prompted_document(seed, i, max_images)
            infos = []
            for j, (scene, _) in enumerate(items):
                name = f"prompted{i:06d}_{j}.png"
                with open(os.path.join(images_dir, name), "wb") as f:
                    f.write(synthetic.encode_image(scenes.render_scene(scene, image_size), "png"))
                infos.append({"image_name": name, "raw_url": f"synthetic://prompted{i}/{j}",
                              "matched_text_index": j, "matched_sim": 0.3})
            record = {"url": f"synthetic://prompted{i}", "text_list": [t for _, t in items],
                      "image_info": infos}
            files[i % num_shards].write(json.dumps(record) + "\n")
    return paths


def text_document(seed: int, index: int, max_items: int = 5) -> str:
    """One text-only document: a prompt-format one, or an interleaved page's text."""
    rng = _rng(seed, _TEXT, index)
    n = int(rng.integers(1, max_items + 1))
    doc_scenes = [scenes.random_scene(rng) for _ in range(n)]
    style = int(rng.integers(3))
    if style == 0:
        texts = [caption_prompt(s) for s in doc_scenes]
    elif style == 1:
        texts = [question_prompt(rng, s) for s in doc_scenes]
    else:
        texts = scenes.document_text(rng, doc_scenes)[0]
    return " ".join(texts)


def write_text_documents(path: str, num_docs: int, seed: int = 0) -> str:
    """Writes `num_docs` text-only documents to `path`, one per line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_docs):
            f.write(text_document(seed, i) + "\n")
    return path
