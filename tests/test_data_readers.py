"""Readers of the raw formats return what the synthetic generator wrote; prepare keeps it."""

import io
import json
import os

import numpy as np
from PIL import Image
import tensorflow as tf

from data_pipelines import mmc4
from data_pipelines import record_schema
from data_pipelines import synthetic
from data_pipelines import video
from data_pipelines import webdataset
from test_data_fixtures import IMAGE_SIZE, NUM_CLIPS, NUM_DOCS, NUM_PAIRS
from test_data_fixtures import data_world  # noqa: F401  (pytest fixture)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _records(module, path):
    return [r for shard in module.list_shards(path) for r in module.read_shard(shard)]


def test_mmc4_reader_returns_the_documents_with_their_images(data_world):
    records = _records(mmc4, data_world.raw["mmc4"])
    assert len(records) == NUM_DOCS and all(r["bad"] == "" for r in records)
    for r in records:
        shard, line = r["key"].split(":")
        shard_index = int(shard.split("-")[1])
        doc_index = int(line) * 2 + shard_index  # write_mmc4 deals documents round-robin
        texts, images, _ = synthetic.mmc4_document(0, doc_index, IMAGE_SIZE)
        assert r["texts"] == texts
        assert r["image_text_index"] == [j for _, j in images]
        for data, (pixels, _) in zip(r["images"], images):
            np.testing.assert_array_equal(_pixels(data), pixels)  # PNG: lossless


def test_webdataset_reader_returns_pairs(data_world):
    records = _records(webdataset, data_world.raw["webdataset"])
    assert len(records) == NUM_PAIRS
    for r in records:
        index = int(r["key"].split(":")[1])
        pixels, text, _ = synthetic.pair_example(0, index, IMAGE_SIZE)
        assert r["captions"] == [text]
        decoded = _pixels(r["image"]).astype(int)
        assert decoded.shape == pixels.shape
        assert np.abs(decoded - pixels).mean() < 4  # JPEG q95, 4:4:4


def test_video_reader_reads_frame_folders_and_arrays_alike(data_world):
    records = _records(video, data_world.raw["video"])
    assert len(records) == NUM_CLIPS
    for r in records:
        index = int(r["key"].split("clip")[-1])
        frames, text, _ = synthetic.video_clip(0, index, IMAGE_SIZE, 8)
        assert r["captions"] == [text] and len(r["frames"]) == 8
        for data, frame in zip(r["frames"], frames):
            np.testing.assert_array_equal(_pixels(data), frame)
    for shard in video.list_shards(data_world.raw["video"]):
        with open(shard) as f:
            kinds = {("array" in json.loads(l)) for l in f}
        assert kinds == {True, False}  # both storage forms are exercised in every shard


def test_prepared_tfrecords_hold_exactly_the_reader_records(data_world):
    raw = {r["key"]: r for r in _records(mmc4, data_world.raw["mmc4"])}
    stats = data_world.prepare_stats["m3w"]
    assert stats["examples"] == NUM_DOCS and sum(stats["bad_input"].values()) == 0
    assert [s["examples"] for s in stats["shards"]] == [NUM_DOCS // 2, NUM_DOCS // 2]
    seen = set()
    for shard in stats["shards"]:
        for serialized in tf.data.TFRecordDataset(shard["path"]).as_numpy_iterator():
            parsed = record_schema.parse_tf_example("interleaved", tf.constant(serialized))
            key = parsed["key"].numpy().decode()
            seen.add(key)
            assert [t.decode() for t in parsed["texts"].numpy()] == raw[key]["texts"]
            assert list(parsed["images"].numpy()) == raw[key]["images"]  # bytes unchanged
            assert parsed["image_text_index"].numpy().tolist() == raw[key]["image_text_index"]
    assert seen == set(raw)
    assert os.path.exists(os.path.join(data_world.prepared["m3w"], "train.stats.json"))
    assert data_world.prepare_stats["pairs"]["examples"] == NUM_PAIRS
    assert data_world.prepare_stats["vtp"]["examples"] == NUM_CLIPS


def test_raw_and_prepared_sources_give_identical_examples(data_world):
    from data_pipelines import mixture_iterator
    from data_pipelines import tasks as tasks_lib

    out = {}
    for which in ("vtp_raw", "vtp_tfrecord"):
        tasks_lib.register_task(data_world.task_config(f"same_{which}", which, train=False),
                                data_world.vocab)
        it = mixture_iterator.make_task_iterators(f"same_{which}", 4, shuffle=False, num_epochs=1,
                                                  with_keys=True)
        out[which] = {k: {f: b[f"same_{which}"][f][i] for f in ("tokens", "media", "media_mask")}
                      for b in it for i, k in enumerate(b[f"same_{which}"]["key"]) if k}
    assert len(out["vtp_raw"]) == NUM_CLIPS and out["vtp_raw"].keys() == out["vtp_tfrecord"].keys()
    for key, raw in out["vtp_raw"].items():
        for feature, value in raw.items():
            np.testing.assert_array_equal(value, out["vtp_tfrecord"][key][feature])
