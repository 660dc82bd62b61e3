"""Checkpoint size and save time (SPEC §6), and what a 9B checkpoint weighs.

    python benchmarks/checkpoint.py                  # demo and ~100M configs, then 9B; ≈3 min
    python benchmarks/checkpoint.py --configs demo   # one config

For each config (random init, a synthetic input position; no data pipeline), on one CPU
device, into a fresh temporary workdir:
  first save   writes the frozen params once (synchronously) and starts step 1's save;
  save         a later step: `blocking` is what the train loop waits for (arrays copied off
               the devices, the write started), `total` is until the checkpoint is on disk.
  on disk      one step checkpoint (trainable params, Adam moments, RNG, input position,
               config) and the frozen copy written once per workdir.

The 9B figures come from parameter counts (flamingo_jax.inspect): trainable params in
float32 with two Adam moments (12 bytes each) and frozen params in bfloat16 (2 bytes),
i.e. what a checkpoint would hold if the frozen weights were rewritten at every save,
against what it holds here.
"""

import argparse
import importlib.util
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from flamingo_jax.checkpointing import Checkpointer
from flamingo_jax.inspect import inspect_config
from flamingo_jax.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"demo": "experiments/demo.py", "100m": "experiments/bench_100m.py"}
NINE_B = "experiments/flamingo_9b.py"


def load_config(path: str):
    module_spec = importlib.util.spec_from_file_location(
        "bench_config_" + os.path.basename(path)[:-3], os.path.join(REPO, path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(None)


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def timed_save(checkpointer: Checkpointer, step: int, state, data_state) -> tuple[float, float]:
    """(blocking, total) seconds of one asynchronous save."""
    start = time.perf_counter()
    checkpointer.save(step, state, data_state)
    blocking = time.perf_counter() - start
    checkpointer.wait()
    return blocking, time.perf_counter() - start


def measure(name: str, path: str) -> None:
    config = load_config(path)
    config.mesh.num_devices = 1
    trainer = Trainer(config, devices=jax.devices()[:1])
    state = jax.block_until_ready(trainer.init_state())
    data_state = {"tasks": {t: {"next_index": 0} for t in config.train.task_weights}}
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(state.trainable))
    n_frozen = sum(x.size for x in jax.tree_util.tree_leaves(state.frozen))
    workdir = tempfile.mkdtemp(prefix="ckpt_bench_")
    try:
        checkpointer = Checkpointer(workdir, keep=3, config=config)
        first = timed_save(checkpointer, 1, state, data_state)
        later = [timed_save(checkpointer, step, state, data_state) for step in (2, 3, 4)]
        blocking, total = np.median(np.array(later), axis=0)
        checkpointer.close()
        step_bytes = directory_bytes(os.path.join(checkpointer.directory, "4"))
        frozen_bytes = directory_bytes(checkpointer.frozen_directory)
    finally:
        shutil.rmtree(workdir)
    print(f"{name} ({path}): {n_trainable / 1e6:.2f}M trainable, {n_frozen / 1e6:.2f}M frozen "
          f"params ({config.train.frozen_param_dtype})")
    print(f"  on disk      step checkpoint {step_bytes / 2**20:8.1f} MiB   "
          f"frozen copy (once) {frozen_bytes / 2**20:8.1f} MiB")
    print(f"  first save   blocking {first[0]:6.3f} s   total {first[1]:6.3f} s "
          "(includes writing the frozen copy)")
    print(f"  save         blocking {blocking:6.3f} s   total {total:6.3f} s "
          "(median of 3 later steps)", flush=True)


def nine_b() -> None:
    report = inspect_config(load_config(NINE_B), num_devices=1)
    trainable, frozen = report["trainable_params"], report["frozen_params"]
    trainable_bytes = trainable * 4 * 3  # float32 params + Adam mu, nu
    frozen_bytes = frozen * 2  # bfloat16
    gib = 2**30
    print(f"9B ({NINE_B}): {trainable / 1e9:.3f}B trainable, {frozen / 1e9:.3f}B frozen params")
    print(f"  checkpoint with frozen weights    {(trainable_bytes + frozen_bytes) / gib:7.1f} GiB")
    print(f"  checkpoint without (this module)  {trainable_bytes / gib:7.1f} GiB per step, "
          f"+ {frozen_bytes / gib:.1f} GiB frozen copy once per workdir")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    for name in args.configs:
        measure(name, CONFIGS[name])
    nine_b()


if __name__ == "__main__":
    main()
