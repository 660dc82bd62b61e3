"""Feed-forward blocks: squared-ReLU (resampler, gated xattn) and SwiGLU (Llama LM)."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def _dense(features, axes, name, dtype, param_dtype, use_bias=False):
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
        name=name,
    )


class SquaredReluFeedForward(nn.Module):
    """Dense(hidden) → relu(x)² → Dense(D), as in the Flamingo paper."""

    hidden_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
        h = _dense(self.hidden_dim, ("embed", "mlp"), "wi", self.dtype, self.param_dtype)(x)
        h = jnp.square(jax.nn.relu(h))
        return _dense(x.shape[-1], ("mlp", "embed"), "wo", self.dtype, self.param_dtype)(h)


class SwiGLUFeedForward(nn.Module):
    """Llama MLP: down(silu(gate(x)) · up(x))."""

    hidden_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, D]
        gate = _dense(self.hidden_dim, ("embed", "mlp"), "gate", self.dtype, self.param_dtype)(x)
        up = _dense(self.hidden_dim, ("embed", "mlp"), "up", self.dtype, self.param_dtype)(x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _dense(x.shape[-1], ("mlp", "embed"), "down", self.dtype, self.param_dtype)(h)
