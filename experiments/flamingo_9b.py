"""Flamingo-9B (paper Table 4/5): Chinchilla-7B-shaped frozen LM (40 layers, width 4096,
32 heads; MLP width 8448 makes it 7.1B), gated xattn before every 4th block."""

from flamingo_jax import base_config


def get_config(arg=None):
    del arg
    config = base_config.get_config()
    config.model.lm.update(num_layers=40, dim=4096, num_heads=32, num_kv_heads=32, mlp_dim=8448)
    config.model.xattn.update(every=4, num_heads=32, head_dim=128)
    return config
