"""TFDS `coco_captions` (Karpathy splits of COCO 2014) as a source of image-text pairs.

Images are read still encoded (`tfds.decode.SkipDecoding`), so they go through the same
decode/resize/augment path as every other pair source. Each TFDS example becomes a
pairs record (record_schema.PAIRS) whose `captions` are its (usually 5) reference
captions; training picks one at random per example, evaluation the first.
TFDS splits: train, val, test, restval.
"""

from typing import Mapping, Optional

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

DEFAULT_TFDS_NAME = "coco_captions/2014:1.1.0"


class CocoCaptionsSource(seqio.TfdsDataSource):
    """seqio TfdsDataSource over coco_captions that yields pairs records."""

    def __init__(self, tfds_name: str = DEFAULT_TFDS_NAME, tfds_data_dir: Optional[str] = None,
                 splits: Optional[Mapping[str, str]] = None):
        super().__init__(
            tfds_name=tfds_name,
            tfds_data_dir=tfds_data_dir,
            splits=splits or {"train": "train", "validation": "val", "test": "test"},
            caching_permitted=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )

    @property
    def kind(self) -> str:
        return "pairs"

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: Optional[int] = 1) -> tf.data.Dataset:
        ds = super().get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info)
        return ds.map(to_pair_record, num_parallel_calls=tf.data.AUTOTUNE)


def to_pair_record(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """TFDS coco_captions example -> pairs record."""
    return {
        "key": tf.strings.as_string(ex["image/id"]),
        "captions": tf.reshape(ex["captions"]["text"], [-1]),
        "image": ex["image"],
        "bad": tf.constant(""),
    }
