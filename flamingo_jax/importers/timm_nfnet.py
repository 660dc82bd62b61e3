"""Import timm `dm_nfnet_f*` weights into our NFNet parameter tree.

The name table is explicit: every parameter of our model maps to one timm tensor name and
one layout transform (see `timm_name_table`). Names are matched against the target tree
of `jax.eval_shape(model.init, ...)`, so nothing is allocated for the target, and every
missing, unexpected and mis-shaped tensor is reported in one ValueError.

Layouts (timm → ours):
    conv weight [O, I/g, kh, kw]      → kernel [kh, kw, I/g, O]
    conv gain   [O, 1, 1, 1]          → gain [O]
    SE fc weight [O, I, 1, 1] (1×1 conv) → Dense kernel [I, O]
    head.fc.weight [K, C]             → Dense kernel [C, K]
    biases [O] and skipinit_gain []   → unchanged

Numerics: timm standardizes conv weights as (W − mean)/sqrt((var + 1e-5)·fan_in); our
default is DeepMind's (W − mean)/sqrt(max(var·fan_in, 1e-4)), the form the DeepMind
weights were trained with. Build the model with `**TIMM_WS_EPS` to reproduce timm's
forward pass exactly (see `flamingo_jax.models.nfnet.standardize_kernel` for the size of
the difference).
"""

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

# NFNet kwargs reproducing timm's weight-standardization epsilon exactly.
TIMM_WS_EPS = dict(ws_eps=1e-5, ws_eps_form="add")

# Our conv module names inside a block → timm's.
_BLOCK_CONVS = {
    "shortcut_conv": "downsample.conv",
    "conv1": "conv1",
    "conv2": "conv2",
    "conv2b": "conv2b",
    "conv3": "conv3",
}
# timm tensors that exist only with a classifier head.
_HEAD_PREFIXES = ("final_conv.", "head.")


# Layout transforms: (timm array → ours, our shape → timm shape).
def _conv_kernel(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (2, 3, 1, 0))  # [O, I/g, kh, kw] -> [kh, kw, I/g, O]


def _conv_kernel_shape(s: tuple) -> tuple:
    return (s[3], s[2], s[0], s[1])


def _conv_gain(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0]) if a.ndim == 4 and a.shape[1:] == (1, 1, 1) else a


def _conv_gain_shape(s: tuple) -> tuple:
    return (s[0], 1, 1, 1)


def _conv1x1_dense(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4 and a.shape[2:] == (1, 1):
        return a[:, :, 0, 0].T  # [O, I, 1, 1] -> [I, O]
    return a


def _conv1x1_dense_shape(s: tuple) -> tuple:
    return (s[1], s[0], 1, 1)


def _linear(a: np.ndarray) -> np.ndarray:
    return a.T if a.ndim == 2 else a  # [K, C] -> [C, K]


def _linear_shape(s: tuple) -> tuple:
    return (s[1], s[0])


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _same_shape(s: tuple) -> tuple:
    return tuple(s)


_TRANSFORMS = {
    "conv_kernel": (_conv_kernel, _conv_kernel_shape),
    "conv_gain": (_conv_gain, _conv_gain_shape),
    "conv1x1_dense": (_conv1x1_dense, _conv1x1_dense_shape),
    "linear": (_linear, _linear_shape),
    "same": (_same, _same_shape),
}


_CONV_LEAVES = {
    "kernel": ("weight", "conv_kernel"),
    "gain": ("gain", "conv_gain"),
    "bias": ("bias", "same"),
}


def _timm_name(path: tuple) -> tuple[str, str]:
    """Our param path → (timm tensor name, transform kind): the name table, rule by rule."""
    head, *rest = path
    timm_conv = None  # timm module name when `path` is a ScaledStdConv parameter
    if head.startswith("stem_conv") and len(rest) == 1:  # stem_conv{i}/*  -> stem.conv{i}.*
        timm_conv = f"stem.conv{head[len('stem_conv'):]}"
    elif head == "final_conv" and len(rest) == 1:  # final_conv/*  -> final_conv.*
        timm_conv = "final_conv"
    elif head == "head" and len(rest) == 1:  # head/{kernel,bias}  -> head.fc.{weight,bias}
        if rest[0] == "kernel":
            return "head.fc.weight", "linear"
        if rest[0] == "bias":
            return "head.fc.bias", "same"
    elif head.startswith("stage") and "_block" in head:  # stage{s}_block{b} -> stages.{s}.{b}
        stage, block = head[len("stage"):].split("_block")
        prefix = f"stages.{stage}.{block}"
        if rest == ["skip_gain"]:
            return f"{prefix}.skipinit_gain", "same"
        if len(rest) == 2 and rest[0] in _BLOCK_CONVS:
            timm_conv = f"{prefix}.{_BLOCK_CONVS[rest[0]]}"
        elif len(rest) == 3 and rest[0] == "se" and rest[1] in ("fc1", "fc2"):
            if rest[2] == "kernel":
                return f"{prefix}.attn_last.{rest[1]}.weight", "conv1x1_dense"
            if rest[2] == "bias":
                return f"{prefix}.attn_last.{rest[1]}.bias", "same"
    if timm_conv is not None and rest[-1] in _CONV_LEAVES:
        suffix, kind = _CONV_LEAVES[rest[-1]]
        return f"{timm_conv}.{suffix}", kind
    raise ValueError(f"no timm name for our parameter {'/'.join(path)}")


def target_shapes(model: nn.Module, image_size: int = 64) -> dict[tuple, jax.ShapeDtypeStruct]:
    """Our param paths → ShapeDtypeStruct, from `jax.eval_shape` of `model.init` (no allocation)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    return traverse_util.flatten_dict(nn.unbox(variables["params"]))


def timm_name_table(model: nn.Module) -> dict[str, tuple[tuple, str]]:
    """timm tensor name → (our param path, transform kind) for every parameter of `model`."""
    return _name_table(target_shapes(model))


def _name_table(targets: Mapping[tuple, Any]) -> dict[str, tuple[tuple, str]]:
    table = {}
    for path in targets:
        name, kind = _timm_name(path)
        table[name] = (path, kind)
    return table


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "detach"):  # torch.Tensor, without importing torch here
        t = t.detach().cpu()
        if not t.dtype.is_floating_point or t.dtype.itemsize >= 4:
            return t.numpy()
        return t.float().numpy()  # bfloat16/float16 have no lossless numpy view everywhere
    return np.asarray(t)


def read_timm_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a `.safetensors` file, or a `.pth/.pt/.bin` file with torch.load(weights_only=True)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if path.endswith((".pth", ".pt", ".bin")):
        import torch

        sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping):
            raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
        return dict(sd)
    raise ValueError(f"unsupported weights file {path!r}: expected .safetensors, .pth, .pt or .bin")


def convert_timm_nfnet(state_dict: Mapping[str, Any], model: nn.Module) -> dict:
    """timm state dict (name → numpy array or torch tensor) → our params (nested numpy dict).

    When `model.num_classes is None` the timm head (`final_conv.*`, `head.*`) is skipped.
    Raises one ValueError listing every missing, unexpected and mis-shaped tensor.
    """
    targets = target_shapes(model)
    table = _name_table(targets)
    skip_head = getattr(model, "num_classes", None) is None

    missing, mis_shaped, unexpected = [], [], []
    flat: dict[tuple, np.ndarray] = {}
    for name, (path, kind) in table.items():
        target = targets[path]
        to_ours, timm_shape = _TRANSFORMS[kind]
        if name not in state_dict:
            missing.append(f"{name} {list(timm_shape(target.shape))} (-> {'/'.join(path)})")
            continue
        array = _to_numpy(state_dict[name])
        converted = to_ours(array)
        if tuple(converted.shape) != tuple(target.shape):
            mis_shaped.append(
                f"{name}: got {list(array.shape)}, expected {list(timm_shape(target.shape))} "
                f"(-> {'/'.join(path)} {list(target.shape)})"
            )
            continue
        flat[path] = np.array(converted, dtype=target.dtype, order="C")  # owns its memory
    for name in state_dict:
        if name in table or (skip_head and name.startswith(_HEAD_PREFIXES)):
            continue
        unexpected.append(f"{name} {list(state_dict[name].shape)}")

    if missing or mis_shaped or unexpected:
        lines = [f"timm NFNet state dict does not match the model ({len(table)} tensors expected):"]
        problems = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
        for title, items in problems:
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in items)
        raise ValueError("\n".join(lines))
    return traverse_util.unflatten_dict(flat)


def load_timm_nfnet(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any], model: nn.Module
) -> dict:
    """Params for `model` (a NFNet) from a timm dm_nfnet file or state dict.

    Returns a plain nested dict of numpy arrays shaped like `model.init(...)['params']`
    with the logical-partitioning boxes removed.
    """
    if isinstance(path_or_state_dict, Mapping):
        state_dict: Mapping[str, Any] = path_or_state_dict
    else:
        state_dict = read_timm_state_dict(path_or_state_dict)
    return convert_timm_nfnet(state_dict, model)

