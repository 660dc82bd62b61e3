"""Checkpoints of the train state and the input position (SPEC §6), on orbax's
CheckpointManager.

    WORKDIR/checkpoints/<step>/state   step, trainable params, optimizer state, RNG, skip counters
    WORKDIR/checkpoints/<step>/data    the input iterator's position (JSON)
    WORKDIR/checkpoints/<step>/meta    the experiment config (JSON) and where the frozen params are
    WORKDIR/frozen/                    {"frozen": frozen params}, written once (they never change)

Saves are asynchronous: `save` returns once the arrays are copied off the devices and a
background thread writes them. The trainer saves every `checkpoint.save_every` steps, at the
end and on SIGTERM (`Preemption`); the newest `keep` checkpoints stay, and every
`keep_every`-th step is kept for good.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
save interrupted by a crash is never listed as a step: the previous one is restored.

Restore builds its targets from the current mesh's shardings (`jax.ShapeDtypeStruct` with a
sharding), so each device reads only its own slices, whatever mesh or device count wrote the
checkpoint. Before reading any array it compares the stored tree with the target and names
the mismatched paths; unreadable checkpoints raise `CheckpointError`. Nothing in the workdir
is ever deleted by a restore.
"""

import json
import os
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from flamingo_jax.train_state import TrainState

FROZEN_DIR = "frozen"  # relative to the workdir
_SAVED_FIELDS = ("step", "trainable", "opt_state", "rng", "skipped_steps", "consecutive_skips")
_MAX_LISTED = 5  # mismatched paths named in an error


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the configured model."""


class Checkpointer:
    def __init__(self, workdir: str, keep: int, keep_every: int | None = None, config=None):
        """`config`, the experiment config, is stored (as JSON) in every checkpoint."""
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.frozen_directory = os.path.join(self.workdir, FROZEN_DIR)
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        if keep_every:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                create=True, enable_async_checkpointing=True,
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            ),
            handler_registry=_handler_registry(),
        )
        self.config_json = json.loads(config.to_json_best_effort()) if config is not None else None
        self._frozen_checked = False

    # ---- Which step -------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Complete checkpoints, oldest first (interrupted saves are not listed)."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_to_restore(self, restore_step: int | None = None, require: bool = False) -> int | None:
        """The step a (re)started training run continues from: `restore_step` if given (it
        must exist and be the latest), else the latest step; None to start fresh. With
        `require` (or a `restore_step`), an empty checkpoint directory is an error."""
        steps = self.all_steps()
        if restore_step is not None:
            if restore_step not in steps:
                raise CheckpointError(
                    f"checkpoint.restore_step={restore_step} but {self.directory} has "
                    f"{_describe_steps(steps)}: pick one of those, or unset restore_step to "
                    "resume from the latest"
                )
            later = [s for s in steps if s > restore_step]
            if later:
                raise CheckpointError(
                    f"checkpoint.restore_step={restore_step} but {self.directory} also has later "
                    f"steps {later}, which training on would collide with: move them aside, or "
                    f"copy checkpoints/{restore_step} and {FROZEN_DIR}/ into a new workdir"
                )
            return restore_step
        if not steps:
            if require:
                raise CheckpointError(
                    f"checkpoint.require=True but {self.directory} has no complete checkpoint: "
                    "check --workdir, or unset checkpoint.require to start from scratch"
                )
            return None
        return steps[-1]

    # ---- Save -------------------------------------------------------------------------------

    def save(self, step: int, state: TrainState, data_state: dict) -> bool:
        """Starts an asynchronous save of `step`; the frozen params go to WORKDIR/frozen once."""
        self._save_frozen_once(state.frozen)
        meta = {"config": self.config_json, "frozen": FROZEN_DIR}
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_saved_tree(state)),
                                    data=ocp.args.JsonSave(data_state),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def _save_frozen_once(self, frozen: dict[str, jax.Array]) -> None:
        """Writes the frozen params, synchronously, before the first checkpoint that refers to
        them; a copy already there must match them in paths, shapes and dtypes."""
        if self._frozen_checked or not frozen:
            return
        if os.path.isdir(self.frozen_directory):
            stored = self._frozen_metadata()
            _check_tree(stored, {"frozen": frozen}, f"frozen params in {self.frozen_directory}")
        else:
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(self.frozen_directory, {"frozen": frozen})
                checkpointer.wait_until_finished()
        self._frozen_checked = True

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    # ---- Restore ----------------------------------------------------------------------------

    def saved_config(self, step: int) -> dict | None:
        """The experiment config (as a dict) that wrote `step`."""
        return self._read_meta(step)["config"]

    def restore(self, step: int, abstract_state: Any, shardings: TrainState
                ) -> tuple[TrainState, dict]:
        """The state at `step` placed with `shardings` (any mesh), and the saved input position.

        `abstract_state`: a TrainState of arrays or jax.ShapeDtypeStruct (jax.eval_shape of
        the state's init); only shapes and dtypes are used, nothing is allocated twice.
        """
        if step not in self.all_steps():
            raise CheckpointError(f"no complete checkpoint for step {step} in {self.directory}: "
                                  f"it has {_describe_steps(self.all_steps())}")
        target = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract_state, shardings,
        )
        frozen_dir = os.path.join(self.workdir, self._read_meta(step)["frozen"])
        saved = _saved_tree(target)
        where = os.path.join(self.directory, str(step))
        try:
            stored = self.manager.item_metadata(step)["state"]
        except Exception as e:  # orbax raises many types for unreadable metadata
            raise _corrupt(where, e) from e
        if stored is None:
            raise _corrupt(where, ValueError("no readable metadata for the state item"))
        _check_tree(stored, saved, f"checkpoint {where}")
        if target.frozen:
            _check_tree(self._frozen_metadata(frozen_dir), {"frozen": target.frozen},
                        f"frozen params in {frozen_dir}")
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(saved),
                                        data=ocp.args.JsonRestore()),
            )
        except Exception as e:
            raise _corrupt(where, e) from e
        frozen = {}
        if target.frozen:
            try:
                with ocp.StandardCheckpointer() as checkpointer:
                    frozen = checkpointer.restore(frozen_dir, {"frozen": target.frozen})["frozen"]
            except Exception as e:
                raise _corrupt(frozen_dir, e) from e
        return TrainState(frozen=frozen, **restored.state), restored.data

    def _read_meta(self, step: int) -> dict:
        where = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta.meta
        except Exception as e:
            raise _corrupt(where, e) from e
        if not isinstance(meta, dict) or not isinstance(meta.get("frozen"), str):
            raise _corrupt(where, ValueError(f"meta is {meta!r}"))
        return meta

    def _frozen_metadata(self, directory: str | None = None):
        directory = directory or self.frozen_directory
        if not os.path.isdir(directory):
            raise CheckpointError(
                f"the frozen params {directory} that the checkpoints refer to are missing: "
                "restore that directory (it is written once per workdir) or start a new workdir"
            )
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                return checkpointer.metadata(directory).item_metadata
        except Exception as e:
            raise _corrupt(directory, e) from e


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The handler of each item, known before anything is saved or restored (so that a
    fresh process can read a checkpoint's metadata)."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, save, restore, handler in (
        ("state", ocp.args.StandardSave, ocp.args.StandardRestore, ocp.StandardCheckpointHandler),
        ("data", ocp.args.JsonSave, ocp.args.JsonRestore, ocp.JsonCheckpointHandler),
        ("meta", ocp.args.JsonSave, ocp.args.JsonRestore, ocp.JsonCheckpointHandler),
    ):
        instance = handler()
        registry.add(item, save, instance)
        registry.add(item, restore, instance)
    return registry


def _saved_tree(state: TrainState) -> dict:
    """What a step checkpoint holds: the state without the frozen params."""
    return {name: getattr(state, name) for name in _SAVED_FIELDS}


def _describe_steps(steps: list[int]) -> str:
    return f"steps {steps}" if steps else "no complete checkpoint"


def _corrupt(where: str, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {where} is corrupt or incomplete ({type(error).__name__}: "
        f"{str(error)[:300]}); move it out of the workdir to resume from the step before it "
        "(nothing was deleted)"
    )


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return ".".join(parts)


def _leaves_by_path(tree) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(path): leaf for path, leaf in leaves}


def _check_tree(stored, target, what: str) -> None:
    """Raises CheckpointError naming the first paths whose presence, shape or dtype differ
    (parameters before their optimizer moments)."""
    stored, target = _leaves_by_path(stored), _leaves_by_path(target)
    problems = {p: "in the checkpoint, not in the model" for p in set(stored) - set(target)}
    problems.update({p: "in the model, not in the checkpoint" for p in set(target) - set(stored)})
    for p in set(stored) & set(target):
        have, want = stored[p], target[p]
        have_shape = tuple(getattr(have, "shape", None) or ())
        if have_shape != tuple(want.shape):
            problems[p] = f"checkpoint shape {have_shape}, model shape {tuple(want.shape)}"
        elif getattr(have, "dtype", None) is not None and np.dtype(have.dtype) != want.dtype:
            problems[p] = f"checkpoint dtype {have.dtype}, model dtype {want.dtype}"
    if problems:
        paths = sorted(problems, key=lambda p: (not p.startswith(("trainable.", "frozen.")), p))
        listed = "; ".join(f"{p}: {problems[p]}" for p in paths[:_MAX_LISTED])
        more = f" (and {len(paths) - _MAX_LISTED} more)" if len(paths) > _MAX_LISTED else ""
        raise CheckpointError(
            f"{what} does not match the config's parameter tree: {listed}{more}. Restore with "
            "the config that wrote it (stored in its meta/), or use a new workdir"
        )


class Preemption:
    """SIGTERM (preemption notice) sets a flag; `reached()` says, at a step boundary, whether
    any process got one, so that every process saves the same step and stops together.
    A second SIGTERM gets the previous handler (by default the process ends at once)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: the launcher handles signals
            logging.warning("SIGTERM handler not installed (train() not on the main thread)")

    def _on_sigterm(self, signum, frame) -> None:
        del frame
        if self.requested:  # a second SIGTERM: what the process did before (default: exit)
            self.close()
            signal.raise_signal(signum)
            return
        self.requested = True

    def reached(self) -> bool:
        flag = self.requested
        if jax.process_count() > 1:
            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
