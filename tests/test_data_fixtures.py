"""Shared, build-once data for the tests/test_data_*.py modules (holds no tests).

`data_world` writes a small synthetic world once per pytest session (raw MMC4 /
WebDataset / video files at 32 px, eval sets, a SentencePiece model, prepared
TFRecords) under the session's base temp dir; every module that imports the fixture
reuses it through the DONE marker, so it is built once even though pytest registers
the fixture per importing module.
"""

import dataclasses
import json
import os
import pathlib

import pytest

from data_pipelines import prepare
from data_pipelines import synthetic
from data_pipelines import tasks as tasks_lib
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines import train_tokenizer

IMAGE_SIZE = 32
NUM_DOCS, NUM_PAIRS, NUM_CLIPS, NUM_EVAL = 24, 40, 8, 4


@dataclasses.dataclass(frozen=True)
class DataWorld:
    root: pathlib.Path
    raw: dict            # name -> raw dataset directory (synthetic.write_all)
    prepared: dict       # "m3w" | "pairs" | "vtp" -> TFRecord directory
    prepare_stats: dict  # same keys -> stats json
    spm_model: str

    @property
    def vocab(self) -> tokenizer_lib.FlamingoVocabulary:
        return tokenizer_lib.load_vocabulary(self.spm_model)

    def task_config(self, name: str, which: str, **overrides) -> tasks_lib.TaskConfig:
        """TaskConfig for one of the world's datasets; `which` e.g. 'm3w_tfrecord'."""
        kind, source, path = {
            "m3w_tfrecord": ("interleaved", "tfrecord", self.prepared["m3w"]),
            "m3w_raw": ("interleaved", "mmc4", self.raw["mmc4"]),
            "pairs_tfrecord": ("pairs", "tfrecord", self.prepared["pairs"]),
            "pairs_raw": ("pairs", "webdataset", self.raw["webdataset"]),
            "vtp_tfrecord": ("video", "tfrecord", self.prepared["vtp"]),
            "vtp_raw": ("video", "video", self.raw["video"]),
        }[which]
        fields = {"image_size": IMAGE_SIZE, "shuffle_buffer_size": 16}
        fields.update(overrides)
        return tasks_lib.TaskConfig(name, kind, source, str(path), **fields)


def build_data_world(base: pathlib.Path) -> DataWorld:
    root = base / "data_world"
    raw = {
        "mmc4": str(root / "raw" / "mmc4"),
        "webdataset": str(root / "raw" / "webdataset"),
        "video": str(root / "raw" / "video"),
        "coco_eval": str(root / "raw" / "eval" / "coco"),
        "vqav2_eval": str(root / "raw" / "eval" / "vqav2"),
        "corpus": str(root / "raw" / "corpus.txt"),
    }
    prepared = {k: str(root / "prepared" / k) for k in ("m3w", "pairs", "vtp")}
    spm_model = str(root / "spm.model")
    if not (root / "DONE").exists():
        synthetic.write_all(str(root / "raw"), seed=0, image_size=IMAGE_SIZE, num_docs=NUM_DOCS,
                            num_pairs=NUM_PAIRS, num_clips=NUM_CLIPS, num_eval=NUM_EVAL,
                            num_shards=2)
        train_tokenizer.train_sentencepiece([raw["corpus"]], str(root / "spm"), vocab_size=500)
        for name, source in (("m3w", "mmc4"), ("pairs", "webdataset"), ("vtp", "video")):
            prepare.prepare(source, raw[source], prepared[name], split="train", num_shards=2)
        (root / "DONE").write_text("ok")
    stats = {}
    for name, path in prepared.items():
        with open(os.path.join(path, "train.stats.json")) as f:
            stats[name] = json.load(f)
    return DataWorld(root, raw, prepared, stats, spm_model)


@pytest.fixture(scope="session")
def data_world(tmp_path_factory) -> DataWorld:
    return build_data_world(tmp_path_factory.getbasetemp())
