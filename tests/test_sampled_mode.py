"""Example-level sampling (config.data.mode = "sampled"): one batch of examples from several
tasks, each example's token-mean loss weighted equally, per-task metrics from task ids."""

import functools

import jax
import numpy as np
import optax
import pytest

from experiments import demo
from flamingo_jax.train import MIXTURE, sampled_batch
from flamingo_jax.trainer import Trainer

B, L, N, S, D_FEAT = 8, 16, 2, 4, 24
TASKS = ("m3w", "pairs")


def _config():
    config = demo.get_config()
    config.model.vision.variant = None
    config.model.vision.feature_dim = D_FEAT
    config.model.lm.update(num_layers=2, max_length=L)
    config.model.resampler.num_layers = 1
    config.input.update(num_media=N, text_length=L, image_size=64)
    config.train.task_weights = {"m3w": 1.0, "pairs": 0.2}
    config.data.mode = "sampled"
    return config


def _host(config, k=1):
    """One sampled batch [K, B/K, ...]: tasks interleaved, token counts that differ per
    example, and one padding row (no targets)."""
    rng = np.random.default_rng(0)
    image_id = config.model.image_token_id
    tokens = rng.integers(3, 1000, size=(B, L + 1)).astype(np.int32)
    tokens[:, 1] = image_id
    weights = np.ones((B, L), np.float32)
    for i in range(B):
        weights[i, L - 2 * i:] = 0.0  # example i has L - 2i targets
    weights[B - 1] = 0.0  # padding row from the end of a finite stream
    host = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": weights,
            "vision_features": rng.normal(size=(B, N, 1, S, D_FEAT)).astype(np.float32),
            "media_mask": np.tile(np.array([[1, 0]], np.int32), (B, 1)),
            "task_id": np.array([0, 1, 1, 0, 0, 1, 0, 1], np.int32)}
    return jax.tree_util.tree_map(lambda x: x.reshape((k, B // k) + x.shape[1:]), host)


@functools.lru_cache(maxsize=None)
def _trainer():
    return Trainer(_config(), devices=jax.devices()[:1], tx=optax.sgd(1.0))


def _step(host):
    """One step from the initial state on a sampled batch [K, b, ...], K=2 microbatches
    (the padding row in the second): (−update, metrics). With SGD at learning rate 1, the
    negated update is the gradient."""
    trainer = _trainer()
    state = trainer.init_state()
    init = jax.tree_util.tree_map(np.asarray, state.trainable)
    state, metrics = trainer.step(state, trainer.shard_batches({MIXTURE: host})[MIXTURE])
    grad = {p: init[p] - np.asarray(v) for p, v in state.trainable.items()}
    return grad, jax.device_get(metrics)


@pytest.fixture(scope="module")
def runs():
    """The whole batch, and each example alone (the others' loss weights zeroed): every
    run reuses the one compiled step."""
    host = _host(_trainer().config, k=2)
    whole = _step(host)
    alone = []
    for i in range(B):
        mask = (np.arange(B) == i).astype(np.float32).reshape(2, B // 2, 1)
        alone.append(_step({**host, "loss_weights": host["loss_weights"] * mask}))
    return host, whole, alone


def test_gradient_is_the_mean_per_example_gradient(runs):
    host, (grad, _), alone = runs
    real = [i for i in range(B) if host["loss_weights"].reshape(B, L)[i].sum() > 0]
    assert len(real) == B - 1  # the padding row adds nothing
    for path in grad:
        expected = np.mean([alone[i][0][path] for i in real], axis=0)
        np.testing.assert_allclose(grad[path], expected, rtol=2e-4, atol=1e-7, err_msg=path)


def test_examples_weigh_equally_whatever_their_token_count(runs):
    host, (grad, metrics), _ = runs
    heavier = host["loss_weights"].copy()
    heavier[0, 0] *= 3.0  # example 0 counts each target three times
    grad3, metrics3 = _step({**host, "loss_weights": heavier})
    np.testing.assert_allclose(metrics3["loss"], metrics["loss"], rtol=1e-6)
    for path in grad:
        np.testing.assert_allclose(grad3[path], grad[path], rtol=1e-5, atol=1e-8, err_msg=path)


def test_per_task_losses_from_task_ids(runs):
    host, (_, metrics), alone = runs
    task_id = host["task_id"].reshape(B)
    tokens = host["loss_weights"].reshape(B, L).sum(-1)
    losses = np.array([m["loss"] for _, m in alone])  # each example's token-mean loss
    real = tokens > 0
    np.testing.assert_allclose(metrics["loss"], losses[real].mean(), rtol=1e-5)
    for m, name in enumerate(TASKS):
        mine = (task_id == m) & real
        np.testing.assert_allclose(metrics[f"loss/{name}"], losses[mine].mean(), rtol=1e-5)
        assert metrics[f"tokens/{name}"] == tokens[task_id == m].sum()
        assert metrics[f"examples/{name}"] == mine.sum()
    # Single-example losses differ, so equal weighting is not a coincidence of the data.
    assert np.ptp(losses[real]) > 1e-3


def test_task_ids_follow_sorted_task_names():
    host = {"tokens": np.zeros((3, 4), np.int32), "task_id": np.array([0, 1, 0], np.int32)}
    out = sampled_batch(host, ["pairs", "m3w"])  # the iterator's (mixture) order
    np.testing.assert_array_equal(out[MIXTURE]["task_id"], [1, 0, 1])  # sorted: m3w, pairs
