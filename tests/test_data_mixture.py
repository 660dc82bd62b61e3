"""Mixture consumption: sample-mode rates, per-task determinism, host sharding, resume."""

import json

import numpy as np
import pytest
import seqio

from data_pipelines import mixture_iterator
from data_pipelines import tasks as tasks_lib
from test_data_fixtures import NUM_DOCS, NUM_PAIRS
from test_data_fixtures import data_world  # noqa: F401  (pytest fixture)

_RATES = {"mix_m3w": 1.0, "mix_align": 0.2, "mix_ltip": 0.2}  # the paper's M3W/ALIGN/LTIP


def _register_image_mixture(world, name="rates_mix", image_size=8):
    configs = [
        world.task_config("mix_m3w", "m3w_tfrecord", rate=_RATES["mix_m3w"], image_size=image_size,
                          text_length=32),
        world.task_config("mix_align", "pairs_raw", rate=_RATES["mix_align"],
                          image_size=image_size),
        world.task_config("mix_ltip", "pairs_tfrecord", rate=_RATES["mix_ltip"],
                          image_size=image_size),
    ]
    return tasks_lib.register_mixture(name, configs, world.vocab)


def test_sample_mode_proportions_match_the_rates_over_10000_examples(data_world):
    mixture = _register_image_mixture(data_world)
    it = mixture_iterator.make_sampled_iterator(mixture, batch_size=500, seed=0)
    counts = np.zeros(3)
    for _ in range(20):
        batch = next(it)
        assert batch["tokens"].shape == (500, 32) and batch["media"].shape == (500, 5, 1, 8, 8, 3)
        counts += np.bincount(batch["task_id"], minlength=3)
        # Pair examples are padded to the mixture's N = 5 media with one real one.
        pairs = batch["task_id"] != it.task_names.index("mix_m3w")
        assert (batch["media_mask"][pairs].sum(axis=1) == 1).all()
    it.close()
    total = sum(_RATES.values())
    expected = np.array([_RATES[n] / total for n in it.task_names])
    assert counts.sum() == 10_000
    np.testing.assert_array_less(np.abs(counts / 10_000 - expected), 0.02)


def test_sample_mode_rejects_tasks_with_different_media_shapes(data_world):
    configs = [data_world.task_config("shape_m3w", "m3w_tfrecord"),
               data_world.task_config("shape_vtp", "vtp_tfrecord")]
    mixture = tasks_lib.register_mixture("shape_mix", configs, data_world.vocab)
    with pytest.raises(ValueError, match="num_frames and image_size"):
        mixture_iterator.make_sampled_iterator(mixture, batch_size=4)


def _per_task_mixture(world):
    configs = [
        world.task_config("pt_m3w", "m3w_tfrecord", text_length=64, image_size=16),
        world.task_config("pt_align", "pairs_raw", image_size=16),
        world.task_config("pt_vtp", "vtp_tfrecord", image_size=16),
    ]
    return tasks_lib.register_mixture("per_task_mix", configs, world.vocab)


_SIZES = {"pt_m3w": 4, "pt_align": 6, "pt_vtp": 2}


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_batches_equal(a[k], b[k])
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_per_task_mode_fixed_shapes_and_same_batches_for_same_seed(data_world):
    mixture = _per_task_mixture(data_world)
    first = mixture_iterator.make_task_iterators(mixture, _SIZES, seed=3)
    second = mixture_iterator.make_task_iterators(mixture, _SIZES, seed=3)
    other = mixture_iterator.TaskBatchIterator(tasks_lib.mixture_tasks("pt_m3w")[0], 4, seed=4)
    expected_shapes = {
        "pt_m3w": {"tokens": (4, 64), "media": (4, 5, 1, 16, 16, 3), "media_mask": (4, 5)},
        "pt_align": {"tokens": (6, 32), "media": (6, 1, 1, 16, 16, 3), "media_mask": (6, 1)},
        "pt_vtp": {"tokens": (2, 32), "media": (2, 1, 8, 16, 16, 3), "media_mask": (2, 1)},
    }
    for step in range(5):  # the 8 clips in batches of 2: step 5 is in the second epoch
        a, b = next(first), next(second)
        assert set(a) == set(_SIZES)
        for name, shapes in expected_shapes.items():
            for feature, shape in shapes.items():
                assert a[name][feature].shape == shape
        _assert_batches_equal(a, b)
        if step == 0:  # the seed matters
            assert not np.array_equal(a["pt_m3w"]["tokens"], next(other)["tokens"])
    for it in (first, second, other):
        it.close()


@pytest.mark.parametrize("which,num_hosts", [
    ("pairs_tfrecord", 2),  # 2 files / 2 hosts: each host reads its own file
    ("pairs_raw", 2),
    ("m3w_tfrecord", 3),    # 2 files / 3 hosts: every host keeps every 3rd record
])
def test_hosts_read_disjoint_examples_whose_union_is_the_whole_set(data_world, which, num_hosts):
    name = f"hosts_{which}_{num_hosts}"
    tasks_lib.register_task(data_world.task_config(name, which, train=False), data_world.vocab)
    keys_per_host = []
    for index in range(num_hosts):
        it = mixture_iterator.make_task_iterators(
            name, 4 * num_hosts, shard_info=seqio.ShardInfo(index, num_hosts), shuffle=True,
            num_epochs=1, with_keys=True)
        keys = [k for batch in it for k in batch[name]["key"] if k]
        assert len(keys) == len(set(keys))
        keys_per_host.append(set(keys))
    for i in range(num_hosts):
        for j in range(i + 1, num_hosts):
            assert not keys_per_host[i] & keys_per_host[j]
    total = NUM_PAIRS if which.startswith("pairs") else NUM_DOCS
    union = set().union(*keys_per_host)
    assert len(union) == total


def test_restoring_the_saved_position_yields_the_batches_that_would_have_followed(data_world):
    mixture = _per_task_mixture(data_world)
    it = mixture_iterator.make_task_iterators(mixture, _SIZES, seed=5)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(3)]  # the clips' epoch ends inside these
    it.close()
    restored = mixture_iterator.make_task_iterators(mixture, _SIZES, seed=5, state=state)
    for want in expected:
        _assert_batches_equal(next(restored), want)
    restored.close()
    with pytest.raises(ValueError, match="different pipeline"):
        mixture_iterator.make_task_iterators(mixture, _SIZES, seed=6, state=state)


def test_restoring_sample_mode_yields_the_same_batches(data_world):
    mixture = _register_image_mixture(data_world, name="restore_rates_mix")
    it = mixture_iterator.make_sampled_iterator(mixture, batch_size=16, seed=2)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    it.close()
    restored = mixture_iterator.make_sampled_iterator(mixture, batch_size=16, seed=2, state=state)
    for want in expected:
        _assert_batches_equal(next(restored), want)
    restored.close()
