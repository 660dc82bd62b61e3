"""NFNet (Brock et al., 2021, arXiv 2102.06171): the normalizer-free vision encoder.

Architecture of DeepMind's NFNet-F0…F7 (as ported by timm's `dm_nfnet_f*`):
- stem: four 3×3 scaled-WS convs (stride 2, 1, 1, 2) → stem_widths…, widths[0]/2,
  scaled activations between them; total stride 4;
- four stages of pre-activation bottleneck blocks (strides 1, 2, 2, 2; total stride 32);
  the first block of each stage is a transition block whose shortcut is
  avgpool2×2 (stride 2 only) + conv1×1 applied to act(x)·β;
- residual branch: conv1×1 → grouped conv3×3 (stride) → grouped conv3×3 → conv1×1 →
  squeeze-excite ×2 → stochastic depth → ×skip_gain (init 0), then ·α + shortcut;
- head (only when num_classes is set): conv1×1 to 2×widths[-1], act, global mean pool,
  dropout, dense.
All convs use 'SAME' padding (TF/JAX convention: extra padding at the bottom/right).

Parameter tree (NFNet.init(...)['params']):
    stem_conv{1,2,3,4}/{kernel, gain, bias}
    stage{s}_block{b}/{shortcut_conv?, conv1, conv2, conv2b, conv3}/{kernel, gain, bias}
    stage{s}_block{b}/se/{fc1, fc2}/{kernel, bias}
    stage{s}_block{b}/skip_gain                      (scalar)
    final_conv/{kernel, gain, bias}, head/{kernel, bias}   (only when num_classes is set)
`shortcut_conv` exists in transition blocks only (the first block of each stage).

Logical axis names of the parameters:
    conv kernel [kh, kw, C_in/groups, C_out]  (None, None, 'conv_in', 'conv_out')
    conv gain, conv bias [C_out]              ('conv_out',)
    SE dense kernel [C_in, C_out]             ('conv_in', 'conv_out');  bias ('conv_out',)
    skip_gain []                              ()
    head kernel [2·widths[-1], num_classes]   ('conv_in', 'classes');   bias ('classes',)
Activations: feature maps ('batch', None, None, 'conv_out'); logits ('batch', 'classes').
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Scaled activations keep the variance of a unit Gaussian input at 1 (DeepMind constants).
ACTIVATION_GAMMA = {
    "gelu": 1.7015043497085571,
    "relu": 1.7139588594436646,
}
WS_EPS_FORMS = ("max", "add")

_CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
_FEATURE_MAP_AXES = ("batch", None, None, "conv_out")


def fan_in_normal(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """N(0, 1/fan_in) with fan_in = prod(shape[:-1]) (He/LeCun 'fan_in' normal, gain 1).

    Drawn flat and reshaped: the same distribution as variance_scaling(1, 'fan_in', 'normal'),
    but XLA:CPU compiles a rank-1 draw in well under a second where a rank-4 draw with
    partitionable threefry takes several seconds per shape.
    """
    fan_in = math.prod(shape[:-1])
    flat = jax.random.normal(key, (math.prod(shape),), jnp.float32) * fan_in**-0.5
    return flat.reshape(shape).astype(dtype)


def scaled_activation(x: jax.Array, activation: str) -> jax.Array:
    """GELU (exact, erf form) or ReLU, multiplied by its variance-preserving gamma."""
    if activation == "gelu":
        return jax.nn.gelu(x, approximate=False) * ACTIVATION_GAMMA["gelu"]
    if activation == "relu":
        return jax.nn.relu(x) * ACTIVATION_GAMMA["relu"]
    raise ValueError(f"activation must be one of {sorted(ACTIVATION_GAMMA)}, got {activation!r}")


def standardize_kernel(
    kernel: jax.Array,  # [kh, kw, I/groups, O]
    gain: jax.Array,  # [O]
    eps: float = 1e-4,
    eps_form: str = "max",
) -> jax.Array:  # [kh, kw, I/groups, O], float32
    """Scaled Weight Standardization: gain·(W − mean)/sqrt(var·fan_in), stats over (H, W, I).

    eps_form 'max' (DeepMind, the spec): divide by sqrt(max(var·fan_in, eps)), eps 1e-4.
    eps_form 'add' (timm's ScaledStdConv2d, via batch_norm): divide by sqrt((var + eps)·fan_in),
    timm uses eps 1e-5 for dm_nfnet. The two differ by a relative ≈ eps/(2·var) per channel:
    with timm's eps 1e-5 and var ≈ 1/fan_in that is ≈ 5e-6·fan_in (0.6% at fan_in 1152), so
    parity with timm needs eps_form='add', eps=1e-5. Measured on a randomly initialised
    dm_nfnet_f0 (skip gains ≈ 1, 192×200 input): logits differ from timm's by 4.0% (max
    relative) with the default form and by 1.4e-6 with timm's.
    """
    if eps_form not in WS_EPS_FORMS:
        raise ValueError(f"eps_form must be one of {WS_EPS_FORMS}, got {eps_form!r}")
    w = kernel.astype(jnp.float32)
    fan_in = math.prod(w.shape[:-1])
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)  # [1, 1, 1, O]
    var = jnp.var(w, axis=(0, 1, 2), keepdims=True)  # [1, 1, 1, O]
    if eps_form == "max":
        scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps))
    else:
        scale = jax.lax.rsqrt((var + eps) * fan_in)
    return (w - mean) * scale * gain.astype(jnp.float32)


class ScaledStdConv(nn.Module):
    """2-D conv with Scaled Weight Standardization, 'SAME' padding, learnable gain and bias."""

    features: int
    kernel_size: int = 1
    strides: int = 1
    feature_group_count: int = 1
    ws_eps: float = 1e-4
    ws_eps_form: str = "max"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, I] -> [B, H', W', O]
        in_features = x.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"input channels ({in_features}) must be divisible by feature_group_count "
                f"({self.feature_group_count})"
            )
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(fan_in_normal, _CONV_KERNEL_AXES),
            (k, k, in_features // self.feature_group_count, self.features),
            self.param_dtype,
        )  # [k, k, I/groups, O]
        gain = self.param(
            "gain",
            nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
            (self.features,),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
            (self.features,),
            self.param_dtype,
        )
        w = standardize_kernel(kernel, gain, self.ws_eps, self.ws_eps_form).astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            w,
            window_strides=(self.strides, self.strides),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.feature_group_count,
        )
        return y + bias.astype(self.dtype)


class SqueezeExcite(nn.Module):
    """x · sigmoid(fc2(relu(fc1(mean_hw(x))))) · gain: channel gating (gain 2 in NFNets)."""

    hidden: int
    gain: float = 2.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H, W, C]
        c = x.shape[-1]

        def dense(features: int, name: str) -> nn.Dense:
            return nn.Dense(
                features,
                kernel_init=nn.with_logical_partitioning(fan_in_normal, ("conv_in", "conv_out")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)  # [B, C]
        s = nn.relu(dense(self.hidden, "fc1")(s))  # [B, hidden]
        s = nn.sigmoid(dense(c, "fc2")(s))  # [B, C]
        return x * (self.gain * s)[:, None, None, :]


class NFBlock(nn.Module):
    """Pre-activation NF bottleneck block.

    out = skip_gain · drop(SE(branch(act(x)·β))) · α + shortcut
    """

    features: int
    strides: int = 1
    beta: float = 1.0
    alpha: float = 0.2
    group_width: int = 128
    bottleneck_ratio: float = 0.5
    se_ratio: float = 0.5
    stochastic_depth_rate: float = 0.0
    activation: str = "gelu"
    ws_eps: float = 1e-4
    ws_eps_form: str = "max"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # [B, H, W, C_in]
        mid = int(self.features * self.bottleneck_ratio)
        groups = mid // self.group_width
        if groups < 1:
            raise ValueError(
                f"bottleneck width {mid} (= {self.features}·{self.bottleneck_ratio}) is smaller "
                f"than group_width {self.group_width}"
            )
        mid = groups * self.group_width

        def conv(features: int, kernel_size: int, name: str, strides: int = 1, groups: int = 1):
            return ScaledStdConv(
                features, kernel_size, strides, groups, self.ws_eps, self.ws_eps_form,
                self.dtype, self.param_dtype, name=name,
            )

        def act(y: jax.Array) -> jax.Array:
            return scaled_activation(y, self.activation)

        out = act(x) * self.beta  # [B, H, W, C_in]
        shortcut = x
        if x.shape[-1] != self.features or self.strides != 1:  # transition block
            pooled = out
            if self.strides > 1:  # ceil mode: a partial window averages its valid pixels
                pad = [(0, -d % self.strides) for d in out.shape[1:3]]
                pooled = nn.avg_pool(
                    out, (self.strides, self.strides), (self.strides, self.strides),
                    padding=pad, count_include_pad=False,
                )  # [B, H/s, W/s, C_in]
            shortcut = conv(self.features, 1, "shortcut_conv")(pooled)  # [B, H/s, W/s, C_out]

        y = conv(mid, 1, "conv1")(out)  # [B, H, W, mid]
        y = conv(mid, 3, "conv2", self.strides, groups)(act(y))  # [B, H/s, W/s, mid]
        y = conv(mid, 3, "conv2b", 1, groups)(act(y))  # [B, H/s, W/s, mid]
        y = conv(self.features, 1, "conv3")(act(y))  # [B, H/s, W/s, C_out]
        y = SqueezeExcite(
            max(1, int(self.features * self.se_ratio)), 2.0, self.dtype, self.param_dtype, name="se"
        )(y)
        if train and self.stochastic_depth_rate > 0.0:
            keep = jax.random.bernoulli(
                self.make_rng("dropout"), 1.0 - self.stochastic_depth_rate, (y.shape[0],)
            )  # [B]; no 1/keep rescale (DeepMind)
            y = y * keep.astype(y.dtype)[:, None, None, None]
        skip_gain = self.param(
            "skip_gain", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
            self.param_dtype,
        )
        out = y * (skip_gain.astype(self.dtype) * self.alpha) + shortcut
        return nn.with_logical_constraint(out, _FEATURE_MAP_AXES)  # [B, H/s, W/s, C_out]


class NFNet(nn.Module):
    """NFNet image encoder / classifier on NHWC float images.

    `num_classes=None` (Flamingo): returns the last stage's feature map [B, H/32, W/32,
    widths[-1]] and creates no head parameters. With `num_classes` set, returns logits
    [B, num_classes]; `return_features=True` gives the feature map from the same params.
    `train_resolution`/`test_resolution` are metadata for input pipelines; the model
    accepts any image size.
    """

    widths: tuple[int, ...] = (256, 512, 1536, 1536)
    depths: tuple[int, ...] = (1, 2, 6, 3)
    stem_widths: tuple[int, ...] = (16, 32, 64)
    group_width: int = 128
    bottleneck_ratio: float = 0.5
    se_ratio: float = 0.5
    alpha: float = 0.2
    activation: str = "gelu"
    stochastic_depth_rate: float = 0.1
    dropout_rate: float = 0.2
    num_classes: int | None = None
    ws_eps: float = 1e-4
    ws_eps_form: str = "max"
    train_resolution: int | None = None
    test_resolution: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _check_config(self) -> None:
        if len(self.widths) != len(self.depths) or not self.widths:
            raise ValueError(
                f"widths {tuple(self.widths)} and depths {tuple(self.depths)} must be non-empty "
                "and of equal length"
            )
        if self.activation not in ACTIVATION_GAMMA:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATION_GAMMA)}, got {self.activation!r}"
            )
        if self.ws_eps_form not in WS_EPS_FORMS:
            raise ValueError(f"ws_eps_form must be one of {WS_EPS_FORMS}, got {self.ws_eps_form!r}")
        if not self.stem_widths:
            raise ValueError("stem_widths must name at least one conv before the last stem conv")
        if self.widths[0] % 2:
            raise ValueError(
                f"widths[0] must be even (the stem ends at widths[0]/2), got {self.widths[0]}"
            )

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array:
        """images [B, H, W, C] float -> features [B, H/32, W/32, widths[-1]] or logits [B, K]."""
        self._check_config()
        if images.ndim != 4:
            raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images must be a float array, got dtype {images.dtype}")

        def conv(features: int, kernel_size: int, name: str, strides: int = 1):
            return ScaledStdConv(
                features, kernel_size, strides, 1, self.ws_eps, self.ws_eps_form,
                self.dtype, self.param_dtype, name=name,
            )

        def act(y: jax.Array) -> jax.Array:
            return scaled_activation(y, self.activation)

        x = images.astype(self.dtype)  # [B, H, W, C]
        stem_widths = (*self.stem_widths, self.widths[0] // 2)
        stem_strides = (2,) + (1,) * (len(stem_widths) - 2) + (2,)
        for i, (w, s) in enumerate(zip(stem_widths, stem_strides)):
            if i:
                x = act(x)
            x = conv(w, 3, f"stem_conv{i + 1}", s)(x)  # [B, H/4, W/4, widths[0]/2] at the end

        num_blocks = sum(self.depths)
        block_index = 0
        expected_var = 1.0
        for stage, (width, depth) in enumerate(zip(self.widths, self.depths)):
            for b in range(depth):
                x = NFBlock(
                    features=width,
                    strides=(1 if stage == 0 else 2) if b == 0 else 1,
                    beta=1.0 / math.sqrt(expected_var),
                    alpha=self.alpha,
                    group_width=self.group_width,
                    bottleneck_ratio=self.bottleneck_ratio,
                    se_ratio=self.se_ratio,
                    stochastic_depth_rate=self.stochastic_depth_rate * block_index / num_blocks,
                    activation=self.activation,
                    ws_eps=self.ws_eps,
                    ws_eps_form=self.ws_eps_form,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"stage{stage}_block{b}",
                )(x, train)  # [B, h, w, width]
                if b == 0:
                    expected_var = 1.0  # the transition block's shortcut resets the variance
                expected_var += self.alpha**2
                block_index += 1

        if self.num_classes is None or return_features:
            return x  # [B, H/32, W/32, widths[-1]]

        x = act(conv(2 * self.widths[-1], 1, "final_conv")(x))  # [B, h, w, 2·widths[-1]]
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)  # [B, 2·widths[-1]]
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(
            self.num_classes,
            kernel_init=nn.with_logical_partitioning(  # zero init as in DeepMind's NFNet
                nn.initializers.zeros, ("conv_in", "classes")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="head",
        )(x)  # [B, num_classes]
        return nn.with_logical_constraint(logits, ("batch", "classes"))


# DeepMind's NFNet-F table: (train resolution, test resolution, dropout rate); depths are
# (k + 1)·[1, 2, 6, 3] for Fk; stochastic depth rate 0.1 for all.
_F_VARIANTS = {
    "F0": (192, 256, 0.2),
    "F1": (224, 320, 0.3),
    "F2": (256, 352, 0.4),
    "F3": (320, 416, 0.4),
    "F4": (384, 512, 0.5),
    "F5": (416, 544, 0.5),
    "F6": (448, 576, 0.5),
    "F7": (480, 608, 0.5),
}
# Small variants for tests and the demo (not pretrained anywhere). Every channel count is a
# multiple of 8, so 'conv_out' → 'fsdp' sharding divides them on up to 8 devices.
_TINY_VARIANTS = {
    "tiny": dict(
        widths=(16, 32, 64, 64), depths=(1, 1, 1, 1), stem_widths=(8, 8, 8), group_width=8,
        stochastic_depth_rate=0.0, dropout_rate=0.0, train_resolution=64, test_resolution=64,
    ),
    "mini": dict(
        widths=(32, 64, 128, 128), depths=(1, 2, 3, 2), stem_widths=(8, 16, 16), group_width=16,
        stochastic_depth_rate=0.1, dropout_rate=0.1, train_resolution=64, test_resolution=64,
    ),
}
NFNET_VARIANTS = (*_F_VARIANTS, *_TINY_VARIANTS)


def nfnet_variant(name: str) -> dict:
    """NFNet keyword arguments for 'F0'…'F7', 'tiny' or 'mini' (num_classes left to the caller)."""
    if name in _F_VARIANTS:
        k = int(name[1:])
        train_res, test_res, dropout = _F_VARIANTS[name]
        return dict(
            widths=(256, 512, 1536, 1536),
            depths=tuple((k + 1) * d for d in (1, 2, 6, 3)),
            stem_widths=(16, 32, 64),
            group_width=128,
            bottleneck_ratio=0.5,
            se_ratio=0.5,
            alpha=0.2,
            activation="gelu",
            stochastic_depth_rate=0.1,
            dropout_rate=dropout,
            train_resolution=train_res,
            test_resolution=test_res,
        )
    if name in _TINY_VARIANTS:
        return dict(_TINY_VARIANTS[name])
    raise ValueError(f"unknown NFNet variant {name!r}; allowed: {', '.join(NFNET_VARIANTS)}")
