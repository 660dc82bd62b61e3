"""Multi-head dot-product attention shared by the LM, the gated cross-attention and the
Perceiver Resampler.

Shapes: B batch, Q query positions, K key positions, H query heads, G key/value heads
(grouped-query attention: H % G == 0), Dh head size.
"""

import jax
import jax.numpy as jnp

# Large negative logit for masked keys; finite so that a fully masked row stays finite.
MASK_VALUE = -1e9


def dot_product_attention(
    q: jax.Array,  # [B, Q, H, Dh]
    k: jax.Array,  # [B, K, G, Dh]
    v: jax.Array,  # [B, K, G, Dh]
    mask: jax.Array | None = None,  # broadcastable to [B, H, Q, K], True = attend
) -> jax.Array:  # [B, Q, H, Dh]
    """Softmax attention with grouped key/value heads; softmax in float32."""
    b, q_len, h, dh = q.shape
    g = k.shape[2]
    if h % g:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({g})")
    q = q.reshape(b, q_len, g, h // g, dh) * (dh**-0.5)  # [B, Q, G, H/G, Dh]
    logits = jnp.einsum("bqgrd,bkgd->bgrqk", q, k).astype(jnp.float32)
    logits = logits.reshape(b, h, q_len, k.shape[1])  # [B, H, Q, K]
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    weights = weights.reshape(b, g, h // g, q_len, k.shape[1])
    out = jnp.einsum("bgrqk,bkgd->bqgrd", weights, v)
    return out.reshape(b, q_len, h, dh)
