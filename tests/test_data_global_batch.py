"""Host-local batches -> global jax.Arrays over the 8 fake CPU devices."""

import jax
import numpy as np
import pytest

from data_pipelines import global_batch
from data_pipelines import mixture_iterator
from data_pipelines import tasks as tasks_lib
from test_data_fixtures import data_world  # noqa: F401  (pytest fixture)


def _mesh(data, fsdp, tensor):
    devices = np.array(jax.devices()[: data * fsdp * tensor]).reshape(data, fsdp, tensor)
    return jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))


def test_global_batch_is_split_over_data_and_fsdp_and_holds_the_local_rows():
    assert jax.device_count() == 8
    mesh = _mesh(2, 2, 2)
    rng = np.random.default_rng(0)
    local = {"tokens": rng.integers(0, 100, (8, 16)).astype(np.int32),
             "media": rng.normal(size=(8, 5, 1, 4, 4, 3)).astype(np.float32),
             "key": np.array([b"k"] * 8, dtype=object)}
    out = global_batch.make_global_batch(local, mesh)
    assert set(out) == {"tokens", "media"}  # strings stay on the host
    tokens = out["tokens"]
    assert tokens.shape == (8 * jax.process_count(), 16)
    assert tokens.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(tokens), local["tokens"])
    # 4 batch shards of 2 rows, each replicated over the 2 'tensor' devices.
    for shard in tokens.addressable_shards:
        rows = shard.index[0]
        assert rows.stop - rows.start == 2
        np.testing.assert_array_equal(np.asarray(shard.data), local["tokens"][rows])
    np.testing.assert_array_equal(np.asarray(out["media"]), local["media"])


def test_batch_axes_missing_from_the_mesh_are_ignored():
    devices = np.array(jax.devices()).reshape(8, 1)
    mesh = jax.sharding.Mesh(devices, ("data", "tensor"))
    out = global_batch.make_global_batch({"x": np.arange(16, dtype=np.int32).reshape(8, 2)}, mesh)
    assert out["x"].sharding.spec == jax.sharding.PartitionSpec(("data",), None)


def test_global_iterator_wraps_per_task_batches(data_world):
    configs = [data_world.task_config("gb_pairs", "pairs_tfrecord", image_size=8),
               data_world.task_config("gb_m3w", "m3w_tfrecord", image_size=8, text_length=16)]
    mixture = tasks_lib.register_mixture("gb_mix", configs, data_world.vocab)
    shard = global_batch.host_shard_info()
    assert (shard.index, shard.num_shards) == (0, 1)
    local = mixture_iterator.make_task_iterators(mixture, {"gb_pairs": 8, "gb_m3w": 4}, seed=1,
                                                 shard_info=shard)
    reference = mixture_iterator.make_task_iterators(mixture, {"gb_pairs": 8, "gb_m3w": 4}, seed=1)
    it = global_batch.GlobalBatchIterator(local, _mesh(4, 1, 2))
    batch = next(it)
    want = next(reference)
    assert set(batch) == {"gb_pairs", "gb_m3w"}
    assert batch["gb_m3w"]["media"].shape == (4, 5, 1, 8, 8, 3)
    for task in batch:
        assert isinstance(batch[task]["tokens"], jax.Array)
        for feature, value in want[task].items():
            np.testing.assert_array_equal(np.asarray(batch[task][feature]), value)
    assert it.get_state()["tasks"]["gb_pairs"]["next_index"] == 8
    it.close()
    reference.close()


def test_global_batch_must_divide_over_hosts():
    import seqio
    with pytest.raises(ValueError, match="multiple of the number of hosts"):
        mixture_iterator.local_batch_size(6, seqio.ShardInfo(0, 4))


def test_input_pipeline_from_a_data_config(data_world):
    from data_pipelines import input_pipeline

    data = {
        "tokenizer": data_world.spm_model,
        "mixture": "config_mix",
        "mode": "sample",
        "seed": 0,
        "image_size": 8,
        "batch_size": 16,
        "tasks": {
            "cfg_m3w": {"kind": "interleaved", "source": "tfrecord", "text_length": 24,
                        "path": data_world.prepared["m3w"], "rate": 1.0},
            "cfg_pairs": {"kind": "pairs", "source": "tfrecord",
                          "path": data_world.prepared["pairs"], "rate": 0.5},
        },
    }
    vocab = input_pipeline.vocabulary(data)
    assert vocab.num_extra_tokens == 2 and vocab.vocab_size == vocab.base_vocab_size + 2
    it = input_pipeline.make_data_iterator(data, mesh=_mesh(8, 1, 1))
    batch = next(it)
    # Sample mode pads every task to the largest L (pairs: 32) and N (interleaved: 5).
    assert batch["tokens"].shape == (16, 32) and batch["media"].shape == (16, 5, 1, 8, 8, 3)
    assert batch["tokens"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert it.get_state()["mode"] == "sample"
    it.close()
    with pytest.raises(ValueError, match="unknown fields"):
        input_pipeline.make_data_iterator({**data, "tasks": {"x": {"kind": "pairs", "source":
                                                                   "tfrecord", "colour": 1}}})
