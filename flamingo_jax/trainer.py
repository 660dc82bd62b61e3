"""Everything the update needs, built once from a config: mesh, model, optimizer, sharded
train state and the compiled step. The train CLI and the tests both go through it.

    trainer = Trainer(config)
    state = trainer.init_state()
    state, metrics = trainer.step(state, trainer.shard_batches(host_batches))
"""

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from flamingo_jax import sharding
from flamingo_jax.models.flamingo import abstract_params, build_flamingo, dummy_inputs
from flamingo_jax.optimizer import make_optimizer
from flamingo_jax.train_state import TrainState, make_state_init, split_params
from flamingo_jax.train_step import train_step

class Trainer:
    def __init__(
        self,
        config,
        devices=None,
        tx: optax.GradientTransformation | None = None,
    ):
        self.config = config
        self.mesh: Mesh = sharding.make_mesh(config.mesh, devices)
        self.model = build_flamingo(config.model)
        self.boxed = abstract_params(config, self.model)
        self.rules = sharding.logical_rules(config)
        trainable, _ = split_params(nn.unbox(self.boxed), config.train.trainable)
        self.schedule = None
        if tx is None:
            tx, self.schedule = make_optimizer(
                config.optimizer, config.train.num_steps, sorted(trainable)
            )
        self.tx = tx
        self.task_weights = dict(config.train.task_weights)

        def init_params(rng):
            inputs = jax.tree_util.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype), dummy_inputs(config)
            )
            return self.model.init({"params": rng}, **inputs)["params"]

        self._init, self.state_shardings = make_state_init(
            config, init_params, self.boxed, self.tx, self.mesh
        )
        self._step = None

    def apply(self, params, rng, **inputs):
        return self.model.apply({"params": params}, **inputs, train=True,
                                rngs={"dropout": rng})

    def init_state(self) -> TrainState:
        """A fresh train state, created directly in its shardings."""
        return self._init()

    def shard_batches(self, host_batches: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
        """Global arrays [K, B, ...] sharded over data×fsdp on the batch axis, from this
        process's part of the batch (the whole batch in a single-process job)."""
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        out = {}
        for task, batch in host_batches.items():
            global_batch = batch["tokens"].shape[1] * jax.process_count()
            if global_batch % shards:
                raise ValueError(
                    f"task {task!r}: a (micro)batch of {global_batch} examples does not split "
                    f"over data×fsdp = {shards} devices; make batch_size / microbatches a "
                    f"multiple of {shards}"
                )
            out[task] = sharding.make_global_batch(batch, self.mesh, batch_dim=1)
        return out

    def step(self, state: TrainState, batches) -> tuple[TrainState, dict[str, Any]]:
        if self._step is None:
            step_fn = functools.partial(
                train_step, apply_fn=self.apply, tx=self.tx, task_weights=self.task_weights,
                schedule=self.schedule,
            )
            self._step = jax.jit(
                step_fn, out_shardings=(self.state_shardings, None), donate_argnums=(0,)
            )
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self._step(state, batches)
