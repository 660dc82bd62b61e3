"""RICES and random support selection (SPEC §7): true nearest neighbours, most similar last."""

import numpy as np
import pytest

from flamingo_jax.evaluation.rices import FeatureCache, random_select, rices_select

D = 16


def _embed(angles_deg, norms, basis):
    """2-D points at the given angles and lengths, placed in a random plane of R^D."""
    a = np.deg2rad(np.asarray(angles_deg, float))
    xy = np.stack([np.cos(a), np.sin(a)], -1) * np.asarray(norms, float)[:, None]
    return (xy @ basis[:2]).astype(np.float32)  # [N, D]


def test_rices_nearest_by_angle_most_similar_last():
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(D, D)))[0].T  # orthonormal rows
    # Support norms vary wildly: a dot product would rank index 3 (norm 100) first.
    support = _embed([50, 10, 170, 30, 90, 5, 120, -20], [1, 3, 0.5, 100, 2, 0.1, 1, 7], basis)
    queries = _embed([0, 95], [1, 5], basis)
    got = rices_select(queries, support, k=4)
    # Query at 0 deg: 5 (idx 5) < 10 (1) < 20 (7) < 30 (3) degrees away.
    # Query at 95 deg: 5 (idx 4) < 25 (6) < 45 (0) < 65 (3) degrees away.
    np.testing.assert_array_equal(got, [[3, 7, 1, 5], [3, 0, 6, 4]])
    np.testing.assert_array_equal(rices_select(queries, support, k=1), [[5], [4]])
    assert rices_select(queries, support, k=0).shape == (2, 0)
    with pytest.raises(ValueError, match="support set size"):
        rices_select(queries, support, k=9)


def test_rices_chunked_equals_unchunked_and_brute_force():
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(37, 24)).astype(np.float32)
    support = rng.normal(size=(101, 24)).astype(np.float32)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sn = support / np.linalg.norm(support, axis=1, keepdims=True)
    expected = np.argsort(-(qn @ sn.T), axis=1, kind="stable")[:, :7][:, ::-1]  # most similar last
    full = rices_select(queries, support, k=7, chunk_size=None)
    np.testing.assert_array_equal(full, expected)
    for chunk in (1, 5, 16, 64):
        np.testing.assert_array_equal(rices_select(queries, support, k=7, chunk_size=chunk), full)


def test_feature_cache_computes_once(tmp_path):
    calls = []
    feats = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)

    def compute():
        calls.append(1)
        return feats

    cache = FeatureCache(str(tmp_path / "features"))
    first = cache.get_or_compute("coco_train", compute)
    second = cache.get_or_compute("coco_train", compute)
    fresh = FeatureCache(str(tmp_path / "features"))  # as in a new run
    third = fresh.get_or_compute("coco_train", compute)
    assert len(calls) == 1
    for got in (first, second, third):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, feats)
    cache.get_or_compute("vqav2_train", lambda: feats * 2)
    np.testing.assert_array_equal(cache.get_or_compute("vqav2_train", compute), feats * 2)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="file name"):
        cache.get_or_compute("../escape", compute)


def test_random_select_seeded_distinct_and_excludes_self():
    a = random_select(50, 20, 8, seed=3, trial=0)
    np.testing.assert_array_equal(a, random_select(50, 20, 8, seed=3, trial=0))
    assert not np.array_equal(a, random_select(50, 20, 8, seed=3, trial=1))
    assert not np.array_equal(a, random_select(50, 20, 8, seed=4, trial=0))
    assert a.shape == (50, 8) and a.min() >= 0 and a.max() < 20
    assert all(len(set(row)) == 8 for row in a)
    # Over many queries every support example gets drawn.
    assert set(a.ravel()) == set(range(20))
    # exclude_self with k = S - 1: each row is exactly every other index.
    b = random_select(12, 12, 11, seed=0, exclude_self=True)
    for i, row in enumerate(b):
        assert sorted(row) == [j for j in range(12) if j != i]
    with pytest.raises(ValueError, match="between 0 and 11"):
        random_select(12, 12, 12, seed=0, exclude_self=True)
