"""The two ways the trainer consumes a mixture, with exact save/restore of the position.

- Per-task mode (the paper's accumulated update): `make_task_iterators` returns a
  `PerTaskIterator`; each `next()` gives {task_name: batch}, one fixed-shape batch per
  task, batch sizes per task.
- Sample mode (seqio's rate-weighted example sampling): `make_sampled_iterator` returns a
  `SampledMixtureIterator`; each `next()` gives one batch whose examples are drawn from
  the tasks with probability λ_m / Σλ, all padded to the largest L and N (tasks must share
  T and image size), plus `task_id` [B] int32 (index into `task_names`).

Batches are host-local numpy dicts (see feature_converter for the features); wrap the
iterator with `global_batch.GlobalBatchIterator` to get jax.Arrays. Each host passes its
`seqio.ShardInfo(jax.process_index(), jax.process_count())` and the GLOBAL batch size.

`get_state()` returns a small JSON-able dict (next record index per task, sampler
counter, bad-input counts); `make_*(..., state=...)` resumes exactly: the next batches
equal those the uninterrupted iterator would have returned.
Bad examples are dropped here and counted by reason: `bad_input_counts()`.
"""

import atexit
import weakref
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from data_pipelines import bad_input
from data_pipelines import feature_converter as fc
from data_pipelines import task_pipeline
from data_pipelines import tasks as tasks_lib

_MAX_CONSECUTIVE_BAD = 10_000
_PREFETCH = 2
_LIVE = weakref.WeakSet()  # open assemblers, closed at exit (see close())


@atexit.register
def _close_all() -> None:
    for assembler in list(_LIVE):
        assembler.close()


def local_batch_size(global_batch_size: int, shard_info: Optional[seqio.ShardInfo]) -> int:
    hosts = shard_info.num_shards if shard_info else 1
    if global_batch_size < 1 or global_batch_size % hosts:
        raise ValueError(f"Global batch size {global_batch_size} must be a positive multiple of "
                         f"the number of hosts ({hosts}).")
    return global_batch_size // hosts


class _Assembler:
    """Builds fixed-size batches of good rows from micro-batches that include bad rows.

    Every row carries `_index` (record position in its stream) and `_bad` (0 or a reason
    code). Rows are consumed strictly in order; a bad row is counted, a gap in `_index`
    (a record whose processing raised) is counted as undecodable_image. Only rows up to
    the last emitted one count as consumed, so the position and the counters always
    describe exactly what the trainer received.
    """

    def __init__(self, dataset: tf.data.Dataset, batch_size: int, num_streams: int,
                 next_index: Sequence[int], counts: Mapping[str, int], name: str):
        options = tf.data.Options()
        options.experimental_optimization.parallel_batch = True
        options.deterministic = True
        dataset = dataset.batch(batch_size).prefetch(_PREFETCH).with_options(options)
        self._iter = iter(dataset.as_numpy_iterator())
        self._batch_size = batch_size
        self._next_index = list(next_index)  # per stream: index of the next unseen record
        self._counter = bad_input.BadInputCounter(counts)
        self._pending: Optional[dict] = None
        self._ended = False
        self._name = name
        self.rows_consumed = 0  # all rows taken from `dataset`, good or bad
        self._num_streams = num_streams
        _LIVE.add(self)

    def close(self) -> None:
        """Stops the tf.data threads. Raw-file readers run Python generators on them, and
        letting those outlive the interpreter hangs the process at exit."""
        self._iter = None
        self._ended = True

    @property
    def next_index(self) -> list[int]:
        return list(self._next_index)

    @property
    def counter(self) -> bad_input.BadInputCounter:
        return self._counter

    def _consume(self, rows: dict, stream: np.ndarray) -> None:
        """Counts the bad rows and index gaps of `rows` and advances the positions."""
        for s in range(self._num_streams):
            idx = rows["_index"][stream == s]
            if not idx.size:
                continue
            gaps = np.diff(np.concatenate([[self._next_index[s] - 1], idx])) - 1
            if gaps.sum():
                self._counter.add(bad_input.UNDECODABLE_IMAGE, int(gaps.sum()))
            self._next_index[s] = int(idx[-1]) + 1
        for code in rows["_bad"][(rows["_bad"] > 0) & (rows["_bad"] != bad_input.END_CODE)]:
            self._counter.add(bad_input.FLAG_VALUES[int(code)])
        self.rows_consumed += len(rows["_bad"])

    def next_batch(self, stream_of) -> Optional[dict]:
        """The next batch of good rows, or None when a finite stream has ended.

        `stream_of(rows) -> [rows] int` says which stream (task) each row came from. A
        finite stream's last batch is padded with all-zero rows (loss_weights 0) so its
        shape never changes.
        """
        chunks, need, bad_run = [], self._batch_size, 0
        while need > 0 and not self._ended:
            if self._pending is None:
                try:
                    self._pending = next(self._iter)
                except StopIteration:
                    if not chunks and bad_run == 0 and self.rows_consumed == 0:
                        raise RuntimeError(f"{self._name}: the input stream is empty; check "
                                           "the data path and split.") from None
                    self._ended = True
                    break
            rows = self._pending
            bad = rows["_bad"]
            good = bad == 0
            end = bad == bad_input.END_CODE
            cum_good = np.cumsum(good)
            if cum_good[-1] >= need:
                cut = int(np.argmax(cum_good >= need)) + 1
            else:
                cut = len(bad)
            if end[:cut].any():  # nothing after the end marker
                cut = int(np.argmax(end)) + 1
                self._ended = True
            taken = {k: v[:cut] for k, v in rows.items()}
            rest = {k: v[cut:] for k, v in rows.items()}
            self._pending = rest if len(rest["_bad"]) else None
            self._consume(taken, stream_of(taken))
            keep = taken["_bad"] == 0
            if keep.any():
                chunks.append({k: v[keep] for k, v in taken.items()})
                # Bad rows after the last good one start the next run.
                bad_run = cut - 1 - int(np.flatnonzero(keep)[-1])
            else:
                bad_run += cut
                if bad_run > _MAX_CONSECUTIVE_BAD:
                    raise RuntimeError(
                        f"{self._name}: {bad_run} consecutive inputs were bad "
                        f"({self._counter.as_dict()}); the data or the preprocessing is broken.")
            need -= int(keep.sum())
        if not chunks:
            return None
        batch = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        missing = self._batch_size - len(batch["_bad"])
        if missing:
            batch = {k: np.concatenate([v, np.full((missing,) + v.shape[1:],
                                                   b"" if v.dtype == object else 0, v.dtype)])
                     for k, v in batch.items()}
        return batch


def _strip(batch: dict, with_keys: bool) -> dict:
    out = {k: batch[k] for k in fc.MODEL_KEYS}
    if with_keys:
        out["key"] = batch["_key"]
    return out


class TaskBatchIterator:
    """Fixed-shape host-local batches of one task (see module docstring)."""

    def __init__(self, task: tasks_lib.FlamingoTask, batch_size: int, *, split: str = "train",
                 seed: int = 0, shard_info: Optional[seqio.ShardInfo] = None, shuffle: bool = True,
                 num_epochs: Optional[int] = None, state: Optional[Mapping[str, Any]] = None,
                 with_keys: bool = False):
        self.task = task
        self.batch_size = batch_size
        self._identity = _identity(task.name, split, seed, shard_info, shuffle, num_epochs)
        state = _check_state(state, self._identity)
        next_index = state["next_index"] if state else 0
        ds = task_pipeline.example_dataset(task, split=split, seed=seed, shard_info=shard_info,
                                           shuffle=shuffle, num_epochs=num_epochs,
                                           start_index=next_index)
        self._assembler = _Assembler(ds, batch_size, 1, [next_index],
                                     state["bad_input"] if state else {}, task.name)
        self._with_keys = with_keys

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._assembler.next_batch(lambda rows: np.zeros(len(rows["_bad"]), np.int64))
        if batch is None:
            raise StopIteration
        return _strip(batch, self._with_keys)

    def get_state(self) -> dict[str, Any]:
        return {**self._identity, "next_index": self._assembler.next_index[0],
                "bad_input": self._assembler.counter.as_dict()}

    def bad_input_counts(self) -> dict[str, int]:
        return self._assembler.counter.as_dict()

    def close(self) -> None:
        self._assembler.close()


class PerTaskIterator:
    """{task_name: batch} per step, one TaskBatchIterator per task."""

    def __init__(self, iterators: Mapping[str, TaskBatchIterator]):
        self.iterators = dict(iterators)

    @property
    def task_names(self) -> list[str]:
        return list(self.iterators)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, dict[str, np.ndarray]]:
        return {name: next(it) for name, it in self.iterators.items()}

    def get_state(self) -> dict[str, Any]:
        return {"mode": "per_task",
                "tasks": {n: it.get_state() for n, it in self.iterators.items()}}

    def bad_input_counts(self) -> dict[str, dict[str, int]]:
        return {n: it.bad_input_counts() for n, it in self.iterators.items()}

    def close(self) -> None:
        for it in self.iterators.values():
            it.close()


def _identity(name, split, seed, shard_info, shuffle, num_epochs) -> dict[str, Any]:
    return {"name": name, "split": split, "seed": int(seed), "shuffle": bool(shuffle),
            "num_epochs": num_epochs,
            "shard": [shard_info.index, shard_info.num_shards] if shard_info else [0, 1]}


def _check_state(state, identity) -> Optional[Mapping[str, Any]]:
    if state is None:
        return None
    mismatched = {k: (state.get(k), v) for k, v in identity.items() if state.get(k) != v}
    if mismatched:
        raise ValueError(f"Input state was saved for a different pipeline: {mismatched} "
                         "(saved, current). Restore with the same task, split, seed and shards.")
    return state


def make_task_iterators(mixture: seqio.Mixture | str,
                        batch_sizes: Mapping[str, int] | int, *, split: str = "train",
                        seed: int = 0, shard_info: Optional[seqio.ShardInfo] = None,
                        shuffle: bool = True, num_epochs: Optional[int] = None,
                        state: Optional[Mapping[str, Any]] = None,
                        with_keys: bool = False) -> PerTaskIterator:
    """Per-task mode. `batch_sizes`: GLOBAL batch size per task name (or one for all)."""
    tasks = tasks_lib.mixture_tasks(mixture)
    if isinstance(batch_sizes, int):
        batch_sizes = {t.name: batch_sizes for t in tasks}
    missing = [t.name for t in tasks if t.name not in batch_sizes]
    if missing:
        raise ValueError(f"No batch size for tasks {missing}; got sizes for {sorted(batch_sizes)}.")
    if state is not None and state.get("mode") != "per_task":
        raise ValueError(f"State is for mode {state.get('mode')!r}, not 'per_task'.")
    iterators = {}
    for task in tasks:
        iterators[task.name] = TaskBatchIterator(
            task, local_batch_size(batch_sizes[task.name], shard_info), split=split, seed=seed,
            shard_info=shard_info, shuffle=shuffle, num_epochs=num_epochs,
            state=state["tasks"][task.name] if state else None, with_keys=with_keys)
    return PerTaskIterator(iterators)


class SampledMixtureIterator:
    """Batches of examples sampled from the tasks with probabilities λ_m / Σλ."""

    def __init__(self, mixture: seqio.Mixture | str, batch_size: int, *, split: str = "train",
                 seed: int = 0, shard_info: Optional[seqio.ShardInfo] = None,
                 shuffle: bool = True, state: Optional[Mapping[str, Any]] = None,
                 with_keys: bool = False):
        if isinstance(mixture, str):
            mixture = seqio.get_mixture_or_task(mixture)
        tasks = tasks_lib.mixture_tasks(mixture)
        shapes = {(t.config.num_frames, t.config.image_size) for t in tasks}
        if len(shapes) > 1:
            raise ValueError(
                "Sample mode puts examples of all tasks in one batch, so tasks must share "
                f"num_frames and image_size; got (name, frames, size) "
                f"{[(t.name, t.config.num_frames, t.config.image_size) for t in tasks]}. "
                "Use per-task mode (make_task_iterators) for mixtures with video.")
        self.task_names = [t.name for t in tasks]
        rates = np.array([mixture.get_rate(t) for t in tasks], np.float64)
        self.probabilities = rates / rates.sum()
        self._identity = _identity(mixture.name, split, seed, shard_info, shuffle, None)
        if state is not None:
            if state.get("mode") != "sample":
                raise ValueError(f"State is for mode {state.get('mode')!r}, not 'sample'.")
            _check_state(state, self._identity)
        self._choices_made = state["choices_made"] if state else 0
        next_index = state["next_index"] if state else [0] * len(tasks)
        text_length = max(t.config.text_length for t in tasks)
        max_media = max(t.config.max_media for t in tasks)
        streams = []
        for i, task in enumerate(tasks):
            ds = task_pipeline.example_dataset(
                task, split=split, seed=seed, shard_info=shard_info, shuffle=shuffle,
                num_epochs=None, start_index=next_index[i], text_length=text_length,
                max_media=max_media)
            streams.append(ds.map(lambda ex, i=i: {**ex, "_task": tf.constant(i, tf.int32)}))
        choice_seed = tf.constant([seed, 0xC401CE], tf.int64)
        logits = tf.constant(np.log(np.maximum(self.probabilities, 1e-30))[None], tf.float32)

        def choose(counter):
            draw = tf.random.stateless_categorical(
                logits, 1, tf.random.experimental.stateless_fold_in(choice_seed, counter))
            return draw[0, 0]

        choices = tf.data.Dataset.counter(start=self._choices_made).map(choose)
        mixed = tf.data.Dataset.choose_from_datasets(streams, choices, stop_on_empty_dataset=True)
        self._assembler = _Assembler(mixed, local_batch_size(batch_size, shard_info), len(tasks),
                                     next_index, state["bad_input"] if state else {}, mixture.name)
        self._with_keys = with_keys

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        before = self._assembler.rows_consumed
        batch = self._assembler.next_batch(lambda rows: rows["_task"])
        if batch is None:
            raise StopIteration
        self._choices_made += self._assembler.rows_consumed - before
        out = _strip(batch, self._with_keys)
        out["task_id"] = batch["_task"]
        return out

    def get_state(self) -> dict[str, Any]:
        return {"mode": "sample", **self._identity, "choices_made": self._choices_made,
                "next_index": self._assembler.next_index,
                "bad_input": self._assembler.counter.as_dict()}

    def bad_input_counts(self) -> dict[str, int]:
        return self._assembler.counter.as_dict()

    def close(self) -> None:
        self._assembler.close()


def make_sampled_iterator(mixture: seqio.Mixture | str, batch_size: int,
                          **kwargs) -> SampledMixtureIterator:
    """Sample mode. `batch_size` is GLOBAL; kwargs as SampledMixtureIterator."""
    return SampledMixtureIterator(mixture, batch_size, **kwargs)
