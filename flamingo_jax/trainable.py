"""Which parameters train: regex rules over '/'-joined parameter paths (config.train.trainable)."""

import re
from typing import Any, Sequence

import jax


def path_str(path: Sequence[Any]) -> str:
    """'lm/layers_0/attn/q/kernel' from a jax key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def trainable_mask(params: Any, patterns: Sequence[str]) -> Any:
    """Pytree of bools with params' structure: True where some pattern matches the path."""
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(f"config.train.trainable has an invalid regex: {e}") from e
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(c.search(path_str(path)) for c in compiled), params
    )
