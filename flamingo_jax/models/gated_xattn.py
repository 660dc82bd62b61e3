"""GATED XATTN-DENSE (SPEC §3.3): the trainable layer inserted before frozen LM blocks.

    y = y + tanh(α_xattn) · attention(q=LN_q(y), kv=LN_kv(media_latents))
    y = y + tanh(α_dense) · FFW(LN(y))

Both α start at 0, so at initialization the layer is the identity and Flamingo's logits
equal the frozen LM's. Which media a text token sees is given by a [B, L, N] mask built
by `media_attention_mask` from the `<image>` token positions.
"""

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.models.attention import dot_product_attention
from flamingo_jax.models.feed_forward import SquaredReluFeedForward
from flamingo_jax.models.normalization import LayerNorm
from flamingo_jax.models.projection import Projection

GATES = ("tanh", "none")


def media_attention_mask(
    tokens: jax.Array,  # [B, L] int
    image_token_id: int,
    num_media: int,
    media_mask: jax.Array | None = None,  # [B, N], 1 = real media
    assoc_next: jax.Array | None = None,  # [B], 1 = text belongs to the next media
    attend_all_previous: bool = False,
) -> jax.Array:  # [B, L, N] bool
    """Which media each text position may attend to.

    φ(ℓ) is the index of the last media at or before position ℓ (the cumulative count of
    `<image>` tokens minus one), so an `<image>` token attends to its own media. Token ℓ
    attends only to media φ(ℓ), or to every media ≤ φ(ℓ) when `attend_all_previous`. For
    examples with `assoc_next`, text attends to the first media at or after it instead.
    Positions with no such media get an all-False row.
    """
    is_image = (tokens == image_token_id).astype(jnp.int32)  # [B, L]
    count = jnp.cumsum(is_image, axis=1)  # <image> tokens at or before ℓ
    phi = count - 1  # last media at or before ℓ; -1 = none
    if assoc_next is not None:
        phi_next = count - is_image  # first media at or after ℓ
        phi = jnp.where(assoc_next.astype(bool)[:, None], phi_next, phi)
    media_index = jnp.arange(num_media)[None, None, :]  # [1, 1, N]
    if attend_all_previous:
        mask = media_index <= phi[..., None]
    else:
        mask = media_index == phi[..., None]
    if media_mask is not None:
        mask = mask & media_mask.astype(bool)[:, None, :]
    return mask


class GatedCrossAttentionDense(nn.Module):
    """Tanh-gated cross-attention from text to media latents, then a gated feed-forward."""

    num_heads: int
    head_dim: int
    ffw_mult: int = 4
    gate: str = "tanh"  # "tanh" (paper) or "none" (ablation: ungated residuals)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _gate(self, name: str) -> jax.Array:
        alpha = self.param(
            name, nn.with_logical_partitioning(nn.initializers.zeros, ()), (), self.param_dtype
        )
        if self.gate == "tanh":
            return jnp.tanh(alpha.astype(jnp.float32)).astype(self.dtype)
        if self.gate == "none":
            return jnp.ones((), self.dtype)
        raise ValueError(f"xattn.gate={self.gate!r}; allowed: {GATES}")

    @nn.compact
    def __call__(
        self,
        y: jax.Array,  # [B, L, D]
        media: jax.Array | None,  # [B, N, R, Dm]; None when `cache` holds its keys/values
        mask: jax.Array,  # [B, L, N] bool
        cache: Mapping[str, jax.Array] | None = None,  # decoding: {} or {"k", "v"}
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:  # [B, L, D] (, cache)
        """With `cache` (decoding) the media keys/values [B, N·R, H, Dh] are taken from it
        when present, else computed from `media`, and returned for the next call."""
        n = mask.shape[-1]
        d = y.shape[-1]
        def dense(features, axes, name, num_input_axes=1):
            return Projection(features, axes, num_input_axes, dtype=self.dtype,
                              param_dtype=self.param_dtype, name=name)

        heads = (self.num_heads, self.head_dim)
        q = dense(heads, ("embed", "heads", "kv"), "q")(LayerNorm(dtype=self.dtype, name="norm_q")(y))
        if cache:
            k, v = cache["k"], cache["v"]
        else:
            b, _, r, dm = media.shape
            kv_in = LayerNorm(dtype=self.dtype, name="norm_kv")(media).reshape(b, n * r, dm)
            k = dense(heads, ("embed", "heads", "kv"), "k")(kv_in)  # [B, N·R, H, Dh]
            v = dense(heads, ("embed", "heads", "kv"), "v")(kv_in)
        r = k.shape[1] // n
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        key_mask = jnp.repeat(mask, r, axis=-1)[:, None, :, :]  # [B, 1, L, N·R]
        attn = dot_product_attention(q, k, v, key_mask)  # [B, L, H, Dh]
        attn = dense((d,), ("heads", "kv", "embed"), "o", num_input_axes=2)(attn)
        has_media = jnp.any(mask, axis=-1)[..., None].astype(attn.dtype)  # [B, L, 1]
        y = y + self._gate("alpha_xattn") * (attn * has_media)

        ffw_in = LayerNorm(dtype=self.dtype, name="norm_ffw")(y)
        ffw = SquaredReluFeedForward(
            hidden_dim=self.ffw_mult * d, dtype=self.dtype, param_dtype=self.param_dtype,
            name="ffw",
        )(ffw_in)
        y = y + self._gate("alpha_dense") * ffw
        y = nn.with_logical_constraint(y, ("batch", "length", "embed"))
        return y if cache is None else (y, {"k": k, "v": v})
