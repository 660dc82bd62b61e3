"""Choosing in-context support examples: RICES (nearest by vision features) or at random.

RICES (Retrieval-based In-Context Example Selection, Yang et al. 2022; Flamingo §3.1)
ranks the support set by cosine similarity between mean-pooled frozen vision-encoder
features and places the most similar example LAST, right before the query.
The caller computes the features; `FeatureCache` keeps the support set's on disk so they
are computed once.
"""

import functools
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_chunk(queries: jnp.ndarray, support: jnp.ndarray, k: int):
    """Indices [C, k] of the k rows of `support` [S, D] most similar to each query [C, D],
    most similar first.

    `support` is already L2-normalised, so after normalising the queries the dot product is
    the cosine similarity.
    """
    sims = jnp.matmul(_l2_normalize(queries), support.T,
                      precision=jax.lax.Precision.HIGHEST)  # [C, S]
    return jax.lax.top_k(sims, k)[1]


def rices_select(
    query_features,
    support_features,
    k: int,
    *,
    chunk_size: int | None = 256,
) -> np.ndarray:
    """Indices [Q, k] into the support set: each query's k nearest by cosine similarity,
    ordered least to MOST similar (the last one goes right before the query).

    query_features [Q, D] and support_features [S, D] are mean-pooled vision features.
    Queries are processed `chunk_size` at a time (the last chunk padded, so one compiled
    shape serves all), bounding memory by chunk_size × S similarities; None: all at once.
    """
    query = np.asarray(query_features, dtype=np.float32)
    support_np = np.asarray(support_features, dtype=np.float32)
    if query.ndim != 2 or support_np.ndim != 2 or query.shape[1] != support_np.shape[1]:
        raise ValueError(f"features must be [Q, D] and [S, D] with the same D; "
                         f"got {query.shape} and {support_np.shape}")
    num_queries, num_support = query.shape[0], support_np.shape[0]
    if not 0 <= k <= num_support:
        raise ValueError(f"k={k} must be between 0 and the support set size {num_support}")
    if k == 0 or num_queries == 0:
        return np.zeros((num_queries, k), dtype=np.int32)
    support = _l2_normalize(jnp.asarray(support_np))  # [S, D]
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")
    chunk = num_queries if chunk_size is None else min(chunk_size, num_queries)
    out = np.empty((num_queries, k), dtype=np.int32)
    for start in range(0, num_queries, chunk):
        block = query[start:start + chunk]  # [<=C, D]
        padded = np.zeros((chunk, query.shape[1]), np.float32)
        padded[: len(block)] = block
        idx = _top_k_chunk(jnp.asarray(padded), support, k)  # [C, k]
        out[start:start + len(block)] = np.asarray(idx)[: len(block)]
    return out[:, ::-1].copy()  # most similar last


def random_select(
    num_queries: int,
    num_support: int,
    k: int,
    *,
    seed: int,
    trial: int = 0,
    exclude_self: bool = False,
) -> np.ndarray:
    """Indices [Q, k] of k distinct random support examples per query.

    Deterministic in (seed, trial): run several trials with trial = 0, 1, ... (each trial's
    draw does not depend on how many trials there are). exclude_self: query i never gets
    support example i (for when the queries are drawn from the support set itself).
    """
    available = num_support - 1 if exclude_self else num_support
    if not 0 <= k <= available:
        raise ValueError(f"k={k} must be between 0 and {available} "
                         f"(support size {num_support}, exclude_self={exclude_self})")
    if exclude_self and num_queries > num_support:
        raise ValueError(f"exclude_self needs query i to be support example i, "
                         f"but there are {num_queries} queries and {num_support} support examples")
    rng = np.random.default_rng([seed, trial])
    out = np.empty((num_queries, k), dtype=np.int64)
    for i in range(num_queries):
        draw = rng.choice(available, size=k, replace=False)
        if exclude_self:
            draw = draw + (draw >= i)  # skip index i: 0..S-2 -> 0..S-1 without i
        out[i] = draw
    return out


class FeatureCache:
    """Features stored as `<directory>/<name>.npy`, computed at most once per name."""

    _NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

    def __init__(self, directory: str):
        self.directory = directory

    def path(self, name: str) -> str:
        if not self._NAME.match(name) or name.startswith("."):
            raise ValueError(f"feature cache name {name!r} must be letters, digits, '_', '-', '.' "
                             "(it becomes a file name)")
        return os.path.join(self.directory, f"{name}.npy")

    def get_or_compute(self, name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The stored features for `name`; otherwise `compute()`, saved, then returned."""
        path = self.path(name)
        if os.path.exists(path):
            return np.load(path)
        features = np.asarray(compute())
        os.makedirs(self.directory, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, features)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache entry
        return features
