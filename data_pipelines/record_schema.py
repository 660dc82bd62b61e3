"""The raw record of each dataset kind, as readers yield it and TFRecords store it.

Every reader (MMC4 jsonl, WebDataset tar, video frames/arrays, TFDS coco_captions) turns
its format into one of three record layouts, and `flamingo-prepare` writes exactly these
fields into tf.train.Examples, so the seqio preprocessors see the same structure whether
a Task reads raw files or prepared TFRecords. Images stay encoded (JPEG/PNG bytes).

    interleaved: key, texts [C] str, images [M] bytes, image_text_index [M] int64
                 (image i sits right before texts[image_text_index[i]], as in MMC4)
    pairs:       key, captions [K] str, image bytes
    video:       key, captions [K] str, frames [F] bytes (encoded frames in time order)
    text:        key, texts [C] str (one document, no media; text_documents)

plus `bad`: "" for a good record, else a reason from `bad_input.REASONS` (the payload of
a flagged record is a placeholder that is never trained on).
"""

import glob
import os
from typing import Any, Mapping

import tensorflow as tf

INTERLEAVED = "interleaved"
PAIRS = "pairs"
VIDEO = "video"
TEXT = "text"
KINDS = (INTERLEAVED, PAIRS, VIDEO, TEXT)

# field -> (dtype, is_list)
_FIELDS = {
    INTERLEAVED: {"key": (tf.string, False), "texts": (tf.string, True),
                  "images": (tf.string, True), "image_text_index": (tf.int64, True),
                  "bad": (tf.string, False)},
    PAIRS: {"key": (tf.string, False), "captions": (tf.string, True),
            "image": (tf.string, False), "bad": (tf.string, False)},
    VIDEO: {"key": (tf.string, False), "captions": (tf.string, True),
            "frames": (tf.string, True), "bad": (tf.string, False)},
    TEXT: {"key": (tf.string, False), "texts": (tf.string, True), "bad": (tf.string, False)},
}


def list_raw_shards(pattern_or_dir: str, extension: str, what: str) -> list[str]:
    """Sorted raw shard files: every `*.{extension}` of a directory, or a glob pattern.
    Raises FileNotFoundError naming `what` (e.g. "MMC4 jsonl shards") when none match."""
    if os.path.isdir(pattern_or_dir):
        pattern_or_dir = os.path.join(pattern_or_dir, f"*.{extension}")
    shards = sorted(glob.glob(pattern_or_dir))
    if not shards:
        raise FileNotFoundError(f"No {what} match {pattern_or_dir!r}.")
    return shards


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"Unknown dataset kind {kind!r}; expected one of {KINDS}.")


def output_signature(kind: str) -> dict[str, tf.TensorSpec]:
    """tf.TensorSpecs of a record, for tf.data.Dataset.from_generator."""
    check_kind(kind)
    return {
        name: tf.TensorSpec([None] if is_list else [], dtype)
        for name, (dtype, is_list) in _FIELDS[kind].items()
    }


def placeholder(kind: str, key: str, reason: str) -> dict[str, Any]:
    """A flagged record: carries only the reason; the payload is never used."""
    check_kind(kind)
    out = {}
    for name, (dtype, is_list) in _FIELDS[kind].items():
        empty = 0 if dtype == tf.int64 else b""
        out[name] = [] if is_list else empty
    out["key"] = key
    out["bad"] = reason
    return out


def to_tf_example(kind: str, record: Mapping[str, Any]) -> bytes:
    """Serializes a reader record into a tf.train.Example."""
    check_kind(kind)
    feature = {}
    for name, (dtype, is_list) in _FIELDS[kind].items():
        value = record[name]
        values = list(value) if is_list else [value]
        if dtype == tf.int64:
            ints = tf.train.Int64List(value=[int(v) for v in values])
            feature[name] = tf.train.Feature(int64_list=ints)
        else:
            values = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_tf_example(kind: str, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """In-graph inverse of `to_tf_example`."""
    check_kind(kind)
    spec = {}
    for name, (dtype, is_list) in _FIELDS[kind].items():
        if is_list:
            spec[name] = tf.io.RaggedFeature(dtype)
        else:
            default = "" if name == "bad" else None
            spec[name] = tf.io.FixedLenFeature([], dtype, default_value=default)
    return tf.io.parse_single_example(serialized, spec)
