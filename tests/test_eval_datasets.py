"""Evaluation readers on hand-written files in each public layout, the numpy image
preprocessing against training's TensorFlow path, and the synthetic evaluation sets."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import image_ops, synthetic_eval, synthetic_scenes
from flamingo_jax.evaluation import datasets, media


def _image(path, size=(6, 4), colour=(200, 10, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return str(path)


def _json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def test_karpathy(tmp_path):
    root = tmp_path / "coco"
    a = _image(root / "val2014" / "a.jpg")
    b = _image(root / "b.jpg")  # Flickr30K: no filepath
    _image(root / "train2014" / "t.jpg")
    path = _json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 42,
         "sentences": [{"raw": " A dog. "}, {"raw": "a cat"}]},
        {"filename": "b.jpg", "split": "test", "imgid": 7, "sentences": [{"raw": "x y"}]},
        {"filepath": "train2014", "filename": "t.jpg", "split": "train",
         "sentences": [{"raw": "train"}]},
        {"filepath": "val2014", "filename": "gone.jpg", "split": "test",
         "sentences": [{"raw": "z"}]},
        {"filename": "b.jpg", "split": "test"},  # no sentences
        {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "  "}]},
        {"filename": "b.jpg"},  # no split
    ]})
    out = datasets.read("karpathy", path=path, images_dir=str(root), split="test")
    assert out.examples == [
        datasets.EvalExample(id="42", media=(a,), references=("A dog.", "a cat")),
        datasets.EvalExample(id="7", media=(b,), references=("x y",)),
    ]
    assert out.skipped == {"missing_file": 1, "malformed_record": 2, "empty_text": 1}
    train = datasets.read("karpathy", path=path, images_dir=str(root),
                          split=("train", "restval"))
    assert [e.references for e in train.examples] == [("train",)]


def test_vqav2(tmp_path):
    img = _image(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    questions = _json(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"question_id": 420, "image_id": 42, "question": "What colour?"},
        {"question_id": 421, "image_id": 42, "question": "Unanswered?"},
        {"question_id": 430, "image_id": 43, "question": "No image?"},
        {"question_id": 440, "image_id": 42},
    ]})
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(["red"] * 9 + ["dark red"])]
    annotations = _json(tmp_path / "a.json", {"annotations": [
        {"question_id": 420, "image_id": 42, "answers": answers},
        {"question_id": 430, "image_id": 43, "answers": answers},
    ]})
    out = datasets.read("vqav2", questions=questions, annotations=annotations,
                        images_dir=str(tmp_path / "val2014"))
    assert out.examples == [datasets.EvalExample(
        id="420", media=(img,), question="What colour?",
        references=("red",) * 9 + ("dark red",))]
    assert out.skipped == {"no_answers": 1, "missing_file": 1, "malformed_record": 1}
    with pytest.raises(ValueError, match="image_name"):
        datasets.read("vqav2", questions=questions, annotations=annotations,
                      images_dir=str(tmp_path), image_name="{image_idx}.jpg")


def test_textvqa_and_vizwiz(tmp_path):
    t = _image(tmp_path / "train_images" / "003a.jpg")
    path = _json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 1, "image_id": "003a", "question": "what brand?",
         "answers": ["nokia"] * 10},
        {"question_id": 2, "image_id": "003a", "question": "test split?"},
        {"question_id": 3, "image_id": "missing", "question": "q", "answers": ["a"]},
    ]})
    out = datasets.read("textvqa", path=path, images_dir=str(tmp_path / "train_images"))
    assert out.examples == [datasets.EvalExample(id="1", media=(t,), question="what brand?",
                                                 references=("nokia",) * 10)]
    assert out.skipped == {"no_answers": 1, "missing_file": 1}

    v = _image(tmp_path / "val" / "VizWiz_val_00000000.jpg")
    path = _json(tmp_path / "val.json", [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?",
         "answers": [{"answer": "soup", "answer_confidence": "yes"},
                     {"answer": "unanswerable", "answer_confidence": "maybe"}],
         "answerable": 1},
        {"image": "VizWiz_val_00000000.jpg", "question": "", "answers": []},
        {"question": "no image"},
    ])
    out = datasets.read("vizwiz", path=path, images_dir=str(tmp_path / "val"))
    assert out.examples == [datasets.EvalExample(
        id="VizWiz_val_00000000.jpg", media=(v,), question="What is this?",
        references=("soup", "unanswerable"))]
    assert out.skipped == {"empty_text": 1, "malformed_record": 1}


def test_hateful_memes(tmp_path):
    a = _image(tmp_path / "img" / "01235.png")
    lines = [json.dumps({"id": 1235, "img": "img/01235.png", "label": 1, "text": "its text"}),
             json.dumps({"id": 9, "img": "img/00009.png", "label": 0, "text": "gone"}),
             json.dumps({"id": 10, "img": "img/01235.png", "text": "test split"}),
             "{not json", ""]
    path = tmp_path / "dev.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = datasets.read("hateful_memes", path=str(path))
    assert out.examples == [datasets.EvalExample(id="1235", media=(a,), text="its text",
                                                 label=1)]
    assert out.skipped == {"missing_file": 1, "no_label": 1, "malformed_record": 1}


def test_image_folder(tmp_path):
    root = tmp_path / "val"
    b0 = _image(root / "n02" / "x.JPEG")
    a0 = _image(root / "n01" / "b.png")
    a1 = _image(root / "n01" / "c.jpg")
    (root / "n01" / "notes.txt").write_text("not an image")
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("n02 goldfish, Carassius auratus\nn01 tench\nn03 unused\n")
    out = datasets.read("image_folder", root=str(root), class_names=str(names))
    assert out.class_names == ("tench", "goldfish, Carassius auratus")
    assert [(e.id, e.media, e.label) for e in out.examples] == [
        ("n01/b.png", (a0,), 0), ("n01/c.jpg", (a1,), 0), ("n02/x.JPEG", (b0,), 1)]
    assert out.skipped == {"unsupported_file": 1}
    plain = tmp_path / "names.txt"
    plain.write_text("tench\ngoldfish\n")
    assert datasets.read("image_folder", root=str(root),
                         class_names=str(plain)).class_names == ("tench", "goldfish")
    assert datasets.read("image_folder", root=str(root)).class_names == ("n01", "n02")
    plain.write_text("only one\n")
    with pytest.raises(ValueError, match="class names file"):
        datasets.read("image_folder", root=str(root), class_names=str(plain))


def test_video_captions_and_qa(tmp_path):
    frames = tmp_path / "frames"
    f1 = [_image(frames / "vid1" / f"{t:03d}.jpg") for t in (1, 0, 2)]
    os.makedirs(frames / "vid2")  # empty clip folder
    path = _json(tmp_path / "vatex_val.json", [
        {"videoID": "vid1", "enCap": ["a person walks.", " "]},
        {"videoID": "vid2", "enCap": ["x"]},
        {"videoID": "vid3", "enCap": ["x"]},
        {"videoID": "vid1", "enCap": []},
        {"videoID": "vid1"},
    ])
    out = datasets.read("video_captions", path=path, frames_dir=str(frames))
    assert out.examples == [datasets.EvalExample(id="vid1", media=tuple(sorted(f1)),
                                                 references=("a person walks.",))]
    assert out.skipped == {"no_media": 1, "missing_file": 1, "empty_text": 1,
                           "malformed_record": 1}

    f7 = _image(frames / "video7" / "0.png")
    path = _json(tmp_path / "msrvtt_qa.json", [
        {"id": 0, "video_id": 7, "question": "what is it?", "answer": "dog"},
        {"id": 1, "video_id": 7, "question": "who?", "answer": ["man", "person"]},
        {"id": 2, "video_id": 8, "question": "what?", "answer": "cat"},
        {"id": 3, "question": "no clip?", "answer": "x"},
    ])
    out = datasets.read("video_qa", path=path, frames_dir=str(frames),
                        clip_name="video{video_id}")
    assert out.examples == [
        datasets.EvalExample(id="0", media=(f7,), question="what is it?", references=("dog",)),
        datasets.EvalExample(id="1", media=(f7,), question="who?",
                             references=("man", "person"))]
    assert out.skipped == {"missing_file": 1, "malformed_record": 1}


def test_bad_files_and_arguments(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        datasets.read("karpathy", path=str(broken), images_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="absent.json does not exist"):
        datasets.read("vizwiz", path=str(tmp_path / "absent.json"), images_dir=".")
    wrong = _json(tmp_path / "wrong.json", {"questions": []})
    with pytest.raises(ValueError, match="'data' field is not a list"):
        datasets.read("textvqa", path=wrong, images_dir=".")
    with pytest.raises(ValueError, match="allowed"):
        datasets.read("coco_captions", path="x")
    with pytest.raises(ValueError, match=r"unknown: \['split'\], missing: \['images_dir'\]"):
        datasets.read("vizwiz", path="x", split="val")


def test_numpy_preprocessing_matches_training_tensorflow_path():
    rng = np.random.default_rng(0)
    for h, w, size in [(37, 53, 32), (100, 7, 32), (3, 90, 16), (20, 20, 64), (64, 48, 64)]:
        image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        expected = image_ops.preprocess_image(tf.constant(image), size).numpy()
        got = media.preprocess(image, size)
        assert got.shape == expected.shape == (size, size, 3)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_frame_indices_spread_like_training():
    np.testing.assert_array_equal(media.frame_indices(10, 4), [1, 3, 6, 8])
    np.testing.assert_array_equal(media.frame_indices(2, 4), [0, 0, 1, 1])


def _tree_bytes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_synthetic_eval_sets(tmp_path):
    paths = synthetic_eval.write_all(str(tmp_path / "a"), seed=3, image_size=16,
                                     num_support=5, num_query=3, num_per_class=(2, 1))
    synthetic_eval.write_all(str(tmp_path / "b"), seed=3, image_size=16, num_support=5,
                             num_query=3, num_per_class=(2, 1))
    synthetic_eval.write_all(str(tmp_path / "c"), seed=4, image_size=16, num_support=5,
                             num_query=3, num_per_class=(2, 1))
    a, b, c = (_tree_bytes(tmp_path / s) for s in "abc")
    assert a == b and a.keys() == c.keys() and a != c

    tasks = synthetic_eval.task_configs(paths, shots=(0, 4))
    sizes = {}
    for name, task in tasks.items():
        for role in ("support", "query"):
            got = datasets.read(task["format"], **task[role])
            assert got.skipped == {}
            sizes[name, role] = len(got)
            if task["kind"] == "vqa":
                for e in got.examples:
                    assert e.question.startswith("What colour is the")
                    assert len(e.references) == 10 and len(set(e.references)) == 1
                    assert e.references[0] in synthetic_scenes.COLOURS
            if task["kind"] == "classification":
                assert got.class_names == synthetic_scenes.SHAPES
    assert sizes == {("synthetic_captions", "support"): 5, ("synthetic_captions", "query"): 3,
                     ("synthetic_colour_vqa", "support"): 5,
                     ("synthetic_colour_vqa", "query"): 3,
                     ("synthetic_shapes", "support"): 8, ("synthetic_shapes", "query"): 4}
    captions = datasets.read("karpathy", **tasks["synthetic_captions"]["query"])
    with open(paths["captions"]["path"]) as f:
        entries = [e for e in json.load(f)["images"] if e["split"] == "test"]
    assert [e.references[0] for e in captions.examples] == [
        e["sentences"][0]["raw"] for e in entries]
    # Colour answers cover the eight colours evenly enough that a constant guess is weak.
    answers = [synthetic_eval.colour_question(np.random.default_rng([0, i]), 1)[2]
               for i in range(400)]
    counts = np.array([answers.count(c) for c in synthetic_scenes.COLOURS])
    assert len(counts) >= 6 and counts.min() > 0 and counts.max() / len(answers) < 0.2
