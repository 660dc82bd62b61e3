"""Flamingo-80B (paper Table 4/5): Chinchilla-70B-shaped frozen LM (80 layers, width 8192,
64 heads; MLP width 24576 makes it 70B), gated xattn before every 7th block."""

from flamingo_jax import base_config


def get_config(arg=None):
    del arg
    config = base_config.get_config()
    config.model.lm.update(num_layers=80, dim=8192, num_heads=64, num_kv_heads=64, mlp_dim=24576)
    config.model.xattn.update(every=7, num_heads=64, head_dim=128)
    return config
