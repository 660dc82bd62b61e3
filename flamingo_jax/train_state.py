"""Train state (SPEC §5): trainable parameters in float32 with AdamW state; frozen
parameters in bfloat16, outside the optimizer. Parameters are flat {'a/b/c': array} dicts
so trainability, weight decay and checkpoints are all rules over the same path strings.

The state is created already sharded: `jax.jit(init, out_shardings=...)`, never whole on
one device.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flamingo_jax import sharding
from flamingo_jax.trainable import trainable_mask


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    trainable: dict[str, jax.Array]  # float32, updated by the optimizer
    frozen: dict[str, jax.Array]  # frozen_param_dtype, never updated
    opt_state: optax.OptState
    rng: jax.Array  # [2] uint32 raw key
    skipped_steps: jax.Array  # [] int32: updates skipped for a non-finite loss
    consecutive_skips: jax.Array  # [] int32

    def params(self) -> dict:
        """Nested parameter tree for model.apply."""
        return merge_params(self.trainable, self.frozen)


def flatten(params: dict) -> dict[str, Any]:
    return traverse_util.flatten_dict(params, sep="/")


def merge_params(trainable: dict[str, Any], frozen: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")


def split_params(params: dict, patterns) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable, frozen) flat dicts by the regex rules of config.train.trainable."""
    flat = flatten(params)
    mask = flatten(trainable_mask(params, patterns))
    return ({k: v for k, v in flat.items() if mask[k]},
            {k: v for k, v in flat.items() if not mask[k]})


def param_shardings(boxed: dict, rules, mesh: Mesh) -> dict[str, NamedSharding]:
    """Flat {path: NamedSharding} from the model's logical axes and the config's rules."""
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    specs = flatten(sharding.param_partition_specs(boxed, rules))
    shapes = flatten(nn.unbox(boxed))
    return {
        k: NamedSharding(mesh, sharding.fit_spec(shapes[k].shape, specs[k], sizes))
        for k in shapes
    }


def make_state_init(
    config,
    init_params: Callable[[jax.Array], dict],  # rng -> nested params (boxed or not)
    boxed: dict,  # abstract boxed params (jax.eval_shape of init_params)
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[Callable[[], TrainState], TrainState]:
    """A compiled `init() -> TrainState` that creates the state directly in its shardings,
    and those shardings."""
    p_shardings = param_shardings(boxed, sharding.logical_rules(config), mesh)
    frozen_dtype = jnp.dtype(config.train.frozen_param_dtype)
    trainable_dtype = jnp.dtype(config.train.trainable_param_dtype)
    patterns = config.train.trainable

    def init(rng):
        trainable, frozen = split_params(nn.unbox(init_params(rng)), patterns)
        trainable = {k: v.astype(trainable_dtype) for k, v in trainable.items()}
        frozen = {k: v.astype(frozen_dtype) for k, v in frozen.items()}
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, trainable=trainable, frozen=frozen,
                          opt_state=tx.init(trainable), rng=rng,
                          skipped_steps=zero, consecutive_skips=zero)

    rng = jax.random.PRNGKey(config.train.seed)
    abstract = jax.eval_shape(init, rng)
    if not abstract.trainable:
        raise ValueError(
            f"config.train.trainable={tuple(patterns)} matches no parameter; nothing would train"
        )
    replicated = NamedSharding(mesh, PartitionSpec())
    state_shardings = TrainState(
        step=replicated,
        trainable={k: p_shardings[k] for k in abstract.trainable},
        frozen={k: p_shardings[k] for k in abstract.frozen},
        opt_state=optax.tree_map_params(
            tx, lambda _, s: s, abstract.opt_state,
            {k: p_shardings[k] for k in abstract.trainable},
            transform_non_params=lambda _: replicated,
        ),
        rng=replicated, skipped_steps=replicated, consecutive_skips=replicated,
    )
    compiled = jax.jit(init, out_shardings=state_shardings)
    return (lambda: compiled(rng)), state_shardings
