"""Ablation (paper Table 3, cross-attention over media): each text token attends to every
preceding image instead of only the last one before it.

Built on experiments/flamingo_3b.py: the paper runs its ablations on the 3B model."""

from experiments import flamingo_3b


def get_config(arg=None):
    config = flamingo_3b.get_config(arg)
    config.model.media_attention = "all_previous"
    return config
