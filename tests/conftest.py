"""Test-process set-up shared by every test module.

Two things must happen before anything else is imported:
- XLA is asked for 8 fake CPU devices, so sharding tests run on one CPU.
- torchvision (pulled in by timm and open_clip) is imported before tensorflow: the
  reverse order segfaults in one process on this stack.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402,F401  (import order: torch/torchvision before tensorflow)
import torchvision  # noqa: E402,F401

import tempfile  # noqa: E402

import jax  # noqa: E402

# Identical programs compiled by several tests (or a resumed run) compile once per session.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
