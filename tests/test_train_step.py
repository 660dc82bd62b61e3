"""Sharded training step on 8 fake CPU devices (SPEC §5): mesh invariance, sharding rules,
frozen parameters, microbatch and multi-dataset accumulation, non-finite skipping."""

import functools

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from experiments import demo
from flamingo_jax.trainer import Trainer

B, L, S, D_FEAT = 8, 16, 4, 24
TASKS = {"interleaved": (3, 1.0), "pairs": (1, 0.5)}  # name → (media per example, λ)


def _config(mesh=(1, 1, 1)):
    config = demo.get_config()
    config.model.vision.variant = None  # precomputed features keep compilation small
    config.model.vision.feature_dim = D_FEAT
    config.model.lm.max_length = L
    config.model.lm.num_layers = 2
    config.model.resampler.num_layers = 1
    config.input.update(num_media=3, text_length=L, image_size=64)
    config.train.task_weights = {name: lam for name, (_, lam) in TASKS.items()}
    config.optimizer.update(lr=1e-3, warmup_steps=0)
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2], num_devices=None)
    return config


def _batch(config, n_media: int, seed: int, k: int = 1, b: int = B) -> dict:
    """Host batch [K, b, ...] with one <image> token per real media."""
    rng = np.random.default_rng(seed)
    image_id = config.model.image_token_id
    tokens = rng.integers(3, 1000, size=(k, b, L + 1)).astype(np.int32)
    media_mask = np.zeros((k, b, n_media), np.int32)
    for i in np.ndindex(k, b):
        count = rng.integers(1, n_media + 1)
        tokens[i][np.sort(rng.choice(np.arange(1, L - 1), count, replace=False))] = image_id
        media_mask[i][:count] = 1
    weights = (tokens[..., 1:] != image_id).astype(np.float32)
    weights[..., -3:] = 0.0  # padding
    return {
        "tokens": tokens[..., :-1], "targets": tokens[..., 1:], "loss_weights": weights,
        "vision_features": rng.normal(size=(k, b, n_media, 1, S, D_FEAT)).astype(np.float32),
        "media_mask": media_mask, "assoc_next": rng.integers(0, 2, size=(k, b)).astype(np.int32),
    }


def _batches(config, seed=0, k=1, b=B):
    return {name: _batch(config, n, seed + i, k, b) for i, (name, (n, _)) in
            enumerate(TASKS.items())}


@functools.lru_cache(maxsize=None)
def _trainer(mesh, sgd: bool = False) -> Trainer:
    """One trainer (compiled init and step) per mesh, shared by the tests."""
    devices = jax.devices()[: int(np.prod(mesh))]
    return Trainer(_config(mesh), devices=devices, tx=optax.sgd(1.0) if sgd else None)


def _run(mesh, steps=1, batches_fn=_batches, sgd=False, mutate=None):
    trainer = _trainer(mesh, sgd)
    config = trainer.config
    state = trainer.init_state()
    frozen0 = jax.tree_util.tree_map(np.asarray, state.frozen)
    metrics = []
    for step in range(steps):
        host = batches_fn(config, seed=10 * step)
        if mutate is not None:
            mutate(host)
        state, m = trainer.step(state, trainer.shard_batches(host))
        metrics.append(jax.tree_util.tree_map(np.asarray, m))
    return trainer, state, metrics, frozen0


@pytest.fixture(scope="module")
def reference():
    return _run((1, 1, 1))


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_step_is_the_same_on_every_mesh(reference, mesh):
    _, ref_state, ref_metrics, _ = reference
    _, state, metrics, _ = _run(mesh)
    np.testing.assert_allclose(metrics[0]["loss"], ref_metrics[0]["loss"], rtol=1e-5)
    for name in TASKS:
        np.testing.assert_allclose(metrics[0][f"loss/{name}"], ref_metrics[0][f"loss/{name}"],
                                   rtol=1e-5)
    assert set(state.trainable) == set(ref_state.trainable)
    for path, value in state.trainable.items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(ref_state.trainable[path]),
                                   rtol=1e-5, atol=1e-7, err_msg=path)
    assert int(state.step) == 1


def test_parameter_shardings_follow_the_rules():
    trainer, state, _, _ = _run((2, 2, 2), steps=0)
    spec = lambda path: (state.trainable | state.frozen)[path].sharding.spec  # noqa: E731
    assert spec("lm/layers_0/attn/q/kernel") == P("fsdp", "tensor", None)
    assert spec("lm/layers_0/attn/k/kernel") == P("fsdp", "tensor", None)
    assert spec("lm/layers_0/attn/o/kernel") == P("tensor", None, "fsdp")
    assert spec("lm/layers_0/mlp/gate/kernel") == P("fsdp", "tensor")
    assert spec("lm/layers_0/mlp/down/kernel") == P("tensor", "fsdp")
    assert spec("lm/xattn_0/q/kernel") == P("fsdp", "tensor", None)
    assert spec("lm/xattn_0/ffw/wi/kernel") == P("fsdp", "tensor")
    assert spec("resampler/latents") == P(None, "fsdp")
    assert spec("resampler/layers_0_attn/q/kernel") == P("fsdp", "tensor", None)
    assert spec("lm/embed/embedding") == P("tensor", "fsdp")
    assert spec("lm/embed/extra_embedding") == P(None, "fsdp")
    assert spec("lm/head/kernel") == P("fsdp", "tensor")
    # Optimizer moments are sharded like their parameters.
    adam = [s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=lambda x: isinstance(
        x, dict)) if isinstance(s, dict) and "lm/xattn_0/q/kernel" in s]
    assert adam and all(a["lm/xattn_0/q/kernel"].sharding.spec == P("fsdp", "tensor", None)
                        for a in adam)


def test_frozen_params_unchanged_and_without_optimizer_state():
    _, state, metrics, frozen0 = _run((2, 2, 2), steps=5)
    assert int(state.step) == 5 and all(m["skipped_steps"] == 0 for m in metrics)
    for path, value in state.frozen.items():
        np.testing.assert_array_equal(np.asarray(value), frozen0[path], err_msg=path)
    assert state.frozen["lm/layers_0/attn/q/kernel"].dtype == np.float32  # demo keeps f32
    opt_paths = {k for leaf in jax.tree_util.tree_leaves(
        state.opt_state, is_leaf=lambda x: isinstance(x, dict)) if isinstance(leaf, dict)
        for k in leaf}
    assert opt_paths == set(state.trainable)
    assert not opt_paths & set(state.frozen)
    assert all(p.startswith(("resampler/", "lm/xattn_")) or "/extra_" in p
               for p in state.trainable)


def test_microbatches_equal_one_large_batch():
    one = lambda c, seed: _batches(c, seed, k=1, b=8)  # noqa: E731
    two = lambda c, seed: jax.tree_util.tree_map(  # noqa: E731
        lambda x: x.reshape((2, 4) + x.shape[2:]), _batches(c, seed, k=1, b=8))
    _, s1, m1, _ = _run((1, 1, 1), batches_fn=one, sgd=True)
    _, s2, m2, _ = _run((1, 1, 1), batches_fn=two, sgd=True)
    np.testing.assert_allclose(m2[0]["loss"], m1[0]["loss"], rtol=1e-6)
    for path in s1.trainable:
        np.testing.assert_allclose(np.asarray(s2.trainable[path]),
                                   np.asarray(s1.trainable[path]), rtol=1e-5, atol=1e-7)


def test_multi_dataset_gradient_is_the_weighted_sum():
    # With SGD at learning rate 1: new params = old − Σ_m λ_m ∇L_m.
    init = jax.tree_util.tree_map(np.asarray, _trainer((1, 1, 1), sgd=True).init_state().trainable)
    _, both, _, _ = _run((1, 1, 1), sgd=True)
    expected = {p: v.copy() for p, v in init.items()}
    for i, name in enumerate(TASKS):
        single = lambda c, seed, name=name: {name: _batches(c, seed)[name]}  # noqa: E731
        _, s, _, _ = _run((1, 1, 1), sgd=True, batches_fn=single)
        for p in expected:
            expected[p] += np.asarray(s.trainable[p]) - init[p]  # −λ_m ∇L_m
    for p in expected:
        np.testing.assert_allclose(np.asarray(both.trainable[p]), expected[p], rtol=1e-5,
                                   atol=1e-7, err_msg=p)


def test_non_finite_loss_skips_the_update():
    def poison(host):
        host["pairs"]["loss_weights"][0, 0, 0] = np.nan

    _, state, metrics, _ = _run((2, 2, 2), mutate=poison)
    _, clean_init, _, _ = _run((2, 2, 2), steps=0)
    assert not np.isfinite(metrics[0]["loss"])
    assert metrics[0]["skipped_steps"] == 1 and metrics[0]["consecutive_skips"] == 1
    for path, value in state.trainable.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(clean_init.trainable[path]))
