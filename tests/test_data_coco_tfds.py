"""The TFDS coco_captions source, under tfds.testing.mock_data (no download).

mock_data's random example generator cannot build coco's `objects` sequence (it draws
a different length per sub-feature), so the mock is given `as_dataset_fn`: it encodes
and serializes synthetic COCO-like examples with the dataset's own FeaturesDict and
decodes them with the decoders the caller passed, i.e. TFDS's real read path.
"""

import contextlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import coco_tfds
from data_pipelines import image_ops
from data_pipelines import mixture_iterator
from data_pipelines import tasks as tasks_lib
from data_pipelines import synthetic
from test_data_fixtures import data_world  # noqa: F401  (pytest fixture)


def _coco_example(i: int) -> dict:
    pixels, caption, _ = synthetic.pair_example(seed=9, index=i, image_size=24)
    return {
        "image": pixels,
        "image/filename": f"COCO_train2014_{i:012d}.jpg",
        "image/id": 1000 + i,
        "objects": {"area": [], "bbox": np.zeros((0, 4), np.float32), "id": [], "is_crowd": [],
                    "label": []},
        "captions": {"id": [10 * i, 10 * i + 1], "text": [caption, "an image of " + caption]},
    }


@contextlib.contextmanager
def _mock_coco(num_examples: int):
    def as_dataset(self, split, decoders=None, **kwargs):
        features = self.info.features
        serialized = [features.serialize_example(_coco_example(i)) for i in range(num_examples)]
        return tf.data.Dataset.from_tensor_slices(serialized).map(
            lambda s: features.deserialize_example(s, decoders=decoders))

    with tfds.testing.mock_data(num_examples=num_examples, as_dataset_fn=as_dataset):
        yield


def test_coco_captions_source_yields_pairs_records_under_mock_data():
    with _mock_coco(3):
        ds = coco_tfds.CocoCaptionsSource().get_dataset(split="train", shuffle=False)
        records = list(ds.as_numpy_iterator())
    assert len(records) == 3
    for i, r in enumerate(records):
        pixels, caption, _ = synthetic.pair_example(seed=9, index=i, image_size=24)
        assert r["key"] == str(1000 + i).encode() and r["bad"] == b""
        assert r["captions"].tolist() == [caption.encode(), b"an image of " + caption.encode()]
        # Still encoded (SkipDecoding): the pipeline decodes it like every other source.
        assert isinstance(r["image"], bytes)
        decoded = image_ops.decode_image(r["image"]).numpy().astype(int)
        assert decoded.shape == pixels.shape and np.abs(decoded - pixels).mean() < 6


def test_coco_captions_task_batches_under_mock_data(data_world):
    vocab = data_world.vocab
    config = tasks_lib.TaskConfig("coco_mock", "pairs", "tfds_coco", image_size=16, text_length=64,
                                  train=False)
    tasks_lib.register_task(config, vocab)
    with _mock_coco(6):
        it = mixture_iterator.make_task_iterators("coco_mock", 4, shuffle=False, num_epochs=1,
                                                  with_keys=True)
        batches = [b["coco_mock"] for b in it]
    assert sum(it.bad_input_counts()["coco_mock"].values()) == 0
    keys = [k for b in batches for k in b["key"] if k]
    assert keys == [str(1000 + i).encode() for i in range(6)]
    for b in batches:
        assert b["tokens"].shape == (4, 64) and b["media"].shape == (4, 1, 1, 16, 16, 3)
        for i, key in enumerate(b["key"]):
            if not key:
                continue
            tokens, targets = b["tokens"][i], b["targets"][i]
            n = int((targets != 0).sum())
            assert tokens[:2].tolist() == [vocab.bos_id, vocab.image_id]
            assert targets[n - 2:n].tolist() == [vocab.eoc_id, vocab.eos_id]
            caption = synthetic.pair_example(seed=9, index=int(key) - 1000, image_size=24)[1]
            assert vocab.decode(targets[1:n - 2].tolist()) == caption  # eval: the first caption
            assert b["media_mask"][i].tolist() == [1]
            assert np.isfinite(b["media"][i]).all() and np.abs(b["media"][i]).max() > 0
