"""Perceiver Resampler (SPEC §3.2): a variable number of vision features per media → R
learned latents.

x_f [T, S, d] + learned time embedding [T, 1, d] is flattened to [T·S, d]; R latents
attend to concat(x_f, latents) in each of `num_layers` layers, followed by a squared-ReLU
feed-forward; a final LayerNorm. No spatial position encoding. Videos longer than
`max_frames` get linearly interpolated time embeddings.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.models.attention import dot_product_attention
from flamingo_jax.models.feed_forward import SquaredReluFeedForward
from flamingo_jax.models.normalization import LayerNorm
from flamingo_jax.models.projection import Projection


def interpolate_time_embedding(
    emb: jax.Array,  # [T_max, D]
    num_frames: int,
) -> jax.Array:  # [num_frames, D]
    """First `num_frames` rows when the video is not longer than trained, else a linear
    interpolation that keeps the first and last rows (align-corners)."""
    t_max = emb.shape[0]
    if num_frames <= t_max:
        return emb[:num_frames]
    pos = jnp.linspace(0.0, t_max - 1.0, num_frames)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, t_max - 1)
    w = (pos - lo)[:, None]
    return emb[lo] * (1.0 - w) + emb[hi] * w


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media features, latents)."""

    num_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, T·S, D] media features
        latents: jax.Array,  # [B, R, D]
    ) -> jax.Array:  # [B, R, D]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(name="norm_media", **kw)(x)
        latents = LayerNorm(name="norm_latents", **kw)(latents)

        def proj(inputs, name):
            return Projection((self.num_heads, self.head_dim), ("embed", "heads", "kv"),
                              name=name, **kw)(inputs)

        kv_in = jnp.concatenate([x, latents], axis=1)  # [B, T·S + R, D]
        out = dot_product_attention(proj(latents, "q"), proj(kv_in, "k"), proj(kv_in, "v"))
        return Projection((latents.shape[-1],), ("heads", "kv", "embed"), num_input_axes=2,
                          name="o", **kw)(out)


class PerceiverResampler(nn.Module):
    num_layers: int = 6
    dim: int = 1536
    num_heads: int = 16
    head_dim: int = 128
    num_latents: int = 64
    max_frames: int = 8
    ffw_mult: int = 4
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        features: jax.Array,  # [B, N, T, S, d] vision features
    ) -> jax.Array:  # [B, N, R, D]
        if features.ndim != 5:
            raise ValueError(
                f"resampler expects vision features [B, N, T, S, d], got shape {features.shape}"
            )
        b, n, t, s, d = features.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = features.astype(self.dtype)
        if d != self.dim:
            x = nn.Dense(
                self.dim, name="input_proj",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("conv_out", "embed")
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                **kw,
            )(x)
        time_emb = self.param(
            "time_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("frames", "embed")),
            (self.max_frames, self.dim), self.param_dtype,
        )
        time_emb = interpolate_time_embedding(time_emb.astype(self.dtype), t)  # [T, D]
        x = x + time_emb[None, None, :, None, :]
        x = x.reshape(b * n, t * s, self.dim)  # [B·N, T·S, D]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        latents = self.param(
            "latents",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("latents", "embed")),
            (self.num_latents, self.dim), self.param_dtype,
        )
        lat = jnp.broadcast_to(latents.astype(self.dtype), (b * n, self.num_latents, self.dim))
        for i in range(self.num_layers):
            lat = lat + PerceiverAttention(
                self.num_heads, self.head_dim, name=f"layers_{i}_attn", **kw
            )(x, lat)
            h = LayerNorm(name=f"layers_{i}_ffw_norm", **kw)(lat)
            lat = lat + SquaredReluFeedForward(
                self.ffw_mult * self.dim, name=f"layers_{i}_ffw", **kw
            )(h)
            lat = nn.with_logical_constraint(lat, ("batch", "latents", "embed"))
        lat = LayerNorm(name="final_norm", **kw)(lat)
        return lat.reshape(b, n, self.num_latents, self.dim)
