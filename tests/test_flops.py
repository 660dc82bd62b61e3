"""Analytic model FLOPs against XLA's cost analysis of the lowered train step, and the peak
FLOP/s lookup (flamingo_jax/flops.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import demo
from flamingo_jax import flops
from flamingo_jax.models.flamingo import build_vision_encoder
from flamingo_jax.trainer import Trainer

# XLA also counts elementwise work (norms, softmax, activations, AdamW), which the model
# FLOPs leave out; on these tiny widths that is a few percent of the step.
TOLERANCE = 0.10


def _config(trainable=None):
    config = demo.get_config()
    config.model.vision.variant = None
    config.model.vision.feature_dim = 48  # ≠ resampler width: the input projection counts
    config.model.lm.update(num_layers=2, max_length=32)
    config.model.resampler.num_layers = 1
    config.input.update(num_media=2, text_length=32, image_size=64, batch_size=4)
    config.train.task_weights = {"m3w": 1.0, "pairs": 0.5}
    if trainable is not None:
        config.train.trainable = trainable
    return config


def _batch(config, n, b, seed):
    rng = np.random.default_rng(seed)
    length = config.input.text_length
    tokens = rng.integers(3, 1000, size=(1, b, length + 1)).astype(np.int32)
    tokens[:, :, 1:1 + n] = config.model.image_token_id
    return {"tokens": tokens[..., :-1], "targets": tokens[..., 1:],
            "loss_weights": np.ones((1, b, length), np.float32),
            "media_mask": np.ones((1, b, n), np.int32),
            "vision_features": rng.normal(size=(1, b, n, 1, 4, 48)).astype(np.float32)}


def _xla_step_flops(config, host):
    """XLA's count for the lowered step (the optimised HLO differs by ~1%; lowering
    avoids a compile)."""
    trainer = Trainer(config, devices=jax.devices()[:1])
    state = jax.eval_shape(trainer.init_state)
    return trainer.lower(state, trainer.shard_batches(host)).cost_analysis()["flops"]


@pytest.mark.parametrize("kind,trainable", [("flamingo", None), ("flamingo", (".*",)),
                                            ("lm", (".*",))],
                         ids=["paper", "all_trainable", "text_only_lm"])
def test_step_flops_match_xla_cost_analysis(kind, trainable):
    config = _config(trainable)
    config.model.kind = kind
    # Two datasets of different batch size and media count in one step.
    host = {"m3w": _batch(config, 2, 4, 0), "pairs": _batch(config, 1, 2, 1)}
    if kind == "lm":  # text only
        host = {t: {k: b[k] for k in ("tokens", "targets", "loss_weights")}
                for t, b in host.items()}
    analytic = flops.step_flops(config, flops.shapes_of_batches(host)).total
    xla = _xla_step_flops(config, host)
    assert abs(analytic / xla - 1) < TOLERANCE, (analytic, xla)


def test_vision_encoder_forward_flops_match_xla():
    # A shallow, wide NFNet at 64 px, batch 8: the convolutions dominate the elementwise
    # work (scaled activations, weight standardisation) that XLA also counts.
    config = demo.get_config()
    config.model.vision.update(widths=(128, 256, 512, 512), stem_widths=(16, 32, 64),
                               group_width=64)
    encoder = build_vision_encoder(config.model.vision, jnp.float32)
    images = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32)
    params = jax.eval_shape(encoder.init, jax.random.key(0), images)
    xla = jax.jit(encoder.apply).lower(params, images).cost_analysis()["flops"]
    shape = flops.BatchShape(batch=8, length=8, num_media=1, image_size=64)
    analytic = flops.model_flops(config, shape)["vision"]  # frozen: forward only
    assert abs(analytic / xla - 1) < TOLERANCE, (analytic, xla)


def test_trainability_sets_the_backward_cost():
    paper = flops.model_flops(_config(), flops.BatchShape(4, 32, 2, spatial=4))
    unfrozen = flops.model_flops(_config((".*",)), flops.BatchShape(4, 32, 2, spatial=4))
    # Frozen LM weights with gradients flowing through: 4 per weight and row; trained: 6.
    assert unfrozen["lm"] > paper["lm"]
    lm_matmuls = paper["lm"] - 2 * 12 * 4 * 4 * 32 * 32 * 32  # minus both layers' attention
    unfrozen_matmuls = unfrozen["lm"] - 2 * 12 * 4 * 4 * 32 * 32 * 32
    np.testing.assert_allclose(unfrozen_matmuls / lm_matmuls, 6 / 4)


def test_peak_flops_table_and_unknown_kinds():
    assert flops.device_peak_flops("TPU v4") == 275e12
    assert flops.device_peak_flops("TPU v5 lite") == 197e12
    assert flops.device_peak_flops("TPU v5p") == 459e12
    assert flops.device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.device_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    with pytest.raises(ValueError, match="peak_flops_per_device"):
        flops.device_peak_flops("Quantum Abacus 9000")
    devices = jax.devices()[:4]
    assert flops.peak_flops_per_second(devices, per_device=1e12) == 4e12
    # CPU: one probe per process, shared by the host's (fake) devices.
    assert flops.peak_flops_per_second(devices) == flops.cpu_peak_flops() > 1e8
