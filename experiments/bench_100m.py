"""~100M-parameter Flamingo for benchmarks/train_step.py: sized so that one fp32 train step
fits this 2-core CPU in seconds. It uses precomputed vision features, so no vision encoder runs.

    frozen LM     8 layers, width 512, 8 heads × 64, SwiGLU 2048, 32k vocabulary (untied head)
    resampler     2 layers, width 512, 8 heads × 64, 64 latents
    gated xattn   before every LM block, 8 heads × 64, FFW 4 × 512
    batch         B=8, L=256 tokens, N=4 media × 64 feature positions (256 px / 32)², d=512
    compute       float32 throughout (frozen params too)

≈97.9M parameters, 31.5M of them trainable (resampler, gated layers, <image>/<EOC> rows).

`get_config("perf")` is the same shape with PERF.md's smaller frozen LM (8k vocabulary,
SwiGLU 1408): 65.6M parameters, 31.5M trainable, the configuration PERF.md times.
"""

from flamingo_jax import base_config


def get_config(arg=None):
    config = base_config.get_config()
    config.model.dtype = "float32"
    config.model.vision.variant = None  # train from precomputed features [B, N, T, S, d]
    config.model.vision.feature_dim = 512  # d == resampler width: no input projection
    config.model.resampler.update(num_layers=2, dim=512, num_heads=8, head_dim=64,
                                  num_latents=64, max_frames=8, ffw_mult=4)
    config.model.lm.update(vocab_size=32000, num_layers=8, dim=512, num_heads=8,
                           num_kv_heads=8, mlp_dim=2048, max_length=256)
    config.model.xattn.update(every=1, num_heads=8, head_dim=64, ffw_mult=4)
    # image_size only sets S = (image_size // 32)² = 64 feature positions per media.
    config.input.update(image_size=256, num_media=4, num_frames=1, text_length=256,
                        batch_size=8)
    config.train.frozen_param_dtype = "float32"
    config.train.task_weights = {"m3w": 1.0}  # one dataset per step
    if arg == "perf":
        config.model.lm.update(vocab_size=8192, mlp_dim=1408)
    elif arg not in (None, "", "100m"):
        raise ValueError(f"bench_100m config arg {arg!r}; allowed: '100m' (default), 'perf'")
    return config
