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

Decoding (flamingo_jax/decoding.py) passes a key/value `cache` (see `init_cache`): each
self-attention writes its new keys/values at the tokens' positions into a fixed-size
[B, M, G, Dh] buffer and attends to the buffer's positions at or before each query; each
gated layer computes its media keys/values once (prefill) and reuses them every step.
Without a cache the forward pass is the training one.
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
    def __call__(
        self,
        x: jax.Array,  # [B, L, D]
        positions: jax.Array,  # [B, L]
        cache: Mapping[str, jax.Array] | None = None,  # {"k", "v"}: [B, M, G, Dh]
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:  # [B, L, D] (, new cache)
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
        if cache is None:
            length = x.shape[1]
            mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, L, L]
        else:
            cache, mask = write_kv_cache(cache, k, v, positions)
            k, v = cache["k"], cache["v"]  # [B, M, G, Dh]
        out = dot_product_attention(q, k, v, mask)
        out = Projection(
            (x.shape[-1],), ("heads", "kv", "embed"), num_input_axes=2,
            kernel_init=nn.initializers.normal(stddev=0.02), dtype=self.dtype,
            param_dtype=self.param_dtype, name="o",
        )(out)
        return out if cache is None else (out, cache)


def write_kv_cache(
    cache: Mapping[str, jax.Array],  # {"k", "v"}: [B, M, G, Dh]
    k: jax.Array,  # [B, L, G, Dh]
    v: jax.Array,  # [B, L, G, Dh]
    positions: jax.Array,  # [B, L] int, each row's slots in the cache
) -> tuple[dict[str, jax.Array], jax.Array]:  # new cache, mask [B, 1, L, M]
    """Writes each token's key/value at the cache slot equal to its position, and masks
    every slot after the query's position (causal; later slots hold padding or stale
    entries that are overwritten before any query can see them)."""
    rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]
    new = {
        "k": cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype)),
        "v": cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype)),
    }
    slots = jnp.arange(cache["k"].shape[1])
    mask = slots[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, L, M]
    return new, mask


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
    def __call__(
        self,
        x: jax.Array,  # [B, L, D]
        positions: jax.Array,  # [B, L]
        cache: Mapping[str, jax.Array] | None = None,  # self-attention {"k", "v"}
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:  # [B, L, D] (, new cache)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(self.norm_eps, name="attn_norm", **kw)(x)
        attn = SelfAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta, self.qkv_bias,
            name="attn", **kw,
        )(h, positions, cache)
        if cache is not None:
            attn, cache = attn
        x = x + attn
        h = RMSNorm(self.norm_eps, name="mlp_norm", **kw)(x)
        x = x + SwiGLUFeedForward(self.mlp_dim, name="mlp", **kw)(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x if cache is None else (x, cache)


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

    def init_cache(
        self, batch_size: int, length: int
    ) -> dict[str, dict[str, jax.Array]]:  # layers_{i}: {"k", "v"} [B, M, G, Dh] zeros
        """An empty self-attention key/value cache of `length` slots for decoding; the
        gated layers' media keys/values are added by the first (prefill) call."""
        head_dim = self.head_dim or self.dim // self.num_heads
        shape = (batch_size, length, self.num_kv_heads, head_dim)
        return {
            f"layers_{i}": {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
            for i in range(self.num_layers)
        }

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,  # [B, L] int
        media: jax.Array | None = None,  # [B, N, R, Dm] media latents
        media_mask: jax.Array | None = None,  # [B, L, N] bool: token → media it attends to
        positions: jax.Array | None = None,  # [B, L]
        cache: Mapping[str, Mapping[str, jax.Array]] | None = None,  # from init_cache
    ) -> jax.Array | tuple[jax.Array, dict]:  # [B, L, V + E] float32 logits (, new cache)
        """With `cache` (decoding), tokens are written at their `positions` (required) and
        the call returns (logits, new cache); media may then be None when the cache
        already holds the gated layers' media keys/values."""
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy={self.remat_policy!r}; allowed: {sorted(REMAT_POLICIES)}"
            )
        cached_media = cache is not None and any(name.startswith("xattn_") for name in cache)
        if (media is None and not cached_media) != (media_mask is None):
            raise ValueError("media and media_mask must be given together")
        if cache is not None and positions is None:
            raise ValueError("decoding with a cache needs the tokens' positions [B, L]")
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
        if cache is not None:  # decoding: no gradients, so nothing to rematerialize
            block_cls, xattn_cls = DecoderBlock, GatedCrossAttentionDense
        xattn_at = set(self.xattn_layer_indices()) if media_mask is not None else set()
        head_dim = self.head_dim or self.dim // self.num_heads
        new_cache = {}
        for i in range(self.num_layers):
            if i in xattn_at:
                xattn = xattn_cls(**(self.xattn or {}), name=f"xattn_{i}", **kw)
                if cache is None:
                    x = xattn(x, media, media_mask)
                else:
                    x, new_cache[f"xattn_{i}"] = xattn(
                        x, media, media_mask, cache=cache.get(f"xattn_{i}", {})
                    )
            block = block_cls(
                self.num_heads, self.num_kv_heads, head_dim, self.mlp_dim, self.rope_theta,
                self.norm_eps, self.qkv_bias, name=f"layers_{i}", **kw,
            )
            if cache is None:
                x = block(x, positions)
            else:
                x, new_cache[f"layers_{i}"] = block(x, positions, cache[f"layers_{i}"])
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
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)
