"""Ablation (paper Table 3, freezing the LM): the pretrained language model trains
together with the resampler and the gated layers (the vision encoder stays frozen).

Built on experiments/flamingo_3b.py: the paper runs its ablations on the 3B model."""

from experiments import flamingo_3b


def get_config(arg=None):
    config = flamingo_3b.get_config(arg)
    config.train.trainable = tuple(config.train.trainable) + (r"^lm/",)
    return config
