"""Round trip: synthetic MMC4 document -> prepare -> Task -> batch -> back to its source.

The expected text is rebuilt here from the raw jsonl with the rules of SPEC §3.5,
independently of the pipeline code: <EOC> ends every text chunk that an <image> follows
and the last chunk; an <image> right after <BOS> has no <EOC> before it.
"""

import json
import os
import re

import numpy as np
import tensorflow as tf

from data_pipelines import image_ops
from data_pipelines import mixture_iterator
from data_pipelines import mmc4
from data_pipelines import tasks as tasks_lib
from test_data_fixtures import IMAGE_SIZE, NUM_DOCS
from test_data_fixtures import data_world  # noqa: F401  (pytest fixture)

_SPECIAL = r"(<BOS>|<EOS>|<image>|<EOC>)"


def _spec_text(texts, image_info, max_media=5):
    """<BOS>text<EOC><image>text<EOC>...<EOS> with <image>s beyond the 5th left out."""
    before = {}
    for info in image_info:
        before.setdefault(info["matched_text_index"], []).append(info)
    out, chunk, num_images = ["<BOS>"], [], 0
    for j, text in enumerate(texts):
        for _ in before.get(j, []):
            if chunk:
                out.append(" ".join(chunk) + "<EOC>")
                chunk = []
            num_images += 1
            if num_images <= max_media:
                out.append("<image>")
        chunk.append(text)
    if chunk:
        out.append(" ".join(chunk) + "<EOC>")
    out.append("<EOS>")
    return "".join(out), min(num_images, max_media)


def _normalize(text):
    """SentencePiece puts a space before a chunk's first word; ignore spaces at specials."""
    return re.sub(r"\s*" + _SPECIAL + r"\s*", r"\1", text).strip()


def test_mmc4_document_round_trips_through_prepare_task_and_batch(data_world):
    vocab = data_world.vocab
    config = data_world.task_config("roundtrip_m3w", "m3w_tfrecord", train=False, text_length=512)
    tasks_lib.register_task(config, vocab)
    it = mixture_iterator.TaskBatchIterator(tasks_lib.mixture_tasks("roundtrip_m3w")[0], 4,
                                            shuffle=False, num_epochs=1, with_keys=True)
    raw = {}
    for shard in mmc4.list_shards(data_world.raw["mmc4"]):
        with open(shard) as f:
            for line_no, line in enumerate(f):
                raw[f"{os.path.basename(shard)}:{line_no}"] = json.loads(line)
    images_dir = os.path.join(data_world.raw["mmc4"], "images")
    seen = 0
    for batch in it:
        for i, key in enumerate(batch["key"]):
            if not key:
                continue  # zero padding of the last batch
            doc = raw[key.decode()]
            expected_text, num_media = _spec_text(doc["text_list"], doc["image_info"])
            # tokens = <BOS> + targets[:-1]: the full sequence is <BOS> + targets.
            full = [vocab.bos_id] + batch["targets"][i].tolist()
            assert _normalize(vocab.decode_with_special_tokens(full)) == _normalize(expected_text)
            assert batch["media_mask"][i].tolist() == [1] * num_media + [0] * (5 - num_media)
            ordered = sorted(doc["image_info"], key=lambda info: info["matched_text_index"])
            for k, info in enumerate(ordered[:num_media]):
                with open(os.path.join(images_dir, info["image_name"]), "rb") as f:
                    source = image_ops.decode_image(tf.constant(f.read()))
                expected = image_ops.preprocess_image(source, IMAGE_SIZE).numpy()
                np.testing.assert_allclose(batch["media"][i, k, 0], expected, atol=1e-6)
            assert not batch["media"][i, num_media:].any()
            assert batch["assoc_next"][i] == 0  # evaluation: no p_next
            seen += 1
    assert seen == NUM_DOCS
    assert sum(it.bad_input_counts().values()) == 0


def test_spec_text_helper_places_eoc_as_the_spec_says():
    texts = ["intro", "about one", "about two", "outro"]
    info = [{"matched_text_index": 1}, {"matched_text_index": 2}]
    assert _spec_text(texts, info)[0] == (
        "<BOS>intro<EOC><image>about one<EOC><image>about two outro<EOC><EOS>")
    starts_with_image = [{"matched_text_index": 0}]
    assert _spec_text(["caption"], starts_with_image)[0] == "<BOS><image>caption<EOC><EOS>"
