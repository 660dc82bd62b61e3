"""Flamingo (SPEC §3): frozen vision encoder → Perceiver Resampler → frozen LM with
GATED XATTN-DENSE layers.

Inputs: text tokens [B, L] in which each `<image>` token marks where a media appears, and
either images [B, N, T, H, W, C] (the vision encoder runs once per frame) or precomputed
vision features [B, N, T, S, d]. media_mask [B, N] marks real (non-padding) media.
Output: logits [B, L, V + E] in float32.

Parameter tree: vision/..., resampler/..., lm/... (lm/xattn_{i} are the gated layers).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from flamingo_jax.models.gated_xattn import media_attention_mask
from flamingo_jax.models.language_model import LanguageModel
from flamingo_jax.models.nfnet import NFNet, nfnet_variant
from flamingo_jax.models.resampler import PerceiverResampler

MEDIA_ATTENTION = ("previous", "all_previous")


def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


class Flamingo(nn.Module):
    vision: nn.Module | None  # None: callers pass precomputed vision features
    resampler: PerceiverResampler
    lm: LanguageModel
    image_token_id: int
    media_attention: str = "previous"  # "all_previous" is the paper's ablation
    dtype: jnp.dtype = jnp.float32

    def check_inputs(self, tokens, images, vision_features, media_mask) -> int:
        """Shape and dtype checks at trace time; returns N. Token/media counts are also
        checked when the values are concrete (eager calls, host-side batches)."""
        if self.media_attention not in MEDIA_ATTENTION:
            raise ValueError(
                f"media_attention={self.media_attention!r}; allowed: {MEDIA_ATTENTION}"
            )
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens must be integer [B, L], got shape {tokens.shape} dtype {tokens.dtype}"
            )
        b, length = tokens.shape
        if length > self.lm.max_length:
            raise ValueError(
                f"text of length {length} (tokens shape {tokens.shape}) is longer than the "
                f"configured maximum lm.max_length={self.lm.max_length}"
            )
        if (images is None) == (vision_features is None):
            raise ValueError("pass exactly one of images [B, N, T, H, W, C] or vision_features")
        if images is not None:
            if images.ndim != 6:
                raise ValueError(
                    f"images must be [B, N, T, H, W, C] (rank 6), got shape {images.shape}"
                )
            if not jnp.issubdtype(images.dtype, jnp.floating):
                raise ValueError(
                    f"images must be normalized floats, got dtype {images.dtype} with shape "
                    f"{images.shape}; convert uint8 pixels with the data pipeline's normalize"
                )
            if self.vision is None:
                raise ValueError("this model has no vision encoder: pass vision_features")
            media = images
        else:
            if vision_features.ndim != 5:
                raise ValueError(
                    f"vision_features must be [B, N, T, S, d] (rank 5), got shape "
                    f"{vision_features.shape}"
                )
            media = vision_features
        if media.shape[0] != b:
            raise ValueError(f"batch mismatch: tokens {tokens.shape} vs media {media.shape}")
        n = media.shape[1]
        if media_mask is not None and media_mask.shape != (b, n):
            raise ValueError(f"media_mask shape {media_mask.shape} != (B, N) = {(b, n)}")
        if _is_concrete(tokens) and (media_mask is None or _is_concrete(media_mask)):
            num_tokens = np.sum(np.asarray(tokens) == self.image_token_id, axis=1)  # [B]
            num_media = (
                np.full((b,), n) if media_mask is None
                else np.sum(np.asarray(media_mask).astype(bool), axis=1)
            )
            bad = np.nonzero(num_tokens != num_media)[0]
            if bad.size:
                i = int(bad[0])
                raise ValueError(
                    f"example {i} has {int(num_tokens[i])} <image> tokens (id "
                    f"{self.image_token_id}) but {int(num_media[i])} media (media shape "
                    f"{media.shape}, tokens shape {tokens.shape}); each media needs exactly one "
                    f"<image> token"
                )
        return n

    def encode_media(
        self,
        images: jax.Array | None = None,  # [B, N, T, H, W, C]
        vision_features: jax.Array | None = None,  # [B, N, T, S, d]
        train: bool = False,
    ) -> jax.Array:  # [B, N, R, D]
        if images is not None:
            b, n, t, h, w, c = images.shape
            fmap = self.vision(images.reshape(b * n * t, h, w, c), train=train)  # [BNT, h, w, d]
            vision_features = fmap.reshape(b, n, t, -1, fmap.shape[-1])
        return self.resampler(vision_features)

    def __call__(
        self,
        tokens: jax.Array,  # [B, L] int
        images: jax.Array | None = None,  # [B, N, T, H, W, C] float
        vision_features: jax.Array | None = None,  # [B, N, T, S, d]
        media_mask: jax.Array | None = None,  # [B, N], 1 = real media
        assoc_next: jax.Array | None = None,  # [B], 1 = text attends to the next media
        train: bool = False,
    ) -> jax.Array:  # [B, L, V + E] float32
        n = self.check_inputs(tokens, images, vision_features, media_mask)
        latents = self.encode_media(images, vision_features, train)  # [B, N, R, D]
        xattn_mask = media_attention_mask(
            tokens, self.image_token_id, n, media_mask, assoc_next,
            attend_all_previous=self.media_attention == "all_previous",
        )  # [B, L, N]
        return self.lm(tokens, latents, xattn_mask)

    # ---- Decoding hooks (flamingo_jax/decoding.py) -----------------------------------------

    def prefill(
        self,
        tokens: jax.Array,  # [B, L] int, prompts
        positions: jax.Array,  # [B, L] int, each token's position and cache slot
        cache: dict,  # LanguageModel.init_cache(B, M)
        images: jax.Array | None = None,  # [B, N, T, H, W, C]
        vision_features: jax.Array | None = None,  # [B, N, T, S, d]
        media_mask: jax.Array | None = None,  # [B, N]
    ) -> tuple[jax.Array, dict, jax.Array]:  # logits [B, L, V + E], cache, xattn mask [B, L, N]
        """Runs the vision encoder and resampler once, fills the cache with the prompt's
        self-attention keys/values and the gated layers' media keys/values, and returns
        the cross-attention mask so later tokens can continue each row's media index φ."""
        n = (images if images is not None else vision_features).shape[1]
        latents = self.encode_media(images, vision_features)  # [B, N, R, D]
        xattn_mask = media_attention_mask(
            tokens, self.image_token_id, n, media_mask,
            attend_all_previous=self.media_attention == "all_previous",
        )
        logits, cache = self.lm(tokens, latents, xattn_mask, positions, cache=cache)
        return logits, cache, xattn_mask

    def decode_step(
        self,
        tokens: jax.Array,  # [B, 1] int, the newest token of each row
        positions: jax.Array,  # [B, 1] int
        xattn_mask: jax.Array,  # [B, 1, N] bool, media the new token attends to
        cache: dict,  # from prefill or the previous step
    ) -> tuple[jax.Array, dict]:  # logits [B, 1, V + E], new cache
        return self.lm(tokens, None, xattn_mask, positions, cache=cache)


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def build_vision_encoder(vision_config, dtype) -> NFNet:
    """NFNet feature extractor (no classification head) from `config.model.vision`."""
    kwargs = nfnet_variant(vision_config.variant)
    kwargs.update({k: v for k, v in vision_config.items() if k != "variant"})
    return NFNet(**kwargs, num_classes=None, dtype=dtype)


def build_language_model(model_config) -> LanguageModel:
    """LanguageModel from `config.model` (its `lm` and `xattn` sections)."""
    xattn = dict(model_config.xattn)
    every = xattn.pop("every")
    return LanguageModel(
        **model_config.lm, xattn_every=every, xattn=FrozenDict(xattn),
        dtype=_dtype(model_config.dtype),
    )


def build_flamingo(model_config) -> Flamingo:
    """Flamingo from `config.model` (see flamingo_jax/base_config.py)."""
    dtype = _dtype(model_config.dtype)
    vision = None
    if model_config.vision.variant is not None:
        vision = build_vision_encoder(model_config.vision, dtype)
    return Flamingo(
        vision=vision,
        resampler=PerceiverResampler(**model_config.resampler, dtype=dtype),
        lm=build_language_model(model_config),
        image_token_id=model_config.image_token_id,
        media_attention=model_config.media_attention,
        dtype=dtype,
    )


def dummy_inputs(config, batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract model inputs of the configured shapes (for init and eval_shape): one
    `<image>`-free text row and zero-padded media, enough to create every parameter."""
    inp = config.input
    n, t, s = inp.num_media, inp.num_frames, inp.image_size
    tokens = jax.ShapeDtypeStruct((batch_size, inp.text_length), jnp.int32)
    if config.model.vision.variant is None:
        d = config.model.vision.get("feature_dim", config.model.resampler.dim)
        media = {"vision_features": jax.ShapeDtypeStruct((batch_size, n, t, (s // 32) ** 2, d),
                                                         jnp.float32)}
    else:
        media = {"images": jax.ShapeDtypeStruct((batch_size, n, t, s, s, 3), jnp.float32)}
    return {"tokens": tokens, "media_mask": jax.ShapeDtypeStruct((batch_size, n), jnp.int32),
            **media}


def abstract_params(config, model: Flamingo | None = None) -> dict:
    """Boxed (nn.LogicallyPartitioned) parameter shapes, without allocating anything."""
    model = model or build_flamingo(config.model)
    inputs = dummy_inputs(config)

    def init(rng, inputs):
        return model.init({"params": rng}, **inputs)["params"]

    return jax.eval_shape(init, jax.random.key(0), inputs)
