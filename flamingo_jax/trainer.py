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

from flamingo_jax import distributed, model_kinds, sharding, warm_start
from flamingo_jax.optimizer import make_optimizer
from flamingo_jax.train_state import TrainState, make_state_init, split_params
from flamingo_jax.train_step import sampled_train_step, train_step

class Trainer:
    def __init__(
        self,
        config,
        devices=None,
        tx: optax.GradientTransformation | None = None,
    ):
        self.config = config
        self.mesh: Mesh = sharding.make_mesh(config.mesh, devices)
        # What is trained (config.model.kind: flamingo | lm | ...; see model_kinds).
        self.kind = model_kinds.get(config.model.kind)
        self.model = self.kind.build(config.model)
        self.boxed = model_kinds.abstract_params(self.kind, config, self.model)
        warm_start.check_config(config, nn.unbox(self.boxed))
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
                lambda s: jnp.zeros(s.shape, s.dtype), self.kind.dummy_inputs(config)
            )
            return self.model.init({"params": rng}, **inputs)["params"]

        self._init, self.state_shardings = make_state_init(
            config, init_params, self.boxed, self.tx, self.mesh
        )
        self._step = None
        self._compiled = None  # multi-process jobs: the step compiled ahead of its first run

    def apply(self, params, rng, **inputs):
        return self.model.apply({"params": params}, **self.kind.model_inputs(inputs, True),
                                rngs={"dropout": rng})

    def init_state(self) -> TrainState:
        """A fresh train state, created directly in its shardings, with the parameters
        that config.model.init_from / lm_init / vision_init name read from earlier runs'
        checkpoints (flamingo_jax.warm_start)."""
        return warm_start.warm_start(self.config, self._init())

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

    def _jitted_step(self):
        if self._step is None:
            if self.config.data.get("mode") == "sampled":
                if self.kind.loss:
                    raise ValueError(
                        f"data.mode='sampled' weighs the token cross-entropy per example; model "
                        f"kind {self.config.model.kind!r} has its own loss: use data.mode="
                        f"'per_task'"
                    )
                step_fn = functools.partial(
                    sampled_train_step, apply_fn=self.apply, tx=self.tx,
                    task_names=sorted(self.task_weights), schedule=self.schedule,
                )
            else:
                step_fn = functools.partial(
                    train_step, apply_fn=self.apply, tx=self.tx, task_weights=self.task_weights,
                    schedule=self.schedule,
                    loss_fn=self.kind.loss(self.config.model) if self.kind.loss else None,
                )
            self._step = jax.jit(
                step_fn, out_shardings=(self.state_shardings, None), donate_argnums=(0,)
            )
        return self._step

    def step(self, state: TrainState, batches) -> tuple[TrainState, dict[str, Any]]:
        step_fn = self._jitted_step()
        if jax.process_count() > 1 and self._compiled is None:
            # Processes compile at different speeds, and CPU collectives (gloo) give up when
            # processes reach a collective more than 30 s apart: compile first, then meet.
            self._compiled = self.lower(state, batches).compile()
            distributed.barrier("train_step_compiled")
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return (self._compiled or step_fn)(state, batches)

    def lower(self, state, batches):
        """The step lowered for these (possibly abstract) arguments, for XLA's cost analysis
        (`.cost_analysis()`) or an explicit `.compile()`."""
        step_fn = self._jitted_step()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return step_fn.lower(state, batches)
