"""The update step (SPEC §5): one batch per dataset, Σ_m λ_m·L_m with gradients
accumulated over datasets and microbatches, one optimizer update.

    state, metrics = train_step(state, batches)

`batches` maps task name → batch dict whose arrays have a leading microbatch axis
[K, b, ...] (fields: tokens, targets, loss_weights, media_mask, assoc_next and media or
vision_features). L_m is the token-weighted mean cross-entropy over all K microbatches of
task m, so K microbatches give the same update as one batch K times larger. A model kind
with another objective passes `loss_fn` (e.g. the contrastive loss, weighted by examples).
"""

import functools
from typing import Callable, Mapping, Sequence

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


def token_cross_entropy(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """The default `loss_fn`: next-token cross-entropy of logits [B, L, V] against the
    batch's `targets`, weighted by `loss_weights`."""
    return weighted_cross_entropy(logits, batch["targets"], batch["loss_weights"])


def model_inputs(batch: Batch) -> dict:
    """The model's keyword arguments from a batch."""
    inputs = {"tokens": batch["tokens"]}
    for key, arg in (("media", "images"), ("vision_features", "vision_features"),
                     ("media_mask", "media_mask"), ("assoc_next", "assoc_next")):
        if key in batch:
            inputs[arg] = batch[key]
    return inputs


def _accumulate(objective_fn, trainable, micro_batches: Batch, rng):
    """Σ over microbatches of (∇ objective, aux), by lax.scan; `objective_fn(trainable,
    batch, key) -> (objective, aux)` with aux a pytree of float32 sums (e.g. Σ w·CE, Σ w)."""
    num_micro = micro_batches["tokens"].shape[0]
    keys = jax.random.split(rng, num_micro)
    grad_fn = jax.value_and_grad(objective_fn, has_aux=True)
    aux_shape = jax.eval_shape(
        lambda: objective_fn(trainable, jax.tree_util.tree_map(lambda x: x[0], micro_batches),
                             keys[0])[1])

    def body(carry, xs):
        batch, key = xs
        (_, aux), g = grad_fn(trainable, batch, key)
        return jax.tree_util.tree_map(jnp.add, carry, (g, aux)), None

    zeros = jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype), (trainable, aux_shape))
    (grads, aux), _ = jax.lax.scan(body, zeros, (micro_batches, keys))
    return grads, aux


def train_step(
    state: TrainState,
    batches: Mapping[str, Batch],
    *,
    apply_fn: Callable,  # (params, rng, **model_inputs) -> logits
    tx: optax.GradientTransformation,
    task_weights: Mapping[str, float],
    schedule: optax.Schedule | None = None,
    loss_fn: Callable | None = None,  # (outputs, batch) -> (Σ loss, Σ weight); default token CE
) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(state.rng, state.step)
    loss_fn = loss_fn or token_cross_entropy

    def loss_sum_fn(trainable, batch, key):
        outputs = apply_fn(merge_params(trainable, state.frozen), key, **model_inputs(batch))
        loss_sum, weight_sum = loss_fn(outputs, batch)
        return loss_sum, (loss_sum, weight_sum)

    metrics = {}
    grads = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
    total_loss = jnp.zeros((), jnp.float32)
    for i, (name, micro_batches) in enumerate(sorted(batches.items())):
        g, (loss_sum, weight_sum) = _accumulate(
            loss_sum_fn, state.trainable, micro_batches, jax.random.fold_in(rng, i)
        )
        denom = jnp.maximum(weight_sum, 1.0)
        lam = task_weights[name]
        grads = jax.tree_util.tree_map(lambda a, b: a + b * (lam / denom), grads, g)
        loss = loss_sum / denom
        total_loss += lam * loss
        metrics[f"loss/{name}"] = loss
        metrics[f"tokens/{name}"] = weight_sum
    return _apply_update(state, grads, total_loss, metrics, tx, schedule)


def _apply_update(state: TrainState, grads, total_loss, metrics: dict, tx, schedule):
    """One optimizer update, skipped (and counted) when the loss or gradient is not
    finite; adds loss, grad_norm, skip counters, lr and every gate's tanh(α) to metrics."""
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


def sampled_train_step(
    state: TrainState,
    batch: Batch,
    *,
    apply_fn: Callable,  # (params, rng, **model_inputs) -> logits
    tx: optax.GradientTransformation,
    task_names: Sequence[str],
    schedule: optax.Schedule | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Example-level sampling (config.data.mode = "sampled", an ablation): one batch
    [K, b, ...] whose examples were drawn from the tasks with probabilities λ_m / Σλ (seqio
    rates), with `task_id` [K, b] indexing `task_names`.

    The loss weighs examples, not tokens: L = (1/E) Σ_i ℓ_i, ℓ_i = Σ_l w_il·CE_il / Σ_l w_il,
    over the E examples with any target (padding rows have none), so a task's share of the
    gradient is its sampling rate whatever its text length. loss/<task> is the mean ℓ_i of
    that task's examples (0 when the batch drew none: examples/<task> = 0), tokens/<task>
    their Σ w.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    num_tasks = len(task_names)

    def objective(trainable, micro, key):
        logits = apply_fn(merge_params(trainable, state.frozen), key, **model_inputs(micro))
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(log_probs, micro["targets"][..., None], axis=-1)[..., 0]
        weights = micro["loss_weights"].astype(jnp.float32)  # [b, L]
        tokens = jnp.sum(weights, axis=-1)  # [b]
        per_example = jnp.sum(nll * weights, axis=-1) / jnp.maximum(tokens, 1.0)  # [b]
        real = (tokens > 0).astype(jnp.float32)  # [b]
        one_hot = jax.nn.one_hot(micro["task_id"], num_tasks, dtype=jnp.float32)  # [b, M]
        sums = {"loss": per_example @ one_hot, "examples": real @ one_hot,
                "tokens": tokens @ one_hot}  # each [M]
        return jnp.sum(per_example), sums

    grads, sums = _accumulate(objective, state.trainable, batch, rng)
    examples = jnp.maximum(jnp.sum(sums["examples"]), 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / examples, grads)
    total_loss = jnp.sum(sums["loss"]) / examples
    metrics = {}
    for m, name in enumerate(task_names):
        metrics[f"loss/{name}"] = sums["loss"][m] / jnp.maximum(sums["examples"][m], 1.0)
        metrics[f"tokens/{name}"] = sums["tokens"][m]
        metrics[f"examples/{name}"] = sums["examples"][m]
    return _apply_update(state, grads, total_loss, metrics, tx, schedule)
