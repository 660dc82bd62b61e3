"""The data command lines: synthetic generator and flamingo-prepare."""

import json
import os

from data_pipelines import prepare
from data_pipelines import synthetic


def test_synthetic_and_prepare_commands(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert synthetic.main(["--output_dir", str(raw), "--image_size", "16", "--num_docs", "3",
                           "--num_pairs", "5", "--num_clips", "2", "--num_eval", "2",
                           "--num_shards", "1"]) == 0
    for name in ("mmc4", "webdataset", "video", "corpus.txt"):
        assert os.path.exists(raw / name)
    out = tmp_path / "prepared"
    assert prepare.main(["--source", "webdataset", "--input", str(raw / "webdataset"),
                         "--output_dir", str(out), "--num_shards", "2"]) == 0
    assert "wrote 5 examples" in capsys.readouterr().out
    with open(out / "train.stats.json") as f:
        stats = json.load(f)
    assert [s["examples"] for s in stats["shards"]] == [3, 2]
    assert sorted(os.listdir(out)) == ["train-00000-of-00002.tfrecord",
                                       "train-00001-of-00002.tfrecord", "train.stats.json"]
