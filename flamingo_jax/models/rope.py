"""Rotary position embeddings in the Hugging Face Llama layout (rotate-half)."""

import jax
import jax.numpy as jnp


def apply_rope(
    x: jax.Array,  # [B, L, H, Dh]
    positions: jax.Array,  # [B, L] int
    theta: float,
) -> jax.Array:  # [B, L, H, Dh]
    dh = x.shape[-1]
    if dh % 2:
        raise ValueError(f"RoPE needs an even head size, got {dh}")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))  # [Dh/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, Dh]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
