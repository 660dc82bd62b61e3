"""The multimodal seqio FeatureConverter: task examples -> fixed-shape model features.

seqio's stock converters keep only text features; this one keeps the media. Per example:

    tokens        [L] int32    <BOS> + targets[:-1], right-padded with 0
    targets       [L] int32    next token of each position (tokens shifted by one)
    loss_weights  [L] float32  1 on real text targets; 0 on padding and on <image> targets
    media         [N, T, H, W, C] float32, zero-padded past the real media
    media_mask    [N] int32    1 = real media
    assoc_next    []  int32    1: text attends to the next image (0 for pairs, video)

Invariant (checked in-graph, a violation fails loudly): the number of <image> tokens in
`tokens` equals sum(media_mask). Task lengths: {"targets": L, "media": N}; T, H, W, C
are whatever the task produced and must be static.
Bookkeeping features `_index`, `_bad`, `_key` pass through for the batch assembler.
"""

from typing import Mapping

import seqio
import tensorflow as tf

from data_pipelines import preprocessors as prep

_Spec = seqio.FeatureConverter.FeatureSpec
PASSTHROUGH = {
    "_index": _Spec(dtype=tf.int64, rank=0),
    "_bad": _Spec(dtype=tf.int32, rank=0),
    "_key": _Spec(dtype=tf.string, rank=0),
}
MODEL_KEYS = ("tokens", "targets", "loss_weights", "media", "media_mask", "assoc_next")


class MultimodalFeatureConverter(seqio.FeatureConverter):
    """Pads text to L and media to N; builds inputs, targets and loss weights."""

    TASK_FEATURES = {
        "targets": _Spec(dtype=tf.int32, rank=1),
        "media": _Spec(dtype=tf.float32, rank=5),
        "assoc_next": _Spec(dtype=tf.int32, rank=0),
    }
    MODEL_FEATURES = {
        "tokens": _Spec(dtype=tf.int32, rank=1),
        "targets": _Spec(dtype=tf.int32, rank=1),
        "loss_weights": _Spec(dtype=tf.float32, rank=1),
        "media": _Spec(dtype=tf.float32, rank=5),
        "media_mask": _Spec(dtype=tf.int32, rank=1),
        "assoc_next": _Spec(dtype=tf.int32, rank=0),
    }
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, bos_id: int, image_id: int, pad_id: int = 0):
        # seqio's length checks add two asserting maps per example; `convert` already
        # fixes every output shape with ensure_shape, so they are skipped.
        super().__init__(pack=False, bos_id=bos_id, passthrough_features=PASSTHROUGH,
                         apply_length_check=False)
        self._image_id = image_id
        self._pad_id = pad_id

    def task_feature_lengths(self, text_length: int, max_media: int) -> dict[str, int]:
        """The `task_feature_lengths` argument for `__call__` (rank-0 entries are unused)."""
        lengths = {"targets": text_length, "media": max_media, "assoc_next": 1}
        lengths.update({k: 1 for k in PASSTHROUGH})
        return lengths

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        length, n = task_feature_lengths["targets"], task_feature_lengths["media"]
        lengths = {"tokens": length, "targets": length, "loss_weights": length, "media": n,
                   "media_mask": n, "assoc_next": 1}
        lengths.update({k: 1 for k in PASSTHROUGH})
        return lengths

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        length, max_media = task_feature_lengths["targets"], task_feature_lengths["media"]
        media_shape = ds.element_spec["media"].shape[1:]
        if not media_shape.is_fully_defined():
            raise ValueError(f"Task media must have static [T, H, W, C], got {media_shape}.")
        bos, image_id, pad = self.bos_id, self._image_id, self._pad_id

        def convert(ex):
            targets = ex["targets"]
            n = tf.shape(targets)[0]
            tokens = tf.concat([[bos], targets[:-1]], axis=0)
            real = tf.range(length) < n
            pad_len = [[0, length - n]]
            targets_p = tf.pad(targets, pad_len, constant_values=pad)
            tokens_p = tf.pad(tokens, pad_len, constant_values=pad)
            loss_weights = tf.cast(real & tf.not_equal(targets_p, image_id), tf.float32)
            media = ex["media"]
            num_media = tf.shape(media)[0]
            media_mask = tf.cast(tf.range(max_media) < num_media, tf.int32)
            num_image_tokens = tf.reduce_sum(tf.cast(tf.equal(tokens_p, image_id), tf.int32))
            check = tf.debugging.assert_equal(
                num_image_tokens, num_media,
                message="number of <image> tokens != number of media (a preprocessing bug)")
            with tf.control_dependencies([check]):
                media = tf.pad(media, [[0, max_media - num_media]] + [[0, 0]] * 4)
            out = {
                "tokens": tf.ensure_shape(tokens_p, [length]),
                "targets": tf.ensure_shape(targets_p, [length]),
                "loss_weights": tf.ensure_shape(loss_weights, [length]),
                "media": tf.ensure_shape(media, [max_media] + media_shape.as_list()),
                "media_mask": tf.ensure_shape(media_mask, [max_media]),
                "assoc_next": ex["assoc_next"],
            }
            out.update({k: ex[k] for k in PASSTHROUGH})
            return out

        return prep.map_examples(ds, convert)
