"""Llama-family decoder (SPEC §3.4) with GATED XATTN-DENSE layers (SPEC §3.3).

RMSNorm, RoPE, SwiGLU, grouped-query attention, optional qkv bias, tied or untied output
head, so Llama / Mistral / Qwen2-style checkpoints import by name. A gated cross-attention
layer `xattn_{i}` is placed before block `layers_{i}` when i % xattn_every == 0; the LM
called without media skips them, so a text-only LM's parameters are exactly the frozen
part of Flamingo's `lm` subtree.

Vocabulary: `vocab_size` pretrained rows (frozen) plus `num_extra_tokens` appended rows
(`<image>`, `<EOC>`; trainable) kept in separate parameters (`embed/extra_embedding`,
`extra_head/kernel`) so that trainability is a rule over parameter paths.

Parameter tree:
    embed/{embedding [V, D], extra_embedding [E, D]}
    layers_{i}/attn_norm/scale, attn/{q,k,v}/{kernel [D, H|G, Dh], bias}, attn/o/kernel
              [H, Dh, D], mlp_norm/scale, mlp/{gate,up}/kernel [D, F], mlp/down/kernel [F, D]
    xattn_{i}/... (gated_xattn.GatedCrossAttentionDense)
    final_norm/scale; head/kernel [D, V] and extra_head/kernel [D, E] unless tied.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.models.attention import dot_product_attention
from flamingo_jax.models.feed_forward import SwiGLUFeedForward
from flamingo_jax.models.gated_xattn import GatedCrossAttentionDense
from flamingo_jax.models.normalization import RMSNorm
from flamingo_jax.models.projection import Projection
from flamingo_jax.models.rope import apply_rope

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _init(axes):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes)


class Embedder(nn.Module):
    """Token embedding split into frozen pretrained rows and trainable appended rows."""

    vocab_size: int
    num_extra_tokens: int
    dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", _init(("vocab", "embed")), (self.vocab_size, self.dim), self.param_dtype
        )
        self.extra_embedding = self.param(
            "extra_embedding", _init((None, "embed")), (self.num_extra_tokens, self.dim),
            self.param_dtype,
        )

    def encode(self, tokens: jax.Array) -> jax.Array:  # [B, L] -> [B, L, D]
        pretrained = jnp.take(self.embedding, jnp.clip(tokens, 0, self.vocab_size - 1), axis=0)
        if self.num_extra_tokens == 0:
            return pretrained.astype(self.dtype)
        extra_ids = jnp.clip(tokens - self.vocab_size, 0, self.num_extra_tokens - 1)
        extra = jnp.take(self.extra_embedding, extra_ids, axis=0)
        is_extra = (tokens >= self.vocab_size)[..., None]
        return jnp.where(is_extra, extra, pretrained).astype(self.dtype)

    def decode(self, x: jax.Array) -> jax.Array:  # tied head: [B, L, D] -> [B, L, V + E]
        logits = jnp.einsum("bld,vd->blv", x, self.embedding.astype(self.dtype))
        extra = jnp.einsum("bld,vd->blv", x, self.extra_embedding.astype(self.dtype))
        return jnp.concatenate([logits, extra], axis=-1)


class SelfAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    qkv_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:  # [B, L, D]
        def proj(heads, axes, name):
            return Projection(
                (heads, self.head_dim), ("embed",) + axes, use_bias=self.qkv_bias,
                kernel_init=nn.initializers.normal(stddev=0.02), dtype=self.dtype,
                param_dtype=self.param_dtype, name=name,
            )(x)

        q = proj(self.num_heads, ("heads", "kv"), "q")  # [B, L, H, Dh]
        k = proj(self.num_kv_heads, ("kv_heads", "kv"), "k")  # [B, L, G, Dh]
        v = proj(self.num_kv_heads, ("kv_heads", "kv"), "v")
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        length = x.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, L, L]
        out = dot_product_attention(q, k, v, causal)
        return Projection(
            (x.shape[-1],), ("heads", "kv", "embed"), num_input_axes=2,
            kernel_init=nn.initializers.normal(stddev=0.02), dtype=self.dtype,
            param_dtype=self.param_dtype, name="o",
        )(out)


class DecoderBlock(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then + mlp(norm(·))."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:  # [B, L, D]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(self.norm_eps, name="attn_norm", **kw)(x)
        x = x + SelfAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta, self.qkv_bias,
            name="attn", **kw,
        )(h, positions)
        h = RMSNorm(self.norm_eps, name="mlp_norm", **kw)(x)
        x = x + SwiGLUFeedForward(self.mlp_dim, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class LanguageModel(nn.Module):
    """Decoder-only LM; gated cross-attention layers run only when media are given."""

    vocab_size: int
    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    max_length: int
    num_extra_tokens: int = 2
    head_dim: int | None = None  # default dim // num_heads
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    xattn_every: int = 1
    xattn: Mapping[str, Any] | None = None  # GatedCrossAttentionDense kwargs
    remat_policy: str = "none"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def total_vocab_size(self) -> int:
        return self.vocab_size + self.num_extra_tokens

    def xattn_layer_indices(self) -> list[int]:
        if self.xattn_every < 1:
            raise ValueError(f"xattn.every={self.xattn_every}; must be >= 1")
        return [i for i in range(self.num_layers) if i % self.xattn_every == 0]

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,  # [B, L] int
        media: jax.Array | None = None,  # [B, N, R, Dm] media latents
        media_mask: jax.Array | None = None,  # [B, L, N] bool: token → media it attends to
        positions: jax.Array | None = None,  # [B, L]
    ) -> jax.Array:  # [B, L, V + E] float32 logits
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy={self.remat_policy!r}; allowed: {sorted(REMAT_POLICIES)}"
            )
        if (media is None) != (media_mask is None):
            raise ValueError("media and media_mask must be given together")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embedder = Embedder(self.vocab_size, self.num_extra_tokens, self.dim, name="embed", **kw)
        x = nn.with_logical_constraint(embedder.encode(tokens), ("batch", "length", "embed"))

        block_cls = DecoderBlock
        xattn_cls = GatedCrossAttentionDense
        if REMAT_POLICIES[self.remat_policy] is not None:
            policy = REMAT_POLICIES[self.remat_policy]
            block_cls = nn.remat(DecoderBlock, policy=policy)
            xattn_cls = nn.remat(GatedCrossAttentionDense, policy=policy)
        xattn_at = set(self.xattn_layer_indices()) if media is not None else set()
        head_dim = self.head_dim or self.dim // self.num_heads
        for i in range(self.num_layers):
            if i in xattn_at:
                x = xattn_cls(**(self.xattn or {}), name=f"xattn_{i}", **kw)(x, media, media_mask)
            x = block_cls(
                self.num_heads, self.num_kv_heads, head_dim, self.mlp_dim, self.rope_theta,
                self.norm_eps, self.qkv_bias, name=f"layers_{i}", **kw,
            )(x, positions)
        x = RMSNorm(self.norm_eps, name="final_norm", **kw)(x)
        if self.tie_embeddings:
            logits = embedder.decode(x)
        else:
            head = nn.Dense(
                self.vocab_size, use_bias=False, kernel_init=_init(("embed", "vocab")),
                name="head", **kw,
            )(x)
            extra = nn.Dense(
                self.num_extra_tokens, use_bias=False, kernel_init=_init(("embed", None)),
                name="extra_head", **kw,
            )(x)
            logits = jnp.concatenate([head, extra], axis=-1)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)
