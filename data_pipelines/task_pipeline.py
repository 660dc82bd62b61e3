"""One task's deterministic, restorable stream of converted examples on one host.

    source records of this host (ShardInfo)        files shuffled per epoch (seeded)
      -> shuffle buffer of raw records (seeded) -> repeat(num_epochs) [-> end marker]
      -> enumerate -> skip(start_index)            restoring a position costs only reads
      -> `_index`, `_seed` = f(seed, task, index)
      -> the Task's preprocessors (decode, tokenize, window, augment: all stateless)
      -> ignore_errors (anything that still fails shows up as an index gap)
      -> MultimodalFeatureConverter                fixed shapes

Everything before `skip` handles still-encoded records only, and every random draw after
it is keyed by `_index`, so the stream from index k is the same whether the pipeline ran
from 0 or was rebuilt at k: that is what makes `get_state`/`restore` exact. The price:
a restore re-reads (without decoding) the k records this host consumed since the run
began, all epochs included.
"""

import zlib
from typing import Optional

import seqio
import tensorflow as tf

from data_pipelines import bad_input
from data_pipelines import feature_converter as fc
from data_pipelines import preprocessors as prep
from data_pipelines import record_schema
from data_pipelines import tasks as tasks_lib

AUTOTUNE = tf.data.AUTOTUNE


def host_records(task: seqio.Task, split: str, shard_info: Optional[seqio.ShardInfo],
                 shuffle: bool, seed: int) -> tf.data.Dataset:
    """Raw records of this host: whole files when there are enough, else every k-th record."""
    source = task.source
    if shard_info is None or shard_info.num_shards == 1:
        return source.get_dataset(split=split, shuffle=shuffle, seed=seed)
    if len(source.list_shards(split)) >= shard_info.num_shards:
        return source.get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info)
    ds = source.get_dataset(split=split, shuffle=False, seed=seed)
    return ds.shard(shard_info.num_shards, shard_info.index)


def _end_marker(kind: str) -> tf.data.Dataset:
    """One raw record flagged end_of_stream, matching the parsed record structure."""
    record = record_schema.placeholder(kind, "", bad_input.END_OF_STREAM)
    serialized = record_schema.to_tf_example(kind, record)
    parsed = record_schema.parse_tf_example(kind, tf.constant(serialized))
    return tf.data.Dataset.from_tensors(parsed)


def _conform(ds: tf.data.Dataset, kind: str) -> tf.data.Dataset:
    """Casts a source's records to the record_schema signature (TFDS, generators, ...)."""
    signature = record_schema.output_signature(kind)
    return prep.map_examples(ds, lambda ex: {
        k: tf.ensure_shape(ex[k] if s.dtype == tf.string else tf.cast(ex[k], s.dtype), s.shape)
        for k, s in signature.items()})


def task_salt(task_name: str) -> int:
    """A stable per-task number, so two tasks with one seed draw different randomness."""
    return zlib.crc32(task_name.encode("utf-8")) & 0x7FFFFFFF


def example_dataset(task: tasks_lib.FlamingoTask, *, split: str = "train", seed: int = 0,
                    shard_info: Optional[seqio.ShardInfo] = None, shuffle: bool = True,
                    num_epochs: Optional[int] = None, start_index: int = 0,
                    text_length: Optional[int] = None, max_media: Optional[int] = None,
                    ) -> tf.data.Dataset:
    """Converted examples of `task` (unbatched) from record `start_index` of this host.

    text_length / max_media override the task's L / N (the sampled mixture pads every
    task to the largest). Examples keep `_index`, `_bad`, `_key` for the batch assembler.
    """
    config = task.config
    kind = config.kind
    ds = _conform(host_records(task, split, shard_info, shuffle, seed), kind)
    if shuffle:
        ds = ds.shuffle(config.shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        ds = ds.concatenate(_end_marker(kind))
    salt = seed * 1_000_003 + task_salt(task.name)

    def number(index, ex):
        ex = dict(ex)
        ex["_index"] = index
        ex["_seed"] = prep.example_seed(salt, index)
        return ex

    ds = ds.enumerate()
    if start_index:
        ds = ds.skip(start_index)
    ds = prep.map_examples(ds, number)
    lengths = dict(config.sequence_length)
    lengths["targets"] = text_length or lengths["targets"]
    lengths["media"] = max_media or lengths["media"]
    ds = task.preprocess_precache(ds, seed=seed)
    ds = task.preprocess_postcache(ds, sequence_length=dict(config.sequence_length), seed=seed)
    ds = ds.ignore_errors(log_warning=True)
    converter = fc.MultimodalFeatureConverter(
        bos_id=task.vocab.bos_id, image_id=task.vocab.image_id, pad_id=task.vocab.pad_id)
    return converter(ds, converter.task_feature_lengths(lengths["targets"], lengths["media"]))
