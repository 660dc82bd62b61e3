"""Synthetic few-shot evaluation sets in the public benchmarks' own layouts (no downloads).

    python -m data_pipelines.synthetic_eval --output_dir data/synthetic_eval --image_size 64

writes, deterministically from `--seed`, scenes drawn by `synthetic_scenes`:

    captions/        dataset_synthetic.json (Karpathy-split layout, splits "train" and
                     "test") + images/{train,test}/synth_<id>.jpg
    vqa/             v2_OpenEnded_mscoco_{train,val}2014_questions.json and
                     v2_mscoco_{train,val}2014_annotations.json (VQAv2 layout, 10 answers
                     per question) + images/{train,val}2014/COCO_<split>_<id:012d>.jpg;
                     one colour question per image, over the eight colours of
                     synthetic_scenes, so a text-only guess scores about 1/8
    classification/  {train,val}/<synset>/<n>.jpg (ImageNet folder-per-class layout) +
                     class_names.txt ("<synset> <name>" lines): the shape of one object

`train` splits are the support sets, `test`/`val` the query sets. Item i of a split is drawn
from `numpy.random.default_rng([seed, stream, split, i])`: independent of the set sizes.
`task_configs(paths)` gives the matching `config.eval.tasks` entries.
"""

import argparse
import json
import os
import re
import sys
from typing import Sequence

import numpy as np

from data_pipelines import synthetic_scenes as scenes
from data_pipelines.synthetic import encode_image

_CAPTIONS, _VQA, _CLASSES = 10, 11, 12  # rng streams (synthetic.py uses 0..4)
_TRAIN, _QUERY = 0, 1
KARPATHY_FILE = "dataset_synthetic.json"
CLASS_NAMES_FILE = "class_names.txt"


def _rng(seed: int, stream: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, split, index])


def _save_jpg(path: str, pixels: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(encode_image(pixels, "jpg"))


def caption_references(scene: scenes.Scene) -> list[str]:
    """Three reference captions; the first is the caption the pair data trains on."""
    text = scenes.caption(scene)
    return [text, f"an image of {text}", f"a picture of {text}"]


def write_karpathy_captions(out_dir: str, num_train: int, num_test: int, seed: int = 0,
                            image_size: int = 64, max_shapes: int = 3) -> str:
    """Karpathy-split captions json + images (scenes of 1..max_shapes shapes); returns the
    json path."""
    entries = []
    sent_id = 0
    for split, split_name, count in ((_TRAIN, "train", num_train), (_QUERY, "test", num_test)):
        images_dir = os.path.join(out_dir, "images", split_name)
        os.makedirs(images_dir, exist_ok=True)
        for i in range(count):
            scene = scenes.random_scene(_rng(seed, _CAPTIONS, split, i), max_shapes)
            image_id = len(entries)
            filename = f"synth_{image_id:06d}.jpg"
            _save_jpg(os.path.join(images_dir, filename), scenes.render_scene(scene, image_size))
            sentences = []
            for raw in caption_references(scene):
                sentences.append({"raw": raw, "tokens": re.findall(r"[a-z0-9]+", raw.lower()),
                                  "imgid": image_id, "sentid": sent_id})
                sent_id += 1
            entries.append({"filepath": split_name, "filename": filename, "imgid": image_id,
                            "split": split_name, "sentences": sentences,
                            "sentids": [s["sentid"] for s in sentences], "cocoid": image_id})
    path = os.path.join(out_dir, KARPATHY_FILE)
    with open(path, "w") as f:
        json.dump({"images": entries, "dataset": "synthetic"}, f)
    return path


def colour_question(rng: np.random.Generator, max_shapes: int) -> tuple[scenes.Scene, str, str]:
    """A scene and one colour question about it (scenes without one are redrawn)."""
    while True:
        scene = scenes.random_scene(rng, max_shapes)
        qa = [(q, a) for q, a in scenes.questions_answers(scene) if q.startswith("What colour")]
        if qa:
            q, a = qa[int(rng.integers(len(qa)))]
            return scene, q, a


def write_colour_vqa(out_dir: str, num_train: int, num_val: int, seed: int = 0,
                     image_size: int = 64, max_shapes: int = 1) -> dict[str, dict[str, str]]:
    """VQAv2-layout colour questions for train2014 (support) and val2014 (query).

    Returns {"train": {questions, annotations, images_dir}, "val": {...}}."""
    out = {}
    for split, subtype, count in ((_TRAIN, "train2014", num_train), (_QUERY, "val2014", num_val)):
        images_dir = os.path.join(out_dir, "images", subtype)
        os.makedirs(images_dir, exist_ok=True)
        questions, annotations = [], []
        for i in range(count):
            scene, question, answer = colour_question(_rng(seed, _VQA, split, i), max_shapes)
            image_id = i + 1
            _save_jpg(os.path.join(images_dir, f"COCO_{subtype}_{image_id:012d}.jpg"),
                      scenes.render_scene(scene, image_size))
            qid = image_id * 10
            questions.append({"image_id": image_id, "question": question, "question_id": qid})
            annotations.append({
                "question_id": qid, "image_id": image_id, "question_type": "what colour is",
                "answer_type": "other", "multiple_choice_answer": answer,
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": j + 1}
                            for j in range(10)],
            })
        paths = {
            "questions": os.path.join(out_dir, f"v2_OpenEnded_mscoco_{subtype}_questions.json"),
            "annotations": os.path.join(out_dir, f"v2_mscoco_{subtype}_annotations.json"),
            "images_dir": images_dir,
        }
        header = {"info": {"description": "synthetic colour questions, VQAv2 layout"},
                  "license": {}, "data_type": "mscoco", "data_subtype": subtype}
        with open(paths["questions"], "w") as f:
            json.dump({**header, "task_type": "Open-Ended", "questions": questions}, f)
        with open(paths["annotations"], "w") as f:
            json.dump({**header, "annotations": annotations}, f)
        out["train" if split == _TRAIN else "val"] = paths
    return out


def synset(label: int) -> str:
    return f"s{label + 1:07d}"


def write_shape_classification(out_dir: str, num_train_per_class: int, num_val_per_class: int,
                               seed: int = 0, image_size: int = 64) -> dict[str, str]:
    """Folder-per-class images of one shape each (class = the shape); returns the paths."""
    for split, split_name, count in ((_TRAIN, "train", num_train_per_class),
                                     (_QUERY, "val", num_val_per_class)):
        for label, kind in enumerate(scenes.SHAPES):
            folder = os.path.join(out_dir, split_name, synset(label))
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                rng = _rng(seed, _CLASSES, split, label * 1_000_000 + i)
                drawn = scenes.random_scene(rng, max_shapes=1).shapes[0]
                scene = scenes.Scene((scenes.Shape(drawn.colour, kind, drawn.size, drawn.row,
                                                   drawn.col),))
                _save_jpg(os.path.join(folder, f"{i:05d}.jpg"),
                          scenes.render_scene(scene, image_size))
    names = os.path.join(out_dir, CLASS_NAMES_FILE)
    with open(names, "w") as f:
        f.write("".join(f"{synset(k)} {kind}\n" for k, kind in enumerate(scenes.SHAPES)))
    return {"train": os.path.join(out_dir, "train"), "val": os.path.join(out_dir, "val"),
            "class_names": names}


def write_all(root: str, seed: int = 0, image_size: int = 64, num_support: int = 64,
              num_query: int = 32, num_per_class: tuple[int, int] = (8, 4),
              caption_max_shapes: int = 3) -> dict:
    """Writes the three sets under `root`; returns their paths."""
    captions_dir = os.path.join(root, "captions")
    return {
        "captions": {"path": write_karpathy_captions(captions_dir, num_support, num_query, seed,
                                                     image_size, caption_max_shapes),
                     "images_dir": os.path.join(captions_dir, "images")},
        "vqa": write_colour_vqa(os.path.join(root, "vqa"), num_support, num_query, seed,
                                image_size),
        "classification": write_shape_classification(os.path.join(root, "classification"),
                                                     *num_per_class, seed, image_size),
    }


def task_configs(paths: dict, shots: Sequence[int] = (0, 4), **overrides) -> dict[str, dict]:
    """`config.eval.tasks` entries for the sets `write_all` wrote; `overrides` (e.g. trials,
    num_queries, beam_size) apply to every task."""
    captions, vqa, classes = paths["captions"], paths["vqa"], paths["classification"]
    common = dict(shots=tuple(shots), **overrides)
    return {
        "synthetic_captions": dict(
            kind="captioning", format="karpathy",
            support=dict(path=captions["path"], images_dir=captions["images_dir"], split="train"),
            query=dict(path=captions["path"], images_dir=captions["images_dir"], split="test"),
            **common),
        "synthetic_colour_vqa": dict(
            kind="vqa", format="vqav2", support=dict(vqa["train"]), query=dict(vqa["val"]),
            **common),
        "synthetic_shapes": dict(
            kind="classification", format="image_folder",
            support=dict(root=classes["train"], class_names=classes["class_names"]),
            query=dict(root=classes["val"], class_names=classes["class_names"]),
            **common),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write synthetic few-shot evaluation sets in public benchmark layouts.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--num_support", type=int, default=256)
    parser.add_argument("--num_query", type=int, default=100)
    args = parser.parse_args(argv)
    out = write_all(args.output_dir, args.seed, args.image_size, args.num_support,
                    args.num_query)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
