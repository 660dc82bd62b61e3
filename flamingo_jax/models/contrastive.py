"""Contrastive vision-text model that pretrains Flamingo's NFNet (SPEC §3.1; paper
appendix B.1.3): CLIP/ALIGN-style dual encoder.

    image tower: NFNet trunk → final_conv 1×1 to 2·C, scaled act → mean over space →
                 dropout → dense to the joint dim E
    text tower:  BERT-style TextEncoder, mean-pooled over non-padding tokens → dense to E
    both L2-normalised; logits = exp(logit_scale) · image_emb @ text_embᵀ

The NFNet trunk is the same module Flamingo uses (`build_vision_encoder`) under the same
name, so its parameters `vision/...` copy into a Flamingo's frozen `vision/...` as they are
(`load_vision_params`). The image head (`image_head/...`, SPEC §3.1's "head") and the text
tower stay behind.

Parameter tree:
    vision/...                                    NFNet trunk (Flamingo's vision encoder)
    image_head/final_conv/{kernel, gain, bias}    1×1 scaled-WS conv to 2·C
    image_head/projection/{kernel [2C, E], bias [E]}
    text/...                                      TextEncoder
    text_projection/{kernel [D, E], bias [E]}
    logit_scale []                                log of the inverse temperature
"""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models.flamingo import build_vision_encoder
from flamingo_jax.models.nfnet import NFNet, ScaledStdConv, scaled_activation
from flamingo_jax.models.projection import Projection
from flamingo_jax.models.text_encoder import TextEncoder

VISION_PREFIX = "vision/"


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:  # [B, E] -> [B, E] float32
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class ImageHead(nn.Module):
    """NFNet head for the contrastive stage: conv1×1 to 2·C, act, mean pool, dropout, dense."""

    embed_dim: int
    activation: str = "gelu"  # the trunk's settings
    dropout_rate: float = 0.0
    ws_eps: float = 1e-4
    ws_eps_form: str = "max"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, fmap: jax.Array, train: bool = False) -> jax.Array:
        """fmap [B, h, w, C] -> [B, E] (not normalised)."""
        x = ScaledStdConv(2 * fmap.shape[-1], 1, ws_eps=self.ws_eps,
                          ws_eps_form=self.ws_eps_form, dtype=self.dtype,
                          name="final_conv")(fmap)  # [B, h, w, 2C]
        x = scaled_activation(x, self.activation)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, 2C]
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = Projection((self.embed_dim,), ("conv_in", "joint"), use_bias=True,
                       dtype=self.dtype, name="projection")(x)  # [B, E]
        return nn.with_logical_constraint(x, ("batch", "joint"))


class ContrastiveModel(nn.Module):
    vision: NFNet
    text: TextEncoder
    embed_dim: int
    logit_scale_init: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        v = self.vision
        self.image_head = ImageHead(self.embed_dim, v.activation, v.dropout_rate, v.ws_eps,
                                    v.ws_eps_form, self.dtype)
        self.text_projection = Projection((self.embed_dim,), ("embed", "joint"), use_bias=True,
                                          dtype=self.dtype)
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(self.logit_scale_init), ()),
            (), jnp.float32,
        )

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images [B, H, W, C] float -> unit-norm embeddings [B, E] float32."""
        if images.ndim != 4:
            raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
        return l2_normalize(self.image_head(self.vision(images, train=train), train))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, L] int -> unit-norm embeddings [B, E] float32."""
        return l2_normalize(self.text_projection(self.text(tokens)))

    def scale(self) -> jax.Array:
        """The inverse temperature exp(logit_scale), capped at max_logit_scale (CLIP)."""
        return jnp.minimum(jnp.exp(self.logit_scale), self.max_logit_scale)

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False):
        """-> (image_emb [B, E], text_emb [B, E], inverse temperature [])."""
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"batch mismatch: images {images.shape} vs tokens {tokens.shape}")
        return self.encode_image(images, train), self.encode_text(tokens), self.scale()


def build_contrastive(model_config) -> ContrastiveModel:
    """ContrastiveModel from `config.model` (`vision`, `text`, `contrastive` sections)."""
    dtype = jnp.dtype(model_config.dtype)
    if model_config.vision.variant is None:
        raise ValueError("config.model.vision.variant is None: the contrastive stage trains "
                         "an NFNet; name a variant (F0–F7, 'tiny', 'mini')")
    c = model_config.contrastive
    return ContrastiveModel(
        vision=build_vision_encoder(model_config.vision, dtype),
        text=TextEncoder(**model_config.text, dtype=dtype),
        embed_dim=c.embed_dim,
        logit_scale_init=math.log(1.0 / c.init_temperature),
        max_logit_scale=c.max_logit_scale,
        dtype=dtype,
    )


def dummy_inputs(config, batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    s = config.input.image_size
    return {"images": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32),
            "tokens": jax.ShapeDtypeStruct((batch_size, config.model.text.max_length), jnp.int32)}


def vision_params(flat_params: dict) -> dict:
    """The NFNet trunk's entries {'vision/...': array} of a flat parameter dict."""
    out = {k: v for k, v in flat_params.items() if k.startswith(VISION_PREFIX)}
    if not out:
        raise ValueError(f"no '{VISION_PREFIX}...' parameters among {sorted(flat_params)[:5]}...")
    return out


def load_params(checkpoint_dir: str, step: int | None = None) -> dict[str, np.ndarray]:
    """Every parameter {'a/b/c': array} (trainable and frozen) of a flamingo-train
    checkpoint, read as host numpy arrays whatever mesh wrote it: the latest step unless
    `step` is given. `checkpoint_dir` is the run's workdir or its `checkpoints/` folder."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(checkpoint_dir)
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")
    steps = sorted(int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else [])
                   if n.isdigit() and os.path.isdir(os.path.join(directory, n, "state")))
    step = (steps[-1] if steps else None) if step is None else step
    if step not in steps:
        raise FileNotFoundError(
            f"no checkpoint{'' if step is None else f' at step {step}'} in {directory} (steps "
            f"there: {steps}); pass a flamingo-train workdir or its checkpoints/ folder")
    state_dir = os.path.join(directory, str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    item = {part: dict(tree[part]) for part in ("trainable", "frozen") if tree.get(part)}
    restore_args = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    return {k: np.asarray(v) for part in restored.values() for k, v in part.items()}


def load_vision_params(checkpoint_dir: str, step: int | None = None) -> dict[str, np.ndarray]:
    """Flat {'vision/...': array} of a contrastive run's checkpoint: the keys and shapes of
    a Flamingo built with the same `model.vision` (see `load_params` for the arguments)."""
    return vision_params(load_params(checkpoint_dir, step))
