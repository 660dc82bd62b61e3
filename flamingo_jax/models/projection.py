"""A linear map between multi-axis feature shapes, e.g. [.., D] → [.., H, Dh] or
[.., H, Dh] → [.., D], whose kernel is created in its true shape with logical axis names.

(flax's DenseGeneral initialises a flattened kernel and reshapes it, which breaks the
kernel's logical sharding constraint when parameters are initialised under a mesh.)
"""

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _drawn_as_matrix(init: Callable, fan_in: int) -> Callable:
    """`init` drawn as a [fan_in, fan_out] matrix and reshaped: the same distribution, and
    on CPU far cheaper to compile than random draws of rank 3 or more."""

    def draw(key, shape, dtype=jnp.float32):
        return init(key, (fan_in, math.prod(shape) // fan_in), dtype).reshape(shape)

    return draw


class Projection(nn.Module):
    features: Sequence[int]  # output feature shape
    axes: Sequence[str | None]  # logical names of the kernel: input axes then output axes
    num_input_axes: int = 1  # trailing input axes contracted
    use_bias: bool = False
    kernel_init: Callable | None = None  # default: LeCun normal over the contracted axes
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, features = self.num_input_axes, tuple(self.features)
        shape = x.shape[-n_in:] + features
        if len(self.axes) != len(shape):
            raise ValueError(f"{len(self.axes)} logical axes {self.axes} for kernel {shape}")
        init = _drawn_as_matrix(
            self.kernel_init or nn.initializers.lecun_normal(), math.prod(shape[:n_in])
        )
        kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                            shape, self.param_dtype)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.axes[n_in:])),
                features, self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y
