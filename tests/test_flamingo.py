"""The whole Flamingo model: identity at init, causal media masking, video, bad inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import demo
from flamingo_jax.models.flamingo import build_flamingo
from flamingo_jax.models.resampler import interpolate_time_embedding

B, L, N, T, S = 2, 24, 3, 1, 32


def _config():
    config = demo.get_config()
    config.model.lm.max_length = 32
    return config


def _tokens(image_id: int) -> np.ndarray:
    """Two interleaved rows: text, <image>, text, ... with 3 and 2 media."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 900, size=(B, L)).astype(np.int32)
    tokens[:, 0] = 1  # BOS
    tokens[0, [1, 8, 15]] = image_id  # an <image> right after BOS, then two more
    tokens[1, [5, 12]] = image_id
    return tokens


@pytest.fixture(scope="module")
def setup():
    config = _config()
    model = build_flamingo(config.model)
    image_id = config.model.image_token_id
    tokens = _tokens(image_id)
    media_mask = np.array([[1, 1, 1], [1, 1, 0]], np.int32)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(B, N, T, S, S, 3)).astype(np.float32)
    init = jax.jit(lambda key: model.init(key, tokens, images=images, media_mask=media_mask))
    params = nn.unbox(init(jax.random.key(0)))
    return config, model, params["params"], tokens, images, media_mask


def _open_gates(params, seed=0):
    """Copy of params with every tanh gate's α set to a non-zero value."""
    rng = np.random.default_rng(seed)
    lm = dict(params["lm"])
    for name, layer in lm.items():
        if name.startswith("xattn_"):
            lm[name] = dict(layer, alpha_xattn=jnp.asarray(rng.uniform(0.3, 1.0), jnp.float32),
                            alpha_dense=jnp.asarray(rng.uniform(0.3, 1.0), jnp.float32))
    return dict(params, lm=lm)


def test_logits_equal_frozen_lm_exactly_at_init(setup):
    config, model, params, tokens, images, media_mask = setup
    assert any(k.startswith("xattn_") for k in params["lm"])
    lm_params = {k: v for k, v in params["lm"].items() if not k.startswith("xattn_")}
    # Eagerly (op by op) and compiled, each against the LM run the same way.
    lm_eager = model.lm.apply({"params": lm_params}, tokens)
    eager = model.apply({"params": params}, tokens, images=images, media_mask=media_mask)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(lm_eager))
    lm_jit = jax.jit(lambda p, t: model.lm.apply({"params": p}, t))(lm_params, tokens)
    jitted = jax.jit(
        lambda p, t, i, m: model.apply({"params": p}, t, images=i, media_mask=m)
    )(params, tokens, images, media_mask)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(lm_jit))
    lm_logits = lm_eager
    # Opening the gates must change the logits, or the comparison above proves nothing.
    opened = model.apply({"params": _open_gates(params)}, tokens, images=images,
                         media_mask=media_mask)
    assert float(jnp.abs(opened - lm_logits).max()) > 1e-3


@pytest.mark.parametrize("media_attention", ["previous", "all_previous"])
def test_positions_before_media_k_are_unaffected_by_it(setup, media_attention):
    config, _, params, tokens, images, media_mask = setup
    config.model.media_attention = media_attention
    model = build_flamingo(config.model)
    params = _open_gates(params)
    apply = jax.jit(lambda i: model.apply({"params": params}, tokens, images=i,
                                          media_mask=media_mask))
    base = np.asarray(apply(images))
    image_positions = [np.nonzero(row == config.model.image_token_id)[0] for row in tokens]
    for k in range(N):
        perturbed = images.copy()
        perturbed[:, k] += 5.0
        changed = np.any(np.asarray(apply(perturbed)) != base, axis=-1)  # [B, L]
        for b in range(B):
            first = image_positions[b][k] if k < len(image_positions[b]) else L
            assert not changed[b, :first].any(), (b, k)
            assert changed[b, first:].all() if first < L else True, (b, k)


def test_video_model_for_8_frames_accepts_16():
    """Video through precomputed per-frame features (the vision encoder is per frame)."""
    config = _config()
    config.model.vision.variant = None
    config.model.resampler.max_frames = 8
    model = build_flamingo(config.model)
    tokens = _tokens(config.model.image_token_id)[:, :12]  # 2 and 1 media
    media_mask = np.array([[1, 1, 0], [1, 0, 0]], np.int32)
    rng = np.random.default_rng(2)
    video8 = rng.normal(size=(B, N, 8, 4, 24)).astype(np.float32)  # [B, N, T, S, d]
    params = jax.jit(
        lambda key: model.init(key, tokens, vision_features=video8, media_mask=media_mask)
    )(jax.random.key(0))
    params = _open_gates(nn.unbox(params)["params"])
    apply = jax.jit(lambda v: model.apply({"params": params}, tokens, vision_features=v,
                                          media_mask=media_mask))
    logits8 = apply(video8)
    video16 = np.repeat(video8, 2, axis=2)  # [B, N, 16, S, d]
    logits16 = apply(video16)
    assert logits16.shape == (B, 12, config.model.lm.vocab_size + 2)
    assert np.isfinite(np.asarray(logits16)).all()
    # Frames matter: 16 frames give other logits than 8, after the first media.
    first_media = np.nonzero(tokens[0] == config.model.image_token_id)[0][0]
    assert float(jnp.abs(logits16 - logits8)[0, first_media:].max()) > 1e-4
    np.testing.assert_array_equal(np.asarray(logits16)[0, :first_media],
                                  np.asarray(logits8)[0, :first_media])
    # The 16-frame latents differ from the 8-frame ones only through time embeddings
    # interpolated between the trained ones (first and last rows kept).
    emb = np.asarray(params["resampler"]["time_embedding"])
    emb16 = np.asarray(interpolate_time_embedding(emb, 16))
    np.testing.assert_allclose(emb16[0], emb[0], rtol=0, atol=0)
    np.testing.assert_allclose(emb16[-1], emb[-1], rtol=0, atol=1e-7)
    np.testing.assert_allclose(emb16[1], emb[0] + (emb[1] - emb[0]) * (7 / 15), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(interpolate_time_embedding(emb, 8)), emb)


def test_bad_inputs_fail_with_a_clear_error(setup):
    config, model, params, tokens, images, media_mask = setup
    apply = lambda **kw: model.apply({"params": params}, **{  # noqa: E731
        **dict(tokens=tokens, images=images, media_mask=media_mask), **kw})
    traced = lambda **kw: jax.eval_shape(apply, **kw)  # noqa: E731  (trace-time checks)
    with pytest.raises(ValueError, match=r"rank 6.*shape \(2, 3, 32, 32, 3\)"):
        traced(images=jax.ShapeDtypeStruct((B, N, S, S, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"dtype uint8 with shape \(2, 3, 1, 32, 32, 3\)"):
        traced(images=jax.ShapeDtypeStruct(images.shape, jnp.uint8))
    with pytest.raises(ValueError, match=r"length 40 .*\(2, 40\).*max_length=32"):
        traced(tokens=jax.ShapeDtypeStruct((B, 40), jnp.int32))
    more_tokens = tokens.copy()
    more_tokens[1, 20] = config.model.image_token_id  # 3 <image> tokens, 2 media
    with pytest.raises(ValueError, match=r"example 1 has 3 <image> tokens .* but 2 media"):
        apply(tokens=more_tokens)
    fewer_tokens = tokens.copy()
    fewer_tokens[0, 15] = 5  # 2 <image> tokens, 3 media
    with pytest.raises(ValueError, match=r"example 0 has 2 <image> tokens .* but 3 media"):
        apply(tokens=fewer_tokens)
