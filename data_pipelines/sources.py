"""seqio DataSources yielding raw records (record_schema) from files.

- `RecordFileSource`: sharded TFRecords written by `flamingo-prepare` (the fast path).
  Each shard's record framing is checked before reading: a file cut short yields its
  complete records and one `truncated_file` flag instead of a DataLossError.
- `ReaderSource`: raw files through a Python reader (MMC4 jsonl, WebDataset tar, video
  index), for training straight from raw data and for the raw-vs-prepared benchmark.

Both shard by file when a split has at least as many files as hosts (each host then
reads only its files), else every host reads all files and keeps every k-th record; the
choice mirrors seqio's `Task.get_dataset` and is made in `task_pipeline.host_records`.
"""

import struct
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from data_pipelines import bad_input
from data_pipelines import record_schema

AUTOTUNE = tf.data.AUTOTUNE


def scan_tfrecord(path: str) -> tuple[int, bool]:
    """(number of complete records, whether the file is cut short), from the framing.

    A TFRecord is a sequence of [uint64 length][uint32 crc][data][uint32 crc]; only the
    headers are read, so this costs one small read per record.
    """
    size = tf.io.gfile.stat(path).length
    count, pos = 0, 0
    with tf.io.gfile.GFile(path, "rb") as f:
        while pos < size:
            header = f.read(12)
            if len(header) < 12:
                return count, True
            (length,) = struct.unpack("<Q", header[:8])
            end = pos + 12 + length + 4
            if end > size:
                return count, True
            f.seek(end)
            pos, count = end, count + 1
    return count, False


def _files_for_host(files: Sequence[str], shard_info: Optional[seqio.ShardInfo]) -> list[str]:
    files = list(files)
    if shard_info is None or shard_info.num_shards == 1:
        return files
    if len(files) < shard_info.num_shards:
        raise ValueError(
            f"Cannot shard {len(files)} files over {shard_info.num_shards} hosts at the file "
            "level; call get_dataset without shard_info and shard the records instead.")
    return files[shard_info.index::shard_info.num_shards]


class _KindSource(seqio.DataSource):
    """A DataSource of one record kind whose shards are files, listed per split."""

    def __init__(self, kind: str, splits: Sequence[str]):
        record_schema.check_kind(kind)
        self._kind = kind
        super().__init__(splits=tuple(splits), caching_permitted=False)

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def _check_split(self, split: str, known) -> None:
        if split not in known:
            raise ValueError(f"Split {split!r} unknown; this source has {sorted(known)}.")


class RecordFileSource(_KindSource):
    """Prepared TFRecord shards of one kind: `split_patterns[split]` is a glob."""

    def __init__(self, kind: str, split_patterns: Mapping[str, str]):
        self._patterns = dict(split_patterns)
        super().__init__(kind, self._patterns)

    def list_shards(self, split: str) -> Sequence[str]:
        self._check_split(split, self._patterns)
        files = sorted(tf.io.gfile.glob(self._patterns[split]))
        if not files:
            raise FileNotFoundError(
                f"No TFRecord files match {self._patterns[split]!r}; run flamingo-prepare first.")
        return files

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: Optional[int] = 1) -> tf.data.Dataset:
        files = _files_for_host(self.list_shards(split), shard_info)
        scans = [scan_tfrecord(f) for f in files]
        truncated_record = record_schema.to_tf_example(
            self._kind, record_schema.placeholder(self._kind, "", bad_input.TRUNCATED_FILE))

        def read(path, count, truncated):
            flag = tf.data.Dataset.from_tensors(tf.constant(truncated_record)).repeat(truncated)
            return tf.data.TFRecordDataset(path).take(count).concatenate(flag)

        ds = tf.data.Dataset.from_tensor_slices((
            files, [c for c, _ in scans], [int(t) for _, t in scans]))
        if shuffle:
            ds = ds.shuffle(len(files), seed=seed)
        ds = ds.interleave(lambda p, c, t: read(p, tf.cast(c, tf.int64), tf.cast(t, tf.int64)),
                           cycle_length=min(len(files), 8), block_length=1,
                           num_parallel_calls=AUTOTUNE, deterministic=True)
        return ds.map(lambda s: record_schema.parse_tf_example(self._kind, s),
                      num_parallel_calls=AUTOTUNE)


def _as_arrays(kind: str, record: dict) -> dict:
    """Reader dict -> numpy values matching record_schema.output_signature(kind)."""
    out = {}
    for name, spec in record_schema.output_signature(kind).items():
        value = record[name]
        if spec.dtype == tf.int64:
            out[name] = np.asarray(value, dtype=np.int64).reshape([-1] if spec.shape.rank else [])
        elif spec.shape.rank:
            out[name] = np.array([v.encode("utf-8") if isinstance(v, str) else v for v in value],
                                 dtype=object).reshape([-1])
        else:
            out[name] = value.encode("utf-8") if isinstance(value, str) else value
    return out


class ReaderSource(_KindSource):
    """Raw files of one kind read by `read_shard(path) -> Iterator[record]`."""

    def __init__(self, kind: str, split_shards: Mapping[str, Callable[[], Sequence[str]]],
                 read_shard: Callable[[str], Iterator[dict]], cycle_length: int = 4):
        self._split_shards = dict(split_shards)
        self._read_shard = read_shard
        self._cycle_length = cycle_length
        super().__init__(kind, self._split_shards)

    def list_shards(self, split: str) -> Sequence[str]:
        self._check_split(split, self._split_shards)
        return list(self._split_shards[split]())

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: Optional[int] = 1) -> tf.data.Dataset:
        files = _files_for_host(self.list_shards(split), shard_info)
        signature = record_schema.output_signature(self._kind)
        kind, read_shard = self._kind, self._read_shard

        def generate(path):
            path = path.decode("utf-8") if isinstance(path, bytes) else str(path)
            for record in read_shard(path):
                yield _as_arrays(kind, record)

        ds = tf.data.Dataset.from_tensor_slices(files)
        if shuffle:
            ds = ds.shuffle(len(files), seed=seed)
        return ds.interleave(
            lambda p: tf.data.Dataset.from_generator(generate, args=(p,),
                                                     output_signature=signature),
            cycle_length=min(len(files), self._cycle_length), block_length=1,
            num_parallel_calls=AUTOTUNE, deterministic=True)

