"""Warm start: parameters of a fresh train state read from earlier stages' checkpoints.

    config.model.lm_init = "workdirs/demo/lm"          # an "lm"-kind run (text-only LM)
    config.model.vision_init = "workdirs/demo/vision"  # a run holding its image tower under vision/

Each names a workdir, its `checkpoints/` directory (the latest step is used) or one
`checkpoints/<step>` directory, written by flamingo-train (checkpointing.Checkpointer:
trainable params in the step, frozen ones once per workdir).

    key          checkpoint parameter      → this run's parameter
    init_from    <path>                    → <path>          every parameter (a Flamingo run)
    lm_init      <path>                    → lm/<path>       every lm/ parameter but xattn_*
    vision_init  vision/<path>             → vision/<path>   every vision/ parameter

A source parameter may sit in the checkpoint's trainable or frozen part. Parameters are
read with orbax's partial restore directly into this run's shardings and dtypes (never
whole on one device), replace the fresh values in `state.trainable` / `state.frozen`, and
the optimizer state stays as initialised. lm_init does not read the `<image>`/`<EOC>` rows
(`embed/extra_embedding`, `extra_head/kernel`): as for a Hugging Face import
(importers.hf_llama, extra_init="mean") they start at the mean of the pretrained embedding
rows and head columns, so a new token's logit starts as the mean pretrained logit.

`check_config` runs when the Trainer is built, before anything compiles: it resolves the
paths and checks every parameter's presence and shape from the checkpoint's metadata, with
one ValueError listing every missing and mis-shaped parameter.
"""

import dataclasses
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils

from flamingo_jax.checkpointing import FROZEN_DIR
from flamingo_jax.importers.hf_llama import _extra_rows
from flamingo_jax.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class Source:
    key: str  # config.model.<key>
    source_prefix: str
    target_prefix: str
    exclude: str = r"$^"  # target paths (regex) that the checkpoint does not provide
    # Target path → the source path whose mean row initialises it (appended vocabulary).
    mean_of: Mapping[str, str] = dataclasses.field(default_factory=dict)


SOURCES = (
    Source("init_from", "", ""),  # a whole Flamingo run, e.g. experiments/finetune.py
    Source("lm_init", "", "lm/", exclude=r"^lm/xattn_\d+/",
           mean_of={"lm/embed/extra_embedding": "embed/embedding",
                    "lm/extra_head/kernel": "head/kernel"}),
    Source("vision_init", "vision/", "vision/"),
)


def checkpoint_dirs(path: str, key: str) -> dict[str, str]:
    """{part: orbax directory holding {part: {param path: array}}} of the checkpoint that
    `path` names (module docstring): the step's `state` item holds the trainable params; the
    frozen ones sit once per workdir in checkpointing.FROZEN_DIR (or, in checkpoints of
    older runs, in the step's `state` item too)."""
    path = os.path.abspath(os.path.expanduser(path))
    for directory in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(os.path.join(directory, "state")):
            step_dir = directory
            break
        steps = [int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else [])
                 if n.isdigit() and os.path.isdir(os.path.join(directory, n, "state"))]
        if steps:
            step_dir = os.path.join(directory, str(max(steps)))
            break
    else:
        raise FileNotFoundError(
            f"config.model.{key}={path!r} holds no checkpoint: pass a flamingo-train workdir, "
            "its checkpoints/ directory or one checkpoints/<step> directory")
    state_dir = os.path.join(step_dir, "state")
    frozen_dir = os.path.join(os.path.dirname(os.path.dirname(step_dir)), FROZEN_DIR)
    return {"trainable": state_dir,
            "frozen": frozen_dir if os.path.isdir(frozen_dir) else state_dir}


def _checkpoint_params(dirs: Mapping[str, str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Checkpoint parameter path → (part, shape), from the metadata (nothing is read)."""
    out = {}
    for part, directory in dirs.items():
        tree = ocp.PyTreeCheckpointer().metadata(directory).item_metadata.tree
        out.update({path: (part, tuple(meta.shape))
                    for path, meta in (tree.get(part) or {}).items()})
    return out


def _plan(source: Source, dirs: Mapping[str, str],
          targets: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Target path → (part, source path) for every parameter `source` fills; raises with
    every missing and mis-shaped parameter."""
    available = _checkpoint_params(dirs)
    plan, missing, mis_shaped = {}, [], []
    excluded = re.compile(source.exclude)
    filled = {t: s for t, s in sorted(targets.items())
              if t.startswith(source.target_prefix) and not excluded.search(t)}
    if not filled:
        raise ValueError(f"config.model.{source.key} is set but this model has no "
                         f"{source.target_prefix} parameters to fill")
    for target, shape in filled.items():
        if target in source.mean_of:
            if source.mean_of[target] not in available:
                missing.append(f"{source.mean_of[target]} (its mean initialises {target})")
            continue
        path = source.source_prefix + target[len(source.target_prefix):]
        if path not in available:
            missing.append(f"{path} {list(shape)} (-> {target})")
        elif available[path][1] != tuple(shape):
            mis_shaped.append(f"{path}: checkpoint {list(available[path][1])}, this model "
                              f"{list(shape)} (-> {target})")
        else:
            plan[target] = (available[path][0], path)
    if missing or mis_shaped:
        lines = [f"config.model.{source.key}: checkpoint {dirs['trainable']} does not fit "
                 "this model "
                 f"(check that model.lm / model.vision match the run that wrote it):"]
        for title, items in (("missing", missing), ("mis-shaped", mis_shaped)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in items)
        raise ValueError("\n".join(lines))
    return plan


def check_config(config, params: Mapping[str, Any]) -> None:
    """Fails before compilation when lm_init / vision_init cannot fill `params` (the
    model's nested parameter shapes)."""
    targets = {k: v.shape for k, v in traverse_util.flatten_dict(dict(params), sep="/").items()}
    for source in SOURCES:
        path = config.model.get(source.key)
        if path:
            _plan(source, checkpoint_dirs(path, source.key), targets)


def _read(dirs: Mapping[str, str], plan: Mapping[str, tuple[str, str]],
          like: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """{target path: array} read from the checkpoint with the sharding and dtype of `like`."""
    out = {}
    for part, directory in dirs.items():
        wanted = {target: path for target, (p, path) in plan.items() if p == part}
        if not wanted:
            continue
        item = {part: {path: jax.ShapeDtypeStruct(like[t].shape, like[t].dtype,
                                                  sharding=like[t].sharding)
                       for t, path in wanted.items()}}
        restore_args = {part: {path: ocp.ArrayRestoreArgs(
            sharding=like[t].sharding, dtype=like[t].dtype, global_shape=like[t].shape)
            for t, path in wanted.items()}}
        restored = ocp.PyTreeCheckpointer().restore(
            directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                   partial_restore=True))
        out.update({t: restored[part][path] for t, path in wanted.items()})
    return out


def _mean_rows(target: str, source_rows: jax.Array, like: jax.Array) -> jax.Array:
    """An appended-vocabulary parameter from the mean of the pretrained rows (hf_llama's
    rule): embed [V, D] → extra_embedding [E, D]; head kernel [D, V] → extra_head [D, E]."""
    rows = np.asarray(multihost_utils.process_allgather(source_rows, tiled=True))
    if target.endswith("extra_head/kernel"):
        rows, path = rows.T, ("extra_head", "kernel")  # [V, D] like lm_head.weight
    else:
        path = ("embed", "extra_embedding")
    value = _extra_rows(rows, path, jax.ShapeDtypeStruct(like.shape, like.dtype), "mean", None)
    return jax.make_array_from_callback(like.shape, like.sharding, lambda index: value[index])


def warm_start(config, state: TrainState) -> TrainState:
    """`state` with the parameters that config.model.lm_init / vision_init name replaced
    by the checkpoints' values, read into the shardings and dtypes of `state`'s arrays
    (the state unchanged when neither is set)."""
    current = {**state.frozen, **state.trainable}
    targets = {k: v.shape for k, v in current.items()}
    updates: dict[str, jax.Array] = {}
    for source in SOURCES:
        path = config.model.get(source.key)
        if not path:
            continue
        dirs = checkpoint_dirs(path, source.key)
        updates.update(_read(dirs, _plan(source, dirs, targets), current))
        for target, from_path in source.mean_of.items():
            if target in current:
                from_target = source.target_prefix + from_path[len(source.source_prefix):]
                updates[target] = _mean_rows(target, updates[from_target], current[target])
    if not updates:
        return state
    return state.replace(
        trainable={k: updates.get(k, v) for k, v in state.trainable.items()},
        frozen={k: updates.get(k, v) for k, v in state.frozen.items()},
    )
