"""Feature-converter contract: shapes, shifts, loss weights, <image> count == media count."""

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import mixture_iterator
from data_pipelines import preprocessors as prep
from data_pipelines import tasks as tasks_lib
from test_data_fixtures import IMAGE_SIZE
from test_data_fixtures import data_world  # noqa: F401  (pytest fixture)


def _check_contract(batch, vocab, length, max_media, frames):
    b = batch["tokens"].shape[0]
    assert batch["tokens"].shape == (b, length) and batch["tokens"].dtype == np.int32
    assert batch["targets"].shape == (b, length) and batch["targets"].dtype == np.int32
    assert batch["loss_weights"].shape == (b, length) and batch["loss_weights"].dtype == np.float32
    assert batch["media"].shape == (b, max_media, frames, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["media"].dtype == np.float32
    assert batch["media_mask"].shape == (b, max_media) and batch["media_mask"].dtype == np.int32
    assert batch["assoc_next"].shape == (b,) and batch["assoc_next"].dtype == np.int32
    for i in range(b):
        tokens, targets, weights = batch["tokens"][i], batch["targets"][i], batch["loss_weights"][i]
        mask = batch["media_mask"][i]
        assert tokens[0] == vocab.bos_id
        n = int((targets != 0).sum())
        assert (targets[n:] == 0).all() and (tokens[n:] == 0).all()  # right padding
        np.testing.assert_array_equal(tokens[1:n], targets[:n - 1])  # shifted by one
        expected_weights = (targets != 0) & (targets != vocab.image_id)
        np.testing.assert_array_equal(weights, expected_weights.astype(np.float32))
        # The invariant the model relies on.
        assert int((tokens == vocab.image_id).sum()) == int(mask.sum())
        assert (mask == np.sort(mask)[::-1]).all()  # real media first
        for k in np.flatnonzero(mask):
            assert np.abs(batch["media"][i, k]).max() > 0
        assert not batch["media"][i][mask == 0].any()


@pytest.mark.parametrize("which,length,max_media,frames", [
    ("m3w_raw", 48, 5, 1),        # short windows: truncation, >5 images, trailing <image>
    ("m3w_tfrecord", 256, 5, 1),
    ("pairs_tfrecord", 12, 1, 1),  # captions cut to fit
    ("vtp_raw", 32, 1, 8),
])
def test_every_example_satisfies_the_model_contract(data_world, which, length, max_media, frames):
    vocab = data_world.vocab
    name = f"contract_{which}_{length}"
    tasks_lib.register_task(data_world.task_config(name, which, text_length=length), vocab)
    it = mixture_iterator.make_task_iterators(name, 8, seed=1)
    assoc = []
    for _ in range(6):
        batch = next(it)[name]
        _check_contract(batch, vocab, length, max_media, frames)
        assoc.extend(batch["assoc_next"].tolist())
    if which.startswith("m3w"):
        assert set(assoc) == {0, 1}  # p_next = 1/2 per document
    else:
        assert set(assoc) == {0}
    if which == "pairs_tfrecord":
        assert (batch["targets"][:, length - 2:] != 0).any()  # some captions filled the window
    it.close()


def _window(body, length, max_media, image_id, start):
    ds = tf.data.Dataset.from_tensors({"_tokens": tf.constant(body, tf.int32),
                                       "images": tf.constant([b"i0", b"i1", b"i2", b"i3"]),
                                       "_seed": tf.constant([0, 0], tf.int64)})
    ds = prep.window_interleaved(ds, {"targets": length, "media": max_media}, image_id,
                                 random_window=False)
    ex = next(iter(ds))
    return ex["targets"].numpy().tolist(), ex["_media_bytes"].numpy()[:, 0].tolist()


def test_window_keeps_the_first_media_and_drops_extra_and_trailing_images():
    img, eos = 99, 1
    body = [img, 10, 11, img, 12, img, 13, img, 14, eos]
    targets, media = _window(body, length=20, max_media=2, image_id=img, start=0)
    assert targets == [img, 10, 11, img, 12, 13, 14, eos]  # 3rd and 4th <image> dropped
    assert media == [b"i0", b"i1"]
    targets, media = _window(body, length=4, max_media=5, image_id=img, start=0)
    assert targets == [img, 10, 11]  # the <image> ending the window is dropped
    assert media == [b"i0"]


def test_interleaved_tokens_follow_the_spec_layout(data_world):
    vocab = data_world.vocab
    texts = tf.constant(["intro", "one", "two", "outro"])
    ids = prep.interleaved_tokens(texts, tf.constant([1, 2], tf.int64), vocab).numpy().tolist()
    expected = (vocab.encode("intro") + [vocab.eoc_id, vocab.image_id] + vocab.encode("one")
                + [vocab.eoc_id, vocab.image_id] + vocab.encode("two outro")
                + [vocab.eoc_id, vocab.eos_id])
    assert ids == expected
    ids = prep.interleaved_tokens(tf.constant(["cap"]), tf.constant([0], tf.int64), vocab)
    expected = [vocab.image_id] + vocab.encode("cap") + [vocab.eoc_id, vocab.eos_id]
    assert ids.numpy().tolist() == expected
