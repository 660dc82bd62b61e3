"""The two-way contrastive loss of the vision-encoder pretraining stage (paper appendix
B.1.3; CLIP/ALIGN): softmax cross-entropy of image→text and text→image over the whole
batch, with label smoothing.

    logits = scale · image_emb @ text_embᵀ            # [B, B], pair i is the positive of row i
    L = ½ (CE_smooth(logits, I) + CE_smooth(logitsᵀ, I))

CE_smooth is cross-entropy against (1 − ε)·one-hot + ε/B (torch's `label_smoothing`).

The batch is the GLOBAL batch: under `jax.jit` with embeddings sharded over the data axes,
the [B, B] product gathers the other devices' embeddings by itself, so every example is a
negative for every other example of the step, whichever device holds it.
"""

import jax
import jax.numpy as jnp


def contrastive_logits(
    image_emb: jax.Array,  # [B, E]
    text_emb: jax.Array,  # [B, E]
    scale: jax.Array,  # [] inverse temperature
) -> jax.Array:  # [B, B] float32, rows = images, columns = texts
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image and text embeddings must both be [B, E], got {image_emb.shape} and "
            f"{text_emb.shape}"
        )
    return scale * jnp.einsum("ie,te->it", image_emb.astype(jnp.float32),
                              text_emb.astype(jnp.float32))


def smoothed_cross_entropy(logits: jax.Array, label_smoothing: float) -> jax.Array:
    """Mean over rows of CE(logits[i], target i) with the target smoothed; logits [B, C]."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # [B, C]
    nll = -jnp.diagonal(log_probs)  # [B]: the positive of row i is column i
    uniform = -jnp.mean(log_probs, axis=-1)  # [B]
    return jnp.mean((1.0 - label_smoothing) * nll + label_smoothing * uniform)


def contrastive_loss(
    image_emb: jax.Array,  # [B, E]
    text_emb: jax.Array,  # [B, E]
    scale: jax.Array,  # []
    label_smoothing: float = 0.1,
) -> jax.Array:  # [] float32
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logits = contrastive_logits(image_emb, text_emb, scale)
    return 0.5 * (smoothed_cross_entropy(logits, label_smoothing)
                  + smoothed_cross_entropy(logits.T, label_smoothing))
