"""The update step (SPEC §5): one batch per dataset, Σ_m λ_m·L_m with gradients
accumulated over datasets and microbatches, one optimizer update.

    state, metrics = train_step(state, batches)

`batches` maps task name → batch dict whose arrays have a leading microbatch axis
[K, b, ...] (fields: tokens, targets, loss_weights, media_mask, assoc_next and media or
vision_features). L_m is the token-weighted mean cross-entropy over all K microbatches of
task m, so K microbatches give the same update as one batch K times larger.
"""

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from flamingo_jax.train_state import TrainState, merge_params

Batch = Mapping[str, jax.Array]


def weighted_cross_entropy(
    logits: jax.Array,  # [B, L, V] float32
    targets: jax.Array,  # [B, L] int
    weights: jax.Array,  # [B, L]
) -> tuple[jax.Array, jax.Array]:  # (Σ w·CE, Σ w)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def model_inputs(batch: Batch) -> dict:
    """The model's keyword arguments from a batch."""
    inputs = {"tokens": batch["tokens"]}
    for key, arg in (("media", "images"), ("vision_features", "vision_features"),
                     ("media_mask", "media_mask"), ("assoc_next", "assoc_next")):
        if key in batch:
            inputs[arg] = batch[key]
    return inputs


def _task_gradient(loss_sum_fn, trainable, micro_batches: Batch, rng):
    """Σ over microbatches of (∇ Σ w·CE, Σ w·CE, Σ w), by lax.scan."""
    num_micro = micro_batches["tokens"].shape[0]

    def body(carry, xs):
        grads, loss_sum, weight_sum = carry
        batch, key = xs
        (_, (ls, ws)), g = jax.value_and_grad(loss_sum_fn, has_aux=True)(trainable, batch, key)
        grads = jax.tree_util.tree_map(jnp.add, grads, g)
        return (grads, loss_sum + ls, weight_sum + ws), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    keys = jax.random.split(rng, num_micro)
    (grads, loss_sum, weight_sum), _ = jax.lax.scan(body, init, (micro_batches, keys))
    return grads, loss_sum, weight_sum


def train_step(
    state: TrainState,
    batches: Mapping[str, Batch],
    *,
    apply_fn: Callable,  # (params, rng, **model_inputs) -> logits
    tx: optax.GradientTransformation,
    task_weights: Mapping[str, float],
    schedule: optax.Schedule | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_sum_fn(trainable, batch, key):
        logits = apply_fn(merge_params(trainable, state.frozen), key, **model_inputs(batch))
        loss_sum, weight_sum = weighted_cross_entropy(
            logits, batch["targets"], batch["loss_weights"]
        )
        return loss_sum, (loss_sum, weight_sum)

    metrics = {}
    grads = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
    total_loss = jnp.zeros((), jnp.float32)
    for i, (name, micro_batches) in enumerate(sorted(batches.items())):
        g, loss_sum, weight_sum = _task_gradient(
            loss_sum_fn, state.trainable, micro_batches, jax.random.fold_in(rng, i)
        )
        denom = jnp.maximum(weight_sum, 1.0)
        lam = task_weights[name]
        grads = jax.tree_util.tree_map(lambda a, b: a + b * (lam / denom), grads, g)
        loss = loss_sum / denom
        total_loss += lam * loss
        metrics[f"loss/{name}"] = loss
        metrics[f"tokens/{name}"] = weight_sum

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total_loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.trainable)
    new_trainable = optax.apply_updates(state.trainable, updates)
    keep = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(finite, new, old))
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        trainable=keep(new_trainable, state.trainable),
        opt_state=keep(new_opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + skipped,
        consecutive_skips=(state.consecutive_skips + skipped) * skipped,
    )
    metrics.update(loss=total_loss, grad_norm=grad_norm, skipped_steps=new_state.skipped_steps,
                   consecutive_skips=new_state.consecutive_skips)
    if schedule is not None:
        metrics["lr"] = schedule(state.step)
    for path, value in state.trainable.items():  # tanh(α) of every gate
        if path.endswith(("/alpha_xattn", "/alpha_dense")):
            metrics[f"gate/{path.removeprefix('lm/')}"] = jnp.tanh(value)
    return new_state, metrics
