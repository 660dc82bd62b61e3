"""Test-process set-up shared by every test module.

Two things must happen before anything else is imported:
- XLA is asked for 8 fake CPU devices, so sharding tests run on one CPU, and to compile
  without LLVM's optimisations (TEST_XLA_FLAGS): compiling, not running, is what the
  tests spend their time on, and this cuts the compile time by about a third. Tests that
  start processes with another device count pass `xla_flags(n)` to them.
- torchvision (pulled in by timm and open_clip) is imported before tensorflow: the
  reverse order segfaults in one process on this stack.
"""

import os

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(num_devices: int) -> str:
    """XLA_FLAGS for a test's subprocess: `num_devices` fake CPU devices, compiled like this
    process (the same flags keep its numbers, and its compilation cache entries, equal)."""
    return f"--xla_force_host_platform_device_count={num_devices} {TEST_XLA_FLAGS}"


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
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
