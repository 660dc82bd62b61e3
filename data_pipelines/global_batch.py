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

from flamingo_jax.sharding import BATCH_AXES as DEFAULT_BATCH_AXES
from flamingo_jax.sharding import batch_sharding, make_global_batch  # noqa: F401 (re-exported)


def host_shard_info() -> seqio.ShardInfo:
    """This process's shard of every dataset."""
    return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


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
