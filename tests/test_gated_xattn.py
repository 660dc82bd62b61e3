"""GATED XATTN-DENSE masking properties (SPEC §3.3), property-based over interleavings."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from flamingo_jax.models.gated_xattn import GatedCrossAttentionDense, media_attention_mask

B, L, N, R, D, DM = 2, 16, 4, 3, 16, 12
IMAGE_ID = 7


LAYER = GatedCrossAttentionDense(num_heads=2, head_dim=8)


@functools.lru_cache(maxsize=None)
def _params(alpha_dense: float):
    """Initialised parameters with both gates opened (non-zero α)."""
    y = jnp.zeros((B, L, D))
    media = jnp.zeros((B, N, R, DM))
    params = nn.unbox(LAYER.init(jax.random.key(0), y, media, jnp.ones((B, L, N), bool)))
    params["params"]["alpha_xattn"] = jnp.asarray(0.7)
    params["params"]["alpha_dense"] = jnp.asarray(alpha_dense)
    return params


@functools.partial(jax.jit, static_argnames=("all_previous",))
def _apply(params, y, media, tokens, media_mask, assoc_next, all_previous):
    mask = media_attention_mask(tokens, IMAGE_ID, N, media_mask, assoc_next, all_previous)
    return LAYER.apply(params, y, media, mask)


@st.composite
def interleavings(draw):
    """Token rows with 0..N `<image>` tokens at random positions; media_mask marks as many
    real media as there are `<image>` tokens (the rest is padding)."""
    tokens = np.zeros((B, L), np.int32)
    media_mask = np.zeros((B, N), np.int32)
    for b in range(B):
        count = draw(st.integers(0, N))
        positions = draw(st.lists(st.integers(0, L - 1), min_size=count, max_size=count,
                                  unique=True))
        tokens[b] = draw(st.lists(st.integers(0, 6), min_size=L, max_size=L))
        tokens[b, positions] = IMAGE_ID
        media_mask[b, :count] = 1
    assoc_next = np.asarray(draw(st.lists(st.integers(0, 1), min_size=B, max_size=B)), np.int32)
    k = draw(st.integers(0, N - 1))
    seed = draw(st.integers(0, 2**16))
    return tokens, media_mask, assoc_next, k, seed


def _phi(tokens, assoc_next):
    """Reference φ in plain numpy: index of the media a position belongs to (-1: none)."""
    is_image = tokens == IMAGE_ID
    count = np.cumsum(is_image, axis=1)
    prev = count - 1
    nxt = count - is_image
    return np.where(assoc_next[:, None] == 1, nxt, prev)


def _perturbed(tokens, media_mask, assoc_next, k, seed, all_previous, alpha_dense=0.4):
    rng = np.random.default_rng(seed)
    y = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    media = rng.normal(size=(B, N, R, DM)).astype(np.float32)
    media2 = media.copy()
    media2[:, k] += rng.normal(size=(B, R, DM)).astype(np.float32) * 3
    params = _params(alpha_dense)
    out1 = _apply(params, y, jnp.asarray(media), tokens, media_mask, assoc_next, all_previous)
    out2 = _apply(params, y, jnp.asarray(media2), tokens, media_mask, assoc_next, all_previous)
    changed = np.any(np.asarray(out1) != np.asarray(out2), axis=-1)  # [B, L]
    return y, out1, changed


@settings(max_examples=60, deadline=None)
@given(interleavings())
def test_perturbing_media_k_changes_only_positions_with_phi_k(case):
    tokens, media_mask, assoc_next, k, seed = case
    _, _, changed = _perturbed(tokens, media_mask, assoc_next, k, seed, all_previous=False)
    phi = _phi(tokens, assoc_next)
    expected = (phi == k) & (media_mask[:, k:k + 1] == 1)
    np.testing.assert_array_equal(changed, expected)


@settings(max_examples=60, deadline=None)
@given(interleavings())
def test_all_previous_media_widens_to_phi_at_least_k(case):
    tokens, media_mask, assoc_next, k, seed = case
    _, _, changed = _perturbed(tokens, media_mask, assoc_next, k, seed, all_previous=True)
    phi = _phi(tokens, assoc_next)
    expected = (phi >= k) & (media_mask[:, k:k + 1] == 1)
    np.testing.assert_array_equal(changed, expected)


@settings(max_examples=30, deadline=None)
@given(interleavings())
def test_positions_without_media_get_exactly_zero_cross_attention(case):
    tokens, media_mask, assoc_next, k, seed = case
    y, out, _ = _perturbed(tokens, media_mask, assoc_next, k, seed, all_previous=False,
                           alpha_dense=0.0)
    phi = _phi(tokens, assoc_next)
    real = np.take_along_axis(media_mask, np.clip(phi, 0, N - 1), axis=1) == 1
    no_media = (phi < 0) | (phi >= N) | ~real
    delta = np.asarray(out) - np.asarray(y)
    np.testing.assert_array_equal(delta[no_media], 0.0)
    assert np.all(np.abs(delta[~no_media]).max(axis=-1) > 0)


def test_gates_start_at_zero_so_the_layer_is_the_identity():
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    media = jnp.asarray(rng.normal(size=(B, N, R, DM)), jnp.float32)
    mask = jnp.ones((B, L, N), bool)
    params = LAYER.init(jax.random.key(1), y, media, mask)
    assert float(params["params"]["alpha_xattn"].unbox()) == 0.0
    np.testing.assert_array_equal(np.asarray(LAYER.apply(params, y, media, mask)), np.asarray(y))
