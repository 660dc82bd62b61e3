"""Host-local numpy batches -> global jax.Arrays sharded over the mesh's batch axes.

Every host reads its own shard (`host_shard_info()`), builds a local batch of
global_batch / process_count examples, and `make_global_batch` stitches the hosts'
batches into one jax.Array per feature with `jax.make_array_from_process_local_data`,
batch dimension split over `batch_axes` (default ('data', 'fsdp'), SPEC §5).
"""

from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import seqio

DEFAULT_BATCH_AXES = ("data", "fsdp")


def host_shard_info() -> seqio.ShardInfo:
    """This process's shard of every dataset."""
    return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int,
                   batch_axes: Sequence[str] = DEFAULT_BATCH_AXES) -> jax.sharding.NamedSharding:
    """Splits dim 0 over the batch axes present in `mesh`; other dims replicated."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    spec = jax.sharding.PartitionSpec(axes if axes else None, *([None] * (ndim - 1)))
    return jax.sharding.NamedSharding(mesh, spec)


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                      batch_axes: Sequence[str] = DEFAULT_BATCH_AXES) -> dict[str, jax.Array]:
    """{feature: [B_local, ...] numpy} -> {feature: [B_local * process_count, ...] jax.Array}.

    Non-numeric features (e.g. string keys) are left out.
    """
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":
            continue
        sharding = batch_sharding(mesh, value.ndim, batch_axes)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


class GlobalBatchIterator:
    """Wraps a mixture iterator; yields its batches as global jax.Arrays.

    Works for both modes: per-task batches ({task: {feature: array}}) keep their nesting.
    `get_state` and `bad_input_counts` pass through to the wrapped iterator.
    """

    def __init__(self, iterator: Iterator, mesh: jax.sharding.Mesh,
                 batch_axes: Sequence[str] = DEFAULT_BATCH_AXES):
        self.iterator = iterator
        self._mesh = mesh
        self._batch_axes = tuple(batch_axes)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self.iterator)
        if all(isinstance(v, Mapping) for v in batch.values()):
            return {k: make_global_batch(v, self._mesh, self._batch_axes) for k, v in batch.items()}
        return make_global_batch(batch, self._mesh, self._batch_axes)

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def bad_input_counts(self):
        return self.iterator.bad_input_counts()

    def close(self) -> None:
        self.iterator.close()
