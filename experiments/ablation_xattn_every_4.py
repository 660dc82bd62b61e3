"""Ablation (paper Table 3, cross-attention frequency): a gated xattn layer before every
4th LM block instead of every block (fewer trainable parameters, faster steps).

Built on experiments/flamingo_3b.py: the paper runs its ablations on the 3B model."""

from experiments import flamingo_3b


def get_config(arg=None):
    config = flamingo_3b.get_config(arg)
    config.model.xattn.every = 4
    return config
