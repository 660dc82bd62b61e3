"""Device mesh ('data', 'fsdp', 'tensor') and logical-axis → mesh-axis rules (SPEC §5).

The model names every parameter and activation axis logically (`embed`, `mlp`, ...); the
config's `sharding_rules` map those names to mesh axes. This module turns the two into
PartitionSpecs and per-device byte counts, without allocating anything.
"""

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over these


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Sizes of ('data', 'fsdp', 'tensor'); at most one -1, which fills the rest."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))}: each must be positive, at most one -1"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: "
                f"{num_devices} is not divisible by {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, "
            f"but the job has {num_devices}"
        )
    return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_rules(config) -> tuple[tuple[str, Any], ...]:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                 for name, axes in config.sharding_rules)


def param_partition_specs(boxed_params: Any, rules) -> Any:
    """Mesh PartitionSpecs for a tree of nn.LogicallyPartitioned (e.g. from eval_shape)."""
    logical = nn.get_partition_spec(boxed_params)
    return nn.logical_to_mesh(logical, rules)


def fit_spec(shape: Sequence[int], spec: PartitionSpec, sizes: dict[str, int]) -> PartitionSpec:
    """`spec` with the mesh axes dropped from every dimension they do not divide evenly
    (e.g. a 4-channel stem conv on fsdp=8): such dimensions are replicated instead."""
    fitted = []
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        if axes is not None:
            names = (axes,) if isinstance(axes, str) else tuple(axes)
            if dim % math.prod(sizes[a] for a in names):
                axes = None
        fitted.append(axes)
    return PartitionSpec(*fitted)


def shard_shape(shape: Sequence[int], spec: PartitionSpec, sizes: dict[str, int]) -> tuple:
    """Per-device shape of an array of `shape` sharded by `spec` (ceil division)."""
    out = []
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        if axes is None:
            out.append(dim)
            continue
        axes = (axes,) if isinstance(axes, str) else axes
        out.append(-(-dim // math.prod(sizes[a] for a in axes)))
    return tuple(out)


def bytes_per_device(
    shapes: Any,  # tree of ShapeDtypeStruct (unboxed)
    specs: Any,  # matching tree of PartitionSpec
    sizes: dict[str, int],
    bytes_per_element: Any,  # matching tree of ints (parameter plus optimizer state)
) -> int:
    leaves = jax.tree_util.tree_leaves(shapes)
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    byte_leaves = jax.tree_util.tree_leaves(bytes_per_element)
    return sum(
        math.prod(shard_shape(x.shape, s, sizes)) * b
        for x, s, b in zip(leaves, spec_leaves, byte_leaves, strict=True)
    )


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int,
                   batch_axes: Sequence[str] = BATCH_AXES,
                   batch_dim: int = 0) -> jax.sharding.NamedSharding:
    """Splits dim `batch_dim` over the batch axes present in `mesh`; other dims replicated."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    spec = [None] * ndim
    spec[batch_dim] = axes if axes else None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                      batch_axes: Sequence[str] = BATCH_AXES,
                      batch_dim: int = 0) -> dict[str, jax.Array]:
    """{feature: [B_local, ...] numpy} -> {feature: [B_local * process_count, ...] jax.Array}.

    `batch_dim` is 1 for microbatched features [K, B_local, ...]. Non-numeric features
    (e.g. string keys) are left out.
    """
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":
            continue
        sharding = batch_sharding(mesh, value.ndim, batch_axes, batch_dim)
        global_shape = list(value.shape)
        global_shape[batch_dim] *= jax.process_count()
        global_shape = tuple(global_shape)
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
