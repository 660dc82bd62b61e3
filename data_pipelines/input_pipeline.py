"""The trainer's entry point: a data config -> an iterator of (global) batches.

    data = {                                  # e.g. config.data, an ml_collections ConfigDict
        "tokenizer": "data/spm.model",
        "mixture": "flamingo_demo",           # registered name of the seqio Mixture
        "mode": "per_task",                   # or "sample"
        "seed": 0,
        "image_size": 64,                     # default for every task
        "batch_size": 32,                     # global; sample mode (per_task: per task)
        "tasks": {
            "m3w":   {"kind": "interleaved", "source": "tfrecord", "path": ..., "rate": 1.0,
                      "batch_size": 8},
            "align": {"kind": "pairs", "source": "webdataset", "path": ..., "rate": 0.2,
                      "batch_size": 16},
        },
    }
    vocab = vocabulary(data)
    it = make_data_iterator(data, mesh=mesh, state=restored_state_or_None)
    batches = next(it)        # per_task: {task: {feature: jax.Array}}; sample: {feature: ...}
    it.get_state()            # JSON-able, for the checkpoint
    it.bad_input_counts()     # for the metrics

Task fields are those of `tasks.TaskConfig`; every host passes its own process index
implicitly (jax.process_index / process_count).
"""

from typing import Any, Mapping, Optional

import jax

from data_pipelines import global_batch
from data_pipelines import mixture_iterator
from data_pipelines import tasks as tasks_lib
from data_pipelines import tokenizer as tokenizer_lib

MODES = ("per_task", "sample")
_SHARED_TASK_FIELDS = ("image_size", "train", "random_flip", "colour_jitter")


def _get(config: Mapping[str, Any], key: str, default=None):
    return config[key] if key in config else default


def vocabulary(data_config: Mapping[str, Any]) -> tokenizer_lib.FlamingoVocabulary:
    """The vocabulary; the model takes lm.vocab_size=base_vocab_size, num_extra_tokens."""
    return tokenizer_lib.load_vocabulary(str(data_config["tokenizer"]))


def register(data_config: Mapping[str, Any]):
    """Registers the config's tasks and mixture; returns the seqio.Mixture."""
    vocab = vocabulary(data_config)
    shared = {k: data_config[k] for k in _SHARED_TASK_FIELDS if k in data_config}
    configs = tasks_lib.configs_from_dict(
        {name: dict(fields) for name, fields in data_config["tasks"].items()}, **shared)
    return tasks_lib.register_mixture(_get(data_config, "mixture", "flamingo"), configs, vocab)


def make_data_iterator(data_config: Mapping[str, Any], *, mesh: Optional[jax.sharding.Mesh] = None,
                       state: Optional[Mapping[str, Any]] = None, split: str = "train",
                       shuffle: bool = True, num_epochs: Optional[int] = None):
    """Registers the mixture and returns its iterator (global jax.Arrays when `mesh`)."""
    mode = _get(data_config, "mode", "per_task")
    if mode not in MODES:
        raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}.")
    mixture = register(data_config)
    seed = int(_get(data_config, "seed", 0))
    shard_info = global_batch.host_shard_info()
    if mode == "per_task":
        sizes = {}
        for name, fields in data_config["tasks"].items():
            size = _get(fields, "batch_size", _get(data_config, "batch_size"))
            if size is None:
                raise ValueError(f"data.tasks.{name}.batch_size is required in per_task mode.")
            sizes[name] = int(size)
        iterator = mixture_iterator.make_task_iterators(
            mixture, sizes, split=split, seed=seed, shard_info=shard_info, shuffle=shuffle,
            num_epochs=num_epochs, state=state)
    else:
        if num_epochs is not None:
            raise ValueError("sample mode streams forever; num_epochs must be None.")
        if _get(data_config, "batch_size") is None:
            raise ValueError("data.batch_size is required in sample mode.")
        iterator = mixture_iterator.make_sampled_iterator(
            mixture, int(data_config["batch_size"]), split=split, seed=seed, shard_info=shard_info,
            shuffle=shuffle, state=state)
    if mesh is not None:
        return global_batch.GlobalBatchIterator(iterator, mesh)
    return iterator
