"""Ablation (paper Table 3, tanh gating): the gated xattn residuals are added ungated, so
the model no longer equals the frozen LM at initialisation.

Built on experiments/flamingo_3b.py: the paper runs its ablations on the 3B model."""

from experiments import flamingo_3b


def get_config(arg=None):
    config = flamingo_3b.get_config(arg)
    config.model.xattn.gate = "none"
    return config
