"""Bad input is skipped and counted by reason; batches keep their shape."""

import json
import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import bad_input
from data_pipelines import mixture_iterator
from data_pipelines import prepare
from data_pipelines import record_schema
from data_pipelines import synthetic
from data_pipelines import tasks as tasks_lib
from test_data_fixtures import data_world  # noqa: F401  (pytest fixture)


def _jpeg(seed: int) -> bytes:
    pixels, _, _ = synthetic.pair_example(seed, 0, 16)
    return synthetic.encode_image(pixels, "jpg")


def _png(seed: int) -> bytes:
    pixels, _, _ = synthetic.pair_example(seed, 0, 16)
    return synthetic.encode_image(pixels, "png")


def _tar(path, samples):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                synthetic.write_tar_member(tar, f"{key}.{ext}", data)


def _faulty_webdataset(directory) -> tuple[set, dict]:
    """Two tar shards with injected faults; returns (valid keys, expected counts)."""
    os.makedirs(directory, exist_ok=True)
    good = lambda i: {"jpg": _jpeg(i), "txt": f"caption {i}".encode()}  # noqa: E731
    shard0 = [
        ("g0", good(0)),
        ("corrupt_jpeg", {"jpg": _jpeg(1)[:60], "txt": b"cut image"}),     # truncated JPEG
        ("g1", good(2)),
        ("garbage", {"jpg": os.urandom(200), "txt": b"not an image"}),
        ("empty1", {"jpg": _jpeg(3), "txt": b"   "}),
        ("g2", good(4)),
        ("empty2", {"jpg": _jpeg(5), "txt": b""}),
        ("latin1", {"jpg": _jpeg(6), "txt": "caf\xe9".encode("latin-1")}),  # not UTF-8
        ("noimage", {"txt": b"text without its image"}),
        ("g3", good(7)),
        ("corrupt_png", {"png": _png(8)[:-30], "txt": b"cut png"}),        # magic ok, cut
    ]
    _tar(os.path.join(directory, "shard-0.tar"), shard0)
    shard1 = [(f"h{i}", good(10 + i)) for i in range(4)]
    path1 = os.path.join(directory, "shard-1.tar")
    _tar(path1, shard1)
    # Truncate shard 1 inside the image of its third sample: h0, h1 survive.
    with open(path1, "rb") as f:
        data = f.read()
    cut = data.index(_jpeg(12)) + 100
    with open(path1, "wb") as f:
        f.write(data[:cut])
    valid = {"shard-0.tar:g0", "shard-0.tar:g1", "shard-0.tar:g2", "shard-0.tar:g3",
             "shard-1.tar:h0", "shard-1.tar:h1"}
    expected = {r: 0 for r in bad_input.REASONS}
    expected.update({"undecodable_image": 3, "empty_text": 2, "non_utf8_text": 1,
                     "missing_file": 1, "truncated_file": 1})
    return valid, expected


def _finite_keys(data_world, name, config, batch_size=4):
    tasks_lib.register_task(config, data_world.vocab)
    it = mixture_iterator.make_task_iterators(name, batch_size, shuffle=False, num_epochs=1,
                                              with_keys=True)
    keys, shapes = [], set()
    for batch in it:
        shapes.add(tuple(v.shape for k, v in sorted(batch[name].items()) if k != "key"))
        keys.extend(k.decode() for k in batch[name]["key"] if k)
    return keys, it.bad_input_counts()[name], shapes


def test_faulty_webdataset_shards_yield_exactly_the_valid_examples(data_world, tmp_path):
    valid, expected = _faulty_webdataset(tmp_path / "wds")
    config = tasks_lib.TaskConfig("faulty_wds", "pairs", "webdataset", str(tmp_path / "wds"),
                                  image_size=16, train=False)
    keys, counts, shapes = _finite_keys(data_world, "faulty_wds", config)
    assert sorted(keys) == sorted(valid)
    assert counts == expected
    assert len(shapes) == 1  # the last, partial batch was padded to the same shape


def test_prepare_leaves_out_and_counts_the_same_faults(data_world, tmp_path):
    valid, expected = _faulty_webdataset(tmp_path / "wds")
    stats = prepare.prepare("webdataset", str(tmp_path / "wds"), str(tmp_path / "out"),
                            num_shards=2)
    assert stats["examples"] == len(valid)
    assert stats["bad_input"] == expected
    with open(tmp_path / "out" / "train.stats.json") as f:
        assert json.load(f)["bad_input"] == expected


def _write_records(path, records):
    with tf.io.TFRecordWriter(str(path)) as w:
        for r in records:
            w.write(record_schema.to_tf_example("pairs", r))


def test_faulty_tfrecord_shards_are_counted_in_the_graph(data_world, tmp_path):
    def pair(key, image, captions):
        return {"key": key, "captions": captions, "image": image, "bad": ""}

    _write_records(tmp_path / "train-00000-of-00002.tfrecord", [
        pair("a", _jpeg(0), ["fine"]),
        pair("empty", _jpeg(1), ["  ", ""]),
        pair("b", _jpeg(2), ["fine too"]),
        pair("notimage", b"plain bytes", ["x"]),
        pair("latin1", _jpeg(3), [b"caf\xe9"]),
        pair("noimage", b"", ["no image"]),
        pair("c", _jpeg(4), ["", "second caption is usable"]),
        pair("cutpng", _png(5)[:-40], ["decode fails inside the graph"]),  # last: gap at the end
    ])
    _write_records(tmp_path / "train-00001-of-00002.tfrecord",
                   [pair(f"t{i}", _jpeg(10 + i), [f"t {i}"]) for i in range(3)])
    path = tmp_path / "train-00001-of-00002.tfrecord"
    data = path.read_bytes()
    path.write_bytes(data[:-25])  # cut inside the last record: t0 and t1 survive
    config = tasks_lib.TaskConfig("faulty_tfr", "pairs", "tfrecord", str(tmp_path), image_size=16,
                                  train=False)
    keys, counts, shapes = _finite_keys(data_world, "faulty_tfr", config, batch_size=2)
    assert sorted(keys) == ["a", "b", "c", "t0", "t1"]
    expected = {r: 0 for r in bad_input.REASONS}
    expected.update({"empty_text": 1, "undecodable_image": 2, "non_utf8_text": 1,
                     "no_media": 1, "truncated_file": 1})
    assert counts == expected
    assert len(shapes) == 1


def test_mmc4_drops_bad_images_but_keeps_the_document(data_world, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, data in (("ok0.png", _png(0)), ("ok1.png", _png(1)), ("bad.png", b"\x89PNG broken")):
        (images / name).write_bytes(data)
    info = lambda name, j: {"image_name": name, "matched_text_index": j}  # noqa: E731
    lines = [
        json.dumps({"text_list": ["first", "second", "third"],
                    "image_info": [info("ok0.png", 0), info("missing.png", 1), info("bad.png", 1),
                                   info("ok1.png", 2)]}).encode(),
        json.dumps({"text_list": ["  "], "image_info": [info("ok0.png", 0)]}).encode(),
        b'{"text_list": ["caf\xe9"], "image_info": []}',
        json.dumps({"text_list": ["only text"], "image_info": [info("missing2.png", 0)]}).encode(),
        json.dumps({"text_list": ["good doc"], "image_info": [info("ok1.png", 0)]}).encode(),
        b'{"text_list": ["cut', # the file ends inside its last line
    ]
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines))
    config = tasks_lib.TaskConfig("faulty_mmc4", "interleaved", "mmc4", str(tmp_path),
                                  image_size=16, train=False)
    keys, counts, _ = _finite_keys(data_world, "faulty_mmc4", config, batch_size=2)
    assert sorted(keys) == ["docs.jsonl:0", "docs.jsonl:4"]
    expected = {r: 0 for r in bad_input.REASONS}
    expected.update({"missing_file": 2, "undecodable_image": 1, "empty_text": 1,
                     "non_utf8_text": 1, "no_media": 1, "truncated_file": 1})
    assert counts == expected


def test_video_arrays_with_the_wrong_dtype_are_skipped(data_world, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    np.save(clips / "good.npy", frames)
    np.save(clips / "float.npy", frames.astype(np.float32))
    entries = [{"key": "good", "caption": "a red circle moving up.", "array": "clips/good.npy"},
               {"key": "float", "caption": "x", "array": "clips/float.npy"},
               {"key": "gone", "caption": "x", "frames_dir": "clips/nothing_here"}]
    (tmp_path / "index.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    config = tasks_lib.TaskConfig("faulty_video", "video", "video", str(tmp_path), image_size=16,
                                  num_frames=4, train=False)
    keys, counts, _ = _finite_keys(data_world, "faulty_video", config, batch_size=2)
    assert keys == ["index.jsonl:good"]
    assert counts["wrong_dtype"] == 1 and counts["missing_file"] == 1


def test_training_stream_over_faults_keeps_fixed_shapes_and_counts_per_epoch(data_world, tmp_path):
    valid, expected = _faulty_webdataset(tmp_path / "wds")
    config = tasks_lib.TaskConfig("faulty_train", "pairs", "webdataset", str(tmp_path / "wds"),
                                  image_size=16, shuffle_buffer_size=4)
    tasks_lib.register_task(config, data_world.vocab)
    it = mixture_iterator.make_task_iterators("faulty_train", 4, seed=0)
    for _ in range(9):  # 36 examples: 6 epochs of the 6 valid examples
        batch = next(it)["faulty_train"]
        assert batch["tokens"].shape == (4, 32) and batch["media"].shape == (4, 1, 1, 16, 16, 3)
        assert (batch["loss_weights"].sum(axis=1) > 0).all()  # no padding rows in training
    counts = it.bad_input_counts()["faulty_train"]
    it.close()
    epochs = counts["truncated_file"]
    assert epochs >= 5
    for reason, n in expected.items():
        assert counts[reason] in (n * epochs, n * (epochs - 1), n * (epochs + 1))


def test_unknown_reason_is_rejected():
    with pytest.raises(ValueError, match="Unknown bad-input reason"):
        bad_input.BadInputCounter().add("cosmic_rays")
