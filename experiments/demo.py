"""Tiny Flamingo behind `make demo`: synthetic data, CPU, a few minutes.

A 4-layer width-128 LM over a 1k SentencePiece vocabulary, a tiny NFNet at 64 px, a
2-layer resampler with 16 latents, gated xattn before every block.
"""

from flamingo_jax import base_config


def get_config(arg=None):
    del arg
    config = base_config.get_config()
    config.model.dtype = "float32"
    config.model.vision.variant = "tiny"
    config.model.resampler.update(num_layers=2, dim=128, num_heads=4, head_dim=32,
                                  num_latents=16, max_frames=8)
    config.model.lm.update(vocab_size=1000, num_layers=4, dim=128, num_heads=4, num_kv_heads=2,
                           mlp_dim=384, max_length=64)
    config.model.xattn.update(every=1, num_heads=4, head_dim=32)
    config.input.update(image_size=64, num_media=3, num_frames=1, text_length=64, batch_size=8)
    config.train.frozen_param_dtype = "float32"
    return config
