"""flamingo-train end to end on synthetic raw data: metrics.jsonl and resume (SPEC §8)."""

import json
import os

import pytest

from data_pipelines import synthetic, tokenizer, train_tokenizer
from experiments import demo
from flamingo_jax.train import train

METRIC_KEYS = {"step", "loss", "loss/m3w", "loss/pairs", "grad_norm", "lr", "tokens_per_sec",
               "examples_per_sec", "skipped_steps"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    paths = synthetic.write_all(root, seed=0, image_size=32, num_docs=24, num_pairs=48,
                                num_clips=2, num_frames=2, num_eval=2, num_shards=2)
    model = train_tokenizer.train_sentencepiece([paths["corpus"]], os.path.join(root, "spm"),
                                                vocab_size=300)
    return paths, model


def _config(data, num_steps):
    paths, spm_model = data
    config = demo.get_config()
    config.model.lm.vocab_size = tokenizer.load_vocabulary(spm_model).base_vocab_size
    config.model.lm.update(num_layers=2, max_length=64)
    config.model.resampler.num_layers = 1
    config.input.update(image_size=32, num_media=2, text_length=64)
    config.data.tokenizer = spm_model
    config.data.tasks = {
        "m3w": dict(kind="interleaved", source="mmc4", path=paths["mmc4"], batch_size=8,
                    text_length=64, max_media=2),
        "pairs": dict(kind="pairs", source="webdataset", path=paths["webdataset"],
                      batch_size=8, text_length=16),
    }
    config.train.task_weights = {"m3w": 1.0, "pairs": 0.2}
    config.train.update(num_steps=num_steps, log_every=2)
    config.optimizer.update(lr=1e-3, warmup_steps=2)
    config.checkpoint.save_every = 2
    return config


def test_train_writes_metrics_and_resumes(data, tmp_path):
    workdir = str(tmp_path / "run")
    train(_config(data, num_steps=4), workdir)
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [2, 4]
    assert METRIC_KEYS <= set(records[0])
    assert any(k.startswith("gate/xattn_0/") for k in records[0])
    assert all(r["skipped_steps"] == 0 and r["loss"] > 0 for r in records)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    # Same workdir, more steps: resumes at 4 instead of starting over.
    train(_config(data, num_steps=6), workdir)
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [2, 4, 6]
