"""flamingo-inspect: parameter counts per component and bytes per device for a config,
from abstract shapes (jax.eval_shape) — nothing is allocated.

    flamingo-inspect --config experiments/flamingo_9b.py [--json] [--num_devices 256]
"""

import json
import math

import flax.linen as nn
import jax
from absl import app, flags
from ml_collections import config_flags

from flamingo_jax import model_kinds, sharding
from flamingo_jax.trainable import path_str, trainable_mask


def _component(path: str, kind: str) -> str:
    if kind == "lm":  # the text-only LM's parameters carry no `lm/` prefix
        return "lm"
    top, _, rest = path.partition("/")
    if top == "lm" and rest.startswith("xattn_"):
        return "xattn"
    return top


# Traced parameter shapes by the JSON of the config's model and input sections, the only
# sections the shapes depend on: several configs (ablations, the CLI, tests) trace each once.
_SHAPES: dict[str, dict] = {}


def abstract_params(config, model=None) -> dict:
    """Boxed parameter shapes of the model `config.model.kind` builds; nothing is allocated.
    Without an explicit `model`, shapes already traced for equal model and input sections
    are returned (the boxes hold only jax.ShapeDtypeStructs; treat them as read-only)."""
    kind = model_kinds.get(config.model.kind)
    if model is not None:
        return model_kinds.abstract_params(kind, config, model)
    key = json.dumps({"model": config.model.to_dict(), "input": config.input.to_dict()},
                     sort_keys=True, default=repr)
    if key not in _SHAPES:
        _SHAPES[key] = model_kinds.abstract_params(kind, config, kind.build(config.model))
    return _SHAPES[key]


def inspect_config(config, num_devices: int | None = None) -> dict:
    """Counts and bytes for `config`; the JSON object of `flamingo-inspect --json`."""
    kind = model_kinds.get(config.model.kind)
    boxed = abstract_params(config)
    shapes = nn.unbox(boxed)
    mask = trainable_mask(shapes, config.train.trainable)
    components: dict[str, int] = {}
    trainable = total = 0
    for (path, x), is_trainable in zip(
        jax.tree_util.tree_leaves_with_path(shapes), jax.tree_util.tree_leaves(mask)
    ):
        size = math.prod(x.shape)
        total += size
        trainable += size * bool(is_trainable)
        name = _component(path_str(path), kind.name)
        components[name] = components.get(name, 0) + size

    num_devices = num_devices or config.mesh.num_devices or jax.device_count()
    sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
    specs = sharding.param_partition_specs(boxed, sharding.logical_rules(config))
    frozen_bytes = jax.numpy.dtype(config.train.frozen_param_dtype).itemsize
    train_bytes = jax.numpy.dtype(config.train.trainable_param_dtype).itemsize * (
        1 + config.train.optimizer_states_per_param
    )
    per_element = jax.tree_util.tree_map(lambda t: train_bytes if t else frozen_bytes, mask)
    return {
        "total_params": total,
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "components": components,
        "mesh": sizes,
        "bytes_per_device": sharding.bytes_per_device(shapes, specs, sizes, per_element),
    }


def _table(report: dict) -> str:
    lines = [f"{'component':<12}{'params':>16}"]
    lines += [f"{k:<12}{v:>16,}" for k, v in report["components"].items()]
    lines += [
        f"{'total':<12}{report['total_params']:>16,}",
        f"{'trainable':<12}{report['trainable_params']:>16,}",
        f"{'frozen':<12}{report['frozen_params']:>16,}",
        f"mesh {report['mesh']}: {report['bytes_per_device'] / 2**30:.2f} GiB of parameters "
        f"and optimizer state per device",
    ]
    return "\n".join(lines)


def run():
    """Console entry point (flags are defined here so that importing this module is free)."""
    config = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    as_json = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
    num_devices = flags.DEFINE_integer(
        "num_devices", None, "Devices to size the mesh for (default: config.mesh.num_devices, "
        "else the devices of this process)."
    )
    flags.mark_flag_as_required("config")

    def main(argv):
        del argv
        report = inspect_config(config.value, num_devices.value)
        print(json.dumps(report) if as_json.value else _table(report))

    app.run(main)


if __name__ == "__main__":
    run()
