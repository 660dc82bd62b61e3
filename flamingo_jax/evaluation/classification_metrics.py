"""Close-ended task metrics: ROC-AUC (HatefulMemes) and top-1 accuracy (ImageNet-style)."""

import numpy as np


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve of `scores` [N] for binary `labels` [N] (1 = positive).

    Computed as the Mann–Whitney U statistic: the probability that a random positive scores
    above a random negative, ties counting one half. Equal to sklearn's roc_auc_score.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} "
                         "must have the same 1-D shape")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0/1 (or bool), got values {np.unique(labels)[:10]}")
    positive = labels.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC-AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
    # 1-based ranks of the scores, tied scores sharing the mean of their ranks.
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    mean_rank = last - (counts - 1) / 2.0  # [num distinct scores]
    rank_sum = mean_rank[group][positive].sum()
    u = rank_sum - n_pos * (n_pos + 1) / 2.0  # pairs (pos, neg) with pos ranked above, ties 1/2
    return float(u / (n_pos * n_neg))


def top1_accuracy(scores, labels) -> float:
    """Fraction of rows of `scores` [N, C] whose best class (the first on ties) is `labels` [N]."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"scores must be [N, C] and labels [N]; "
                         f"got {scores.shape} and {labels.shape}")
    if scores.shape[0] == 0:
        raise ValueError("top1_accuracy needs at least one example")
    return float(np.mean(np.argmax(scores, axis=-1) == labels))
