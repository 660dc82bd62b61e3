"""flamingo_jax/optimizer.py: per-parameter learning-rate factors (optimizer.lr_multipliers)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flamingo_jax import base_config
from flamingo_jax.optimizer import lr_factors, make_optimizer

PATHS = ["lm/xattn_0/alpha_dense", "lm/xattn_0/alpha_xattn", "lm/xattn_0/q/kernel",
         "resampler/latents", "resampler/layers_0_attn/q/kernel"]


def _opt_config(**overrides):
    config = base_config.get_config().optimizer
    config.update(lr=1e-2, warmup_steps=0, **overrides)
    return config


def _updates(configs, steps=3):
    """Per optimizer config, the updates of `steps` AdamW steps, all fed the same params
    (those of the first config's trajectory) and the same random gradients."""
    rng = np.random.default_rng(0)
    params = {p: jnp.asarray(rng.normal(size=(3, 2)), jnp.float32) for p in PATHS}
    txs = [make_optimizer(c, 100, PATHS)[0] for c in configs]
    states = [tx.init(params) for tx in txs]
    out = [[] for _ in configs]
    for _ in range(steps):
        grads = {p: jnp.asarray(rng.normal(size=(3, 2)), jnp.float32) for p in PATHS}
        for i, tx in enumerate(txs):
            updates, states[i] = tx.update(grads, states[i], params)
            out[i].append(jax.device_get(updates))
        params = optax.apply_updates(params, out[0][-1])
    return out


def test_factors_scale_each_matched_update_and_leave_the_rest():
    multipliers = ((r"alpha_", 10.0), (r"^resampler/", 0.1), (r"alpha_dense", 3.0))
    plain, scaled = _updates([_opt_config(), _opt_config(lr_multipliers=multipliers)])
    # First match wins: alpha_dense takes 10, not 3.
    expected = {"lm/xattn_0/alpha_dense": 10.0, "lm/xattn_0/alpha_xattn": 10.0,
                "lm/xattn_0/q/kernel": 1.0, "resampler/latents": 0.1,
                "resampler/layers_0_attn/q/kernel": 0.1}
    assert lr_factors(_opt_config(lr_multipliers=multipliers), PATHS) == expected
    for step_plain, step_scaled in zip(plain, scaled):
        for p in PATHS:  # AdamW's whole update, weight decay included, times the factor
            np.testing.assert_allclose(step_scaled[p], expected[p] * step_plain[p], rtol=1e-6)
            assert np.abs(step_plain[p]).min() > 0


@pytest.mark.parametrize("multipliers, message", [
    (((r"^vision/", 2.0),), r"lr_multipliers=\('\^vision/',\) matches no trainable parameter"),
    (((r"alpha_", 0.0),), r"lr_multipliers\['alpha_'\]=0.0: must be > 0"),
    (((r"alpha_",),), r"expected \(regex, factor\)"),
    (((r"alpha_(", 2.0),), r"lr_multipliers has an invalid regex"),
])
def test_bad_multipliers_fail_naming_the_key(multipliers, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(_opt_config(lr_multipliers=multipliers), 100, PATHS)


def test_config_override_from_the_command_line_form():
    config = ml_collections.ConfigDict({"optimizer": _opt_config()})
    config.optimizer.lr_multipliers = ((r"alpha_", 30.0),)
    assert lr_factors(config.optimizer, PATHS)["lm/xattn_0/alpha_xattn"] == 30.0
