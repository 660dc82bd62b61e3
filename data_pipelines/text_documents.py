"""Text-only documents (kind "text", source "text"): the data of LM pretraining.

Raw input: UTF-8 text files (`*.txt` in a directory, or a glob), one document per line.
A record (record_schema.TEXT) is one document; blank lines are skipped, a line that is
not UTF-8 is flagged `non_utf8_text` (see `bad_input`).

Task output, as the other kinds' (preprocessors module docstring) so the same feature
converter, iterators and train step take it:

    targets     [<= L] int32  a random L-token window of <document> <EOS> (the first L
                              tokens when not training); the converter prepends <BOS>
    media       [0, T, S, S, 3] float32: no media
    assoc_next  [] int32      0
"""

import functools
from typing import Iterator

import tensorflow as tf

from data_pipelines import bad_input
from data_pipelines import preprocessors as prep
from data_pipelines import record_schema
from data_pipelines import tokenizer as tokenizer_lib

_SALT_WINDOW = 1


def list_shards(pattern_or_dir: str) -> list[str]:
    """Sorted text files: a directory (all *.txt in it) or a glob pattern."""
    return record_schema.list_raw_shards(pattern_or_dir, "txt", "text files")


def read_shard(path: str) -> Iterator[dict]:
    """Yields text records (record_schema.TEXT), one per non-blank line of `path`."""
    name = path.rsplit("/", 1)[-1]
    with open(path, "rb") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            key = f"{name}:{line_no}"
            text, reason = bad_input.decode_text(line)
            if reason:
                yield record_schema.placeholder(record_schema.TEXT, key, reason)
            else:
                yield {"key": key, "texts": [text], "bad": ""}


def flag_recorded(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`bad` (the reader's reason string) → `_bad` code; `key` → `_key`."""
    flags = tf.constant(bad_input.FLAG_VALUES)

    def fn(ex):
        ex = dict(ex)
        is_flag = tf.equal(flags, ex.pop("bad"))
        ex["_bad"] = tf.where(tf.reduce_any(is_flag),
                              tf.argmax(tf.cast(is_flag, tf.int32), output_type=tf.int32),
                              bad_input.reason_code(bad_input.MALFORMED_RECORD))
        ex["texts"] = tf.cond(ex["_bad"] > 0, lambda: tf.constant(["."]),
                              lambda: prep.clean_text(ex["texts"]))
        ex["_key"] = ex.pop("key")
        return ex

    return prep.map_examples(ds, fn)


def tokenize_window(ds: tf.data.Dataset, sequence_length, vocab: tokenizer_lib.FlamingoVocabulary,
                    random_window: bool) -> tf.data.Dataset:
    """`targets`: an L-token window of the document's tokens followed by <EOS>."""
    length = sequence_length["targets"]

    def fn(ex):
        ex = dict(ex)
        text = tf.strings.reduce_join(ex.pop("texts"), separator=" ")
        body = tf.concat([tf.cast(vocab.encode_text_tf(text), tf.int32), [vocab.eos_id]], 0)
        max_start = tf.maximum(tf.size(body) - length, 0)
        start = tf.constant(0)
        if random_window:
            start = tf.random.stateless_uniform(
                [], prep.derive_seed(ex["_seed"], _SALT_WINDOW), minval=0,
                maxval=max_start + 1, dtype=tf.int32)
        ex["targets"] = body[start:start + length]
        return ex

    return prep.map_examples(ds, fn)


def no_media(ds: tf.data.Dataset, image_size: int, num_frames: int) -> tf.data.Dataset:
    """`media` [0, T, S, S, 3] and `assoc_next` 0."""

    def fn(ex):
        ex = dict(ex)
        ex["media"] = tf.zeros([0, num_frames, image_size, image_size, 3], tf.float32)
        ex["assoc_next"] = tf.constant(0, tf.int32)
        return ex

    return prep.map_examples(ds, fn)


def make_preprocessors(config, vocab: tokenizer_lib.FlamingoVocabulary) -> list:
    """The seqio preprocessors of a text task (`config`: tasks.TaskConfig)."""
    return [
        prep.add_index_and_seed,
        flag_recorded,
        functools.partial(tokenize_window, vocab=vocab, random_window=config.train),
        functools.partial(no_media, image_size=config.image_size, num_frames=config.num_frames),
        prep.select_task_output,
    ]
