"""What the Trainer builds and trains, by `config.model.kind`.

The Trainer, the update step, checkpoints and metrics are shared by every kind; a kind
states only what differs, in three functions:

    build(model_config) -> nn.Module
        The module, from `config.model`.
    dummy_inputs(config) -> {kwarg: jax.ShapeDtypeStruct}
        Abstract keyword arguments of the module's `__call__` that create every parameter
        (the Trainer zero-fills them for `init`, and `jax.eval_shape`s them for shapes).
    model_inputs(inputs, train) -> {kwarg: jax.Array}
        The module's keyword arguments for one step, from the step's inputs: the batch
        fields as `train_step.model_inputs` names them (`tokens`, `images` or
        `vision_features`, `media_mask`, `assoc_next`). The module returns logits
        [B, L, V] that the step scores against the batch's `targets` / `loss_weights`,
    and optionally
    loss(model_config) -> loss_fn(outputs, batch) -> (Σ loss, Σ weight)
        When the module's outputs are not next-token logits (None: token cross-entropy).

Kinds:
    flamingo  vision encoder → resampler → LM with gated cross-attention (SPEC §3);
              parameters vision/..., resampler/..., lm/...
    lm        the text-only LanguageModel, for pretraining the LM that a Flamingo config
              later freezes (`config.model.lm_init`); its parameters are exactly the
              non-`xattn_*` part of Flamingo's `lm/` subtree, without the prefix.
    contrastive  NFNet image tower + BERT-style text tower trained with the two-way
              contrastive loss (SPEC §3.1) on pair tasks; its `vision/...` parameters
              are Flamingo's frozen vision encoder (`config.model.vision_init`).

To add a kind, write its three functions and add a `ModelKind` to `KINDS`.
"""

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.contrastive_loss import contrastive_loss
from flamingo_jax.models import contrastive, flamingo


@dataclasses.dataclass(frozen=True)
class ModelKind:
    name: str
    build: Callable[[Any], nn.Module]
    dummy_inputs: Callable[[Any], dict[str, jax.ShapeDtypeStruct]]
    model_inputs: Callable[[Mapping[str, jax.Array], bool], dict[str, Any]]
    loss: Callable[[Any], Callable] | None = None


def _flamingo_inputs(inputs: Mapping[str, jax.Array], train: bool) -> dict[str, Any]:
    return {**inputs, "train": train}


def _lm_dummy_inputs(config) -> dict[str, jax.ShapeDtypeStruct]:
    return {"tokens": jax.ShapeDtypeStruct((1, config.input.text_length), jnp.int32)}


def _lm_inputs(inputs: Mapping[str, jax.Array], train: bool) -> dict[str, Any]:
    del train  # the LM has no dropout
    return {"tokens": inputs["tokens"]}


def _contrastive_inputs(inputs: Mapping[str, jax.Array], train: bool) -> dict[str, Any]:
    if "images" not in inputs:
        raise ValueError(f"the contrastive kind trains on pixels: a pair batch needs `media` "
                         f"[B, 1, 1, H, W, C], got model inputs {sorted(inputs)}")
    images = inputs["images"]  # [B, N, T, H, W, C]: a pair's one image is media 0, frame 0
    return {"images": images[:, 0, 0], "tokens": inputs["tokens"], "train": train}


def _contrastive_loss(model_config) -> Callable:
    smoothing = model_config.contrastive.label_smoothing

    def loss_fn(outputs, batch):
        del batch
        image_emb, text_emb, scale = outputs  # [B, E], [B, E], []
        examples = jnp.float32(image_emb.shape[0])
        # Σ loss = examples · mean loss, so a task's L_m is the mean over its microbatches.
        return contrastive_loss(image_emb, text_emb, scale, smoothing) * examples, examples

    return loss_fn


KINDS = {
    kind.name: kind
    for kind in (
        ModelKind("flamingo", flamingo.build_flamingo, flamingo.dummy_inputs, _flamingo_inputs),
        ModelKind("lm", flamingo.build_language_model, _lm_dummy_inputs, _lm_inputs),
        ModelKind("contrastive", contrastive.build_contrastive, contrastive.dummy_inputs,
                  _contrastive_inputs, _contrastive_loss),
    )
}


def get(name: str) -> ModelKind:
    if name not in KINDS:
        raise ValueError(f"config.model.kind={name!r}; allowed: {sorted(KINDS)}")
    return KINDS[name]


def abstract_params(kind: ModelKind, config, model: nn.Module) -> dict:
    """Boxed (nn.LogicallyPartitioned) parameter shapes of `model`; nothing is allocated."""

    def init(rng):
        inputs = jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, s.dtype), kind.dummy_inputs(config)
        )
        return model.init({"params": rng}, **inputs)["params"]

    return jax.eval_shape(init, jax.random.key(0))
