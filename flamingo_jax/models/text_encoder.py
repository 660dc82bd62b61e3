"""BERT-style text tower of the contrastive vision-text model (SPEC §3.1; Flamingo paper
appendix B.1.3): a bidirectional transformer over token ids, mean-pooled over the
non-padding tokens.

Pre-norm blocks (LayerNorm → attention / GELU MLP → residual) with learned absolute
position embeddings and a final LayerNorm. Padding (id `pad_id`) is masked out of the
attention keys and out of the pooling.

Parameter tree:
    token_embedding [V, D], position_embedding [max_length, D]
    layers_{i}/attn_norm/{scale, bias}, attn/{q,k,v}/{kernel [D, H, Dh], bias [H, Dh]},
              attn/o/{kernel [H, Dh, D], bias [D]}, mlp_norm/{scale, bias},
              mlp/wi/{kernel [D, F], bias [F]}, mlp/wo/{kernel [F, D], bias [D]}
    final_norm/{scale, bias}
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.models.attention import dot_product_attention
from flamingo_jax.models.normalization import LayerNorm
from flamingo_jax.models.projection import Projection

_INIT = nn.initializers.normal(stddev=0.02)


class BidirectionalAttention(nn.Module):
    """Multi-head self-attention in which every token sees every non-padding token."""

    num_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x [B, L, D], key_mask [B, L] bool (True = real token) -> [B, L, D]."""
        kw = dict(use_bias=True, kernel_init=_INIT, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        heads = (self.num_heads, self.head_dim)
        q = Projection(heads, ("embed", "heads", "kv"), name="q", **kw)(x)  # [B, L, H, Dh]
        k = Projection(heads, ("embed", "heads", "kv"), name="k", **kw)(x)
        v = Projection(heads, ("embed", "heads", "kv"), name="v", **kw)(x)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        out = dot_product_attention(q, k, v, key_mask[:, None, None, :])  # [B, L, H, Dh]
        return Projection((x.shape[-1],), ("heads", "kv", "embed"), num_input_axes=2,
                          name="o", **kw)(out)


class GeluFeedForward(nn.Module):
    """Dense(hidden) → GELU → Dense(D), as in BERT."""

    hidden_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, D]
        kw = dict(use_bias=True, kernel_init=_INIT, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        h = Projection((self.hidden_dim,), ("embed", "mlp"), name="wi", **kw)(x)
        h = nn.with_logical_constraint(jax.nn.gelu(h, approximate=False),
                                       ("batch", "length", "mlp"))
        return Projection((x.shape[-1],), ("mlp", "embed"), name="wo", **kw)(h)


class EncoderBlock(nn.Module):
    num_heads: int
    head_dim: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:  # [B, L, D]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(name="attn_norm", **kw)(x)
        x = x + BidirectionalAttention(self.num_heads, self.head_dim, name="attn", **kw)(
            h, key_mask)
        h = LayerNorm(name="mlp_norm", **kw)(x)
        x = x + GeluFeedForward(self.mlp_dim, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class TextEncoder(nn.Module):
    """tokens [B, L] int -> mean-pooled text features [B, D] float32."""

    vocab_size: int  # every id the tokenizer can emit (pretrained pieces + appended tokens)
    num_layers: int
    dim: int
    num_heads: int
    mlp_dim: int
    max_length: int
    head_dim: int | None = None  # default dim // num_heads
    pad_id: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens must be integer [B, L], got shape {tokens.shape} dtype {tokens.dtype}"
            )
        length = tokens.shape[1]
        if length > self.max_length:
            raise ValueError(
                f"text of length {length} is longer than the text tower's max_length="
                f"{self.max_length} (config.model.text.max_length)"
            )
        head_dim = self.head_dim or self.dim // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        token_embedding = self.param(
            "token_embedding", nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
            (self.vocab_size, self.dim), self.param_dtype,
        )
        position_embedding = self.param(
            "position_embedding", nn.with_logical_partitioning(_INIT, (None, "embed")),
            (self.max_length, self.dim), self.param_dtype,
        )
        ids = jnp.clip(tokens, 0, self.vocab_size - 1)
        x = jnp.take(token_embedding, ids, axis=0) + position_embedding[None, :length]
        x = nn.with_logical_constraint(x.astype(self.dtype), ("batch", "length", "embed"))
        real = tokens != self.pad_id  # [B, L]
        for i in range(self.num_layers):
            x = EncoderBlock(self.num_heads, head_dim, self.mlp_dim, name=f"layers_{i}",
                             **kw)(x, real)
        x = LayerNorm(name="final_norm", **kw)(x).astype(jnp.float32)  # [B, L, D]
        weights = real.astype(jnp.float32)[..., None]  # [B, L, 1]
        pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return nn.with_logical_constraint(pooled, ("batch", "embed"))  # [B, D]
