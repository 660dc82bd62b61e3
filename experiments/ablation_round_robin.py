"""Ablation (paper Table 3, dataset accumulation strategy): one dataset per update step
in turn instead of the accumulated Σ_m λ_m·L_m over all datasets.

Built on experiments/flamingo_3b.py: the paper runs its ablations on the 3B model."""

from experiments import flamingo_3b


def get_config(arg=None):
    config = flamingo_3b.get_config(arg)
    config.data.mode = "round_robin"
    return config
