"""Flamingo-3B (paper Table 4/5): Chinchilla-1.4B-shaped frozen LM (24 layers, width 2048,
16 heads) with a gated xattn layer before every block, 6-layer resampler, NFNet-F6 at 320 px.
The base config's defaults are this model; only the shape is stated again for readers."""

from flamingo_jax import base_config


def get_config(arg=None):
    del arg
    config = base_config.get_config()
    config.model.lm.update(num_layers=24, dim=2048, num_heads=16, num_kv_heads=16, mlp_dim=5888)
    config.model.xattn.update(every=1, num_heads=16, head_dim=128)
    return config
