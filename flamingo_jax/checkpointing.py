"""Checkpoints of the train state and the input position (SPEC §6), on orbax's
CheckpointManager: async saves (the trainer asks every `checkpoint.save_every` steps and at
the end), keep the newest `keep`, restore the latest on start — directly into the current
mesh's shardings.

Orbax writes each step to a temporary directory and renames it when complete, so a save
interrupted by a crash is never taken for a checkpoint.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from flamingo_jax.train_state import TrainState


class Checkpointer:
    def __init__(self, workdir: str, keep: int):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True,
                enable_async_checkpointing=True,
            ),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=ocp.args.JsonSave(data_state)),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any, shardings: TrainState) -> tuple[TrainState, dict]:
        """The state at `step` placed with `shardings`, and the saved input position."""
        target = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract_state, shardings,
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                    data=ocp.args.JsonRestore()),
        )
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
