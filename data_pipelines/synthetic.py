"""Synthetic datasets written in the raw formats of the real ones (no downloads).

    python -m data_pipelines.synthetic --output_dir data/synthetic --image_size 64

writes, deterministically from `--seed`:

    mmc4/        docs-0000k.jsonl + images/        interleaved documents (MMC4 layout)
    webdataset/  pairs-0000k.tar                   image-text pairs (WebDataset layout)
    video/       clips-0000k.jsonl + clips/        moving-shape clips, as frame files and
                                                    as uint8 .npy arrays (half each)
    eval/coco/   captions_val2014.json + images/   COCO-caption evaluation layout
    eval/vqav2/  v2_OpenEnded_mscoco_val2014_questions.json,
                 v2_mscoco_val2014_annotations.json + images/   VQAv2 layout
    corpus.txt   all the text, for training the SentencePiece model

Item i of every stream is drawn from `numpy.random.default_rng([seed, stream, i])`, so an
item does not depend on how many items are written or on the shard count.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import tarfile
from typing import Sequence

import numpy as np
from PIL import Image

from data_pipelines import synthetic_scenes as scenes

_MMC4, _PAIRS, _VIDEO, _COCO, _VQA = range(5)  # rng stream ids
_ASPECTS = ((1, 1), (1, 1), (4, 3), (3, 4), (16, 9))  # width:height choices


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _image_dims(rng: np.random.Generator, image_size: int, vary_aspect: bool) -> tuple[int, int]:
    """(width, height) with the longer side = image_size."""
    w, h = _ASPECTS[int(rng.integers(len(_ASPECTS)))] if vary_aspect else (1, 1)
    if w >= h:
        return image_size, max(1, round(image_size * h / w))
    return max(1, round(image_size * w / h)), image_size


def encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=95, subsampling=0)
    elif image_format == "png":
        Image.fromarray(pixels).save(buf, format="PNG")
    else:
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}.")
    return buf.getvalue()


def _shard_paths(out_dir: str, stem: str, ext: str, num_shards: int) -> list[str]:
    return [os.path.join(out_dir, f"{stem}-{k:05d}-of-{num_shards:05d}.{ext}")
            for k in range(num_shards)]


@contextlib.contextmanager
def _jsonl_shards(paths: Sequence[str]):
    """Yields `write(index, record)`, which appends record `index` as JSON to shard
    index % len(paths) (round-robin); every shard is closed on exit."""
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(p, "w", encoding="utf-8")) for p in paths]
        yield lambda index, record: files[index % len(files)].write(json.dumps(record) + "\n")


def mmc4_document(seed: int, index: int, image_size: int, max_images: int = 7):
    """Returns (text_list, [(image_pixels, matched_text_index)], scenes) of document `index`."""
    rng = _rng(seed, _MMC4, index)
    n = int(rng.integers(1, max_images + 1))
    doc_scenes = [scenes.random_scene(rng) for _ in range(n)]
    texts, matched = scenes.document_text(rng, doc_scenes)
    images = [
        scenes.render_scene(s, *_image_dims(rng, image_size, vary_aspect=True)) for s in doc_scenes
    ]
    return texts, list(zip(images, matched)), doc_scenes


def write_mmc4(out_dir: str, num_docs: int, seed: int = 0, image_size: int = 64,
               num_shards: int = 2, image_format: str = "png", max_images: int = 7) -> list[str]:
    """Writes `num_docs` documents round-robin over `num_shards` jsonl shards."""
    images_dir = os.path.join(out_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    paths = _shard_paths(out_dir, "docs", "jsonl", num_shards)
    with _jsonl_shards(paths) as write:
        for i in range(num_docs):
            texts, images, _ = mmc4_document(seed, i, image_size, max_images)
            infos = []
            for j, (pixels, text_index) in enumerate(images):
                image_name = f"doc{i:06d}_{j}.{image_format}"
                with open(os.path.join(images_dir, image_name), "wb") as f:
                    f.write(encode_image(pixels, image_format))
                infos.append({"image_name": image_name, "raw_url": f"synthetic://doc{i}/{j}",
                              "matched_text_index": text_index, "matched_sim": 0.3})
            write(i, {"url": f"synthetic://doc{i}", "text_list": texts, "image_info": infos})
    return paths


def pair_example(seed: int, index: int, image_size: int):
    """Returns (image_pixels, caption, scene) of pair `index`."""
    rng = _rng(seed, _PAIRS, index)
    scene = scenes.random_scene(rng)
    pixels = scenes.render_scene(scene, *_image_dims(rng, image_size, vary_aspect=True))
    return pixels, scenes.caption(scene), scene


def write_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(out_dir: str, num_pairs: int, seed: int = 0, image_size: int = 64,
                     num_shards: int = 2, image_format: str = "jpg") -> list[str]:
    """Writes `num_pairs` samples (key.jpg, key.txt, key.json) over `num_shards` tars."""
    os.makedirs(out_dir, exist_ok=True)
    paths = _shard_paths(out_dir, "pairs", "tar", num_shards)
    tars = [tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) for p in paths]
    try:
        for i in range(num_pairs):
            pixels, text, scene = pair_example(seed, i, image_size)
            tar, key = tars[i % num_shards], f"{i:07d}"
            write_tar_member(tar, f"{key}.{image_format}", encode_image(pixels, image_format))
            write_tar_member(tar, f"{key}.txt", text.encode("utf-8"))
            meta = {"caption": text, "qa": scenes.questions_answers(scene),
                    "width": int(pixels.shape[1]), "height": int(pixels.shape[0])}
            write_tar_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
    finally:
        for tar in tars:
            tar.close()
    return paths


def video_clip(seed: int, index: int, image_size: int, num_frames: int):
    """Returns (frames uint8 [T, S, S, 3], caption, clip) of clip `index`."""
    clip = scenes.random_clip(_rng(seed, _VIDEO, index))
    return scenes.render_clip(clip, num_frames, image_size), scenes.clip_caption(clip), clip


def write_video(out_dir: str, num_clips: int, seed: int = 0, image_size: int = 64,
                num_frames: int = 8, num_shards: int = 2) -> list[str]:
    """Writes clips as PNG frame folders and uint8 .npy arrays (alternating within every
    shard) plus index jsonl shards."""
    clips_dir = os.path.join(out_dir, "clips")
    os.makedirs(clips_dir, exist_ok=True)
    paths = _shard_paths(out_dir, "clips", "jsonl", num_shards)
    with _jsonl_shards(paths) as write:
        for i in range(num_clips):
            frames, text, _ = video_clip(seed, i, image_size, num_frames)
            key = f"clip{i:06d}"
            entry = {"key": key, "caption": text}
            if (i // num_shards) % 2 == 0:
                frame_dir = os.path.join(clips_dir, key)
                os.makedirs(frame_dir, exist_ok=True)
                for t, frame in enumerate(frames):
                    Image.fromarray(frame).save(os.path.join(frame_dir, f"{t:03d}.png"))
                entry["frames_dir"] = f"clips/{key}"
            else:
                np.save(os.path.join(clips_dir, f"{key}.npy"), frames)
                entry["array"] = f"clips/{key}.npy"
            write(i, entry)
    return paths


def coco_image_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def _write_eval_images(images_dir: str, stream: int, num_images: int, seed: int, image_size: int):
    os.makedirs(images_dir, exist_ok=True)
    out = []
    for i in range(num_images):
        rng = _rng(seed, stream, i)
        scene = scenes.random_scene(rng)
        width, height = _image_dims(rng, image_size, vary_aspect=False)
        pixels = scenes.render_scene(scene, width, height)
        image_id = i + 1
        with open(os.path.join(images_dir, coco_image_name(image_id)), "wb") as f:
            f.write(encode_image(pixels, "jpg"))
        out.append((image_id, width, height, scene))
    return out


def write_coco_captions_eval(out_dir: str, num_images: int, seed: int = 0,
                             image_size: int = 64) -> str:
    """COCO-caption layout (captions_val2014.json + images/); returns the json path."""
    images = _write_eval_images(os.path.join(out_dir, "images"), _COCO, num_images, seed,
                                image_size)
    ann = {"info": {"description": "synthetic shapes, COCO-caption layout"}, "licenses": [],
           "images": [], "annotations": []}
    for image_id, width, height, scene in images:
        ann["images"].append({"id": image_id, "file_name": coco_image_name(image_id),
                              "width": width, "height": height})
        text = scenes.caption(scene)
        for k, ref in enumerate((text, "an image of " + text)):
            ann["annotations"].append(
                {"id": image_id * 10 + k, "image_id": image_id, "caption": ref})
    path = os.path.join(out_dir, "captions_val2014.json")
    with open(path, "w") as f:
        json.dump(ann, f)
    return path


def write_vqav2_eval(out_dir: str, num_images: int, seed: int = 0,
                     image_size: int = 64) -> tuple[str, str]:
    """VQAv2 layout (questions + annotations json, images/); returns both json paths."""
    images = _write_eval_images(os.path.join(out_dir, "images"), _VQA, num_images, seed,
                                image_size)
    questions, annotations = [], []
    for image_id, _, _, scene in images:
        for k, (q, a) in enumerate(scenes.questions_answers(scene)):
            qid = image_id * 100 + k
            questions.append({"image_id": image_id, "question": q, "question_id": qid})
            annotations.append({
                "question_id": qid, "image_id": image_id,
                "question_type": " ".join(q.lower().split()[:3]),
                "answer_type": "number" if q.startswith("How many") else "other",
                "multiple_choice_answer": a,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                            for j in range(10)],
            })
    q_path = os.path.join(out_dir, "v2_OpenEnded_mscoco_val2014_questions.json")
    a_path = os.path.join(out_dir, "v2_mscoco_val2014_annotations.json")
    with open(q_path, "w") as f:
        json.dump({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                   "data_subtype": "val2014", "license": {}, "questions": questions}, f)
    with open(a_path, "w") as f:
        json.dump({"info": {}, "data_type": "mscoco", "data_subtype": "val2014", "license": {},
                   "annotations": annotations}, f)
    return q_path, a_path


def write_corpus(path: str, seed: int = 0, num_docs: int = 200, num_pairs: int = 200) -> str:
    """Text for the SentencePiece model: generated documents, captions, QA, vocabulary."""
    lines = list(scenes.vocabulary_sentences())
    for i in range(num_docs):
        rng = _rng(seed, _MMC4, i)
        doc_scenes = [scenes.random_scene(rng) for _ in range(int(rng.integers(1, 8)))]
        lines.extend(scenes.document_text(rng, doc_scenes)[0])
    for i in range(num_pairs):
        scene = scenes.random_scene(_rng(seed, _PAIRS, i))
        lines.append(scenes.caption(scene))
        lines.extend(f"Question: {q} Answer: {a}" for q, a in scenes.questions_answers(scene))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_all(root: str, seed: int = 0, image_size: int = 64, num_docs: int = 64,
              num_pairs: int = 128, num_clips: int = 32, num_frames: int = 8,
              num_eval: int = 32, num_shards: int = 2) -> dict[str, str]:
    """Writes every synthetic dataset under `root`; returns their locations."""
    out = {
        "mmc4": os.path.join(root, "mmc4"),
        "webdataset": os.path.join(root, "webdataset"),
        "video": os.path.join(root, "video"),
        "coco_eval": os.path.join(root, "eval", "coco"),
        "vqav2_eval": os.path.join(root, "eval", "vqav2"),
        "corpus": os.path.join(root, "corpus.txt"),
    }
    write_mmc4(out["mmc4"], num_docs, seed, image_size, num_shards)
    write_webdataset(out["webdataset"], num_pairs, seed, image_size, num_shards)
    write_video(out["video"], num_clips, seed, image_size, num_frames, num_shards)
    write_coco_captions_eval(out["coco_eval"], num_eval, seed, image_size)
    write_vqav2_eval(out["vqav2_eval"], num_eval, seed, image_size)
    write_corpus(out["corpus"], seed)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write synthetic Flamingo datasets in raw formats.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=64, help="Longer image side in pixels.")
    parser.add_argument("--num_docs", type=int, default=256)
    parser.add_argument("--num_pairs", type=int, default=1024)
    parser.add_argument("--num_clips", type=int, default=128)
    parser.add_argument("--num_frames", type=int, default=8)
    parser.add_argument("--num_eval", type=int, default=100)
    parser.add_argument("--num_shards", type=int, default=4)
    args = parser.parse_args(argv)
    out = write_all(args.output_dir, args.seed, args.image_size, args.num_docs, args.num_pairs,
                    args.num_clips, args.num_frames, args.num_eval, args.num_shards)
    for name, path in out.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
