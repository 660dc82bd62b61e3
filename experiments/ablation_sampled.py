"""Ablation (dataset mixing strategy): one batch per step of examples drawn from the
datasets with probabilities λ_m / Σλ (seqio rates), each example's loss weighted equally,
instead of one batch per dataset accumulated as Σ_m λ_m·L_m.

Built on experiments/flamingo_3b.py: the paper runs its ablations on the 3B model."""

from experiments import flamingo_3b


def get_config(arg=None):
    config = flamingo_3b.get_config(arg)
    config.data.mode = "sampled"
    return config
