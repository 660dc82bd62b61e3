"""Train-step speed on an accelerator (GPU/TPU): step time, tokens/s and MFU for the ~100M
benchmark config and Flamingo-3B, in bfloat16, from in-memory synthetic batches (no
TensorFlow, no data on disk), so it runs on a machine that has only jax/flax/optax.

    python benchmarks/accelerator_step.py --budget_s 420 --json_out out.json

Sections, each skipped once the time budget is spent:
  probe   bf16 [n,n]@[n,n] (n=8192): the device's measured matmul ceiling.
  step    per config: first call (compile + run), median step time, tokens/s, XLA's FLOP
          count of the compiled step, MFU against the datasheet peak and against the probe.

MFU here = XLA-counted FLOPs per step ÷ (step time × peak); XLA counts every op the step
executes (the frozen vision encoder's forward included), so it is work done, not the
analytic model-FLOP count.
"""

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.train_step import (load_config, synthetic_batch, table,  # noqa: E402
                                   time_train_step)
from flamingo_jax.trainer import Trainer  # noqa: E402

# Dense bf16 datasheet peaks, FLOP/s per device, keyed by a substring of device_kind.
DATASHEET_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def datasheet_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    for key, peak in DATASHEET_PEAK.items():
        if key in kind:
            return peak
    return None


def bf16(config):
    config.model.dtype = "bfloat16"
    config.train.frozen_param_dtype = "bfloat16"
    return config


CASES = {
    # name: (config spec, batch size, overrides)
    "tiny_b8": ("tiny", 8, lambda c: c),
    "100m_b8": ("100m", 8, lambda c: c),
    "100m_b64": ("100m", 64, lambda c: c),
    "3b_features_b16": ("experiments/flamingo_3b.py", 16,
                        lambda c: (c.model.vision.update(variant=None, feature_dim=1536), c)[1]),
    "3b_f6_320px_b8": ("experiments/flamingo_3b.py", 8, lambda c: c),
}


def probe(n: int) -> dict:
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"seconds": seconds, "flops_per_s": 2 * n**3 / seconds}


def step_case(name: str, steps: int) -> dict:
    spec, batch_size, override = CASES[name]
    config = override(bf16(load_config(spec)))
    config.input.batch_size = batch_size
    config.train.task_weights = {"m3w": 1.0}
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    inp = config.input
    start = time.perf_counter()
    trainer = Trainer(config)
    state = trainer.init_state()
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    host = {"m3w": synthetic_batch(config, batch_size=batch_size, length=inp.text_length,
                                   num_media=inp.num_media)}
    _, result = time_train_step(trainer, state, host, steps)
    stats = jax.devices()[0].memory_stats() or {}
    return {"init_s": init_s, **result, "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=[c for c in CASES if c != "tiny_b8"],
                   choices=list(CASES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--probe_n", type=int, default=8192, help="square bf16 matmul size")
    p.add_argument("--budget_s", type=float, default=420.0)
    p.add_argument("--json_out", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    device = jax.devices()[0]
    result = {"device": device.device_kind, "platform": device.platform,
              "jax": jax.__version__, "cases": {}}
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    result["probe"] = probe(args.probe_n)
    peak = datasheet_peak()
    result["datasheet_peak"] = peak
    print(f"bf16 matmul probe: {result['probe']['flops_per_s'] / 1e12:.1f} TFLOP/s; "
          f"datasheet peak {peak and peak / 1e12} TFLOP/s", flush=True)
    for name in args.cases:
        if time.perf_counter() - t0 > args.budget_s:
            print(f"{name}: skipped (budget spent)", flush=True)
            continue
        try:
            r = step_case(name, args.steps)
        except Exception as e:  # noqa: BLE001 (report and go on to the next case)
            r = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        result["cases"][name] = r
        print(name, json.dumps(r), flush=True)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=1)
    rows = []
    for name, r in result["cases"].items():
        if "error" in r:
            print(f"{name}: {r['error']}")
            rows.append([name] + [None] * 6)
            continue
        rate = r["flops"] / r["step_s"] if r["flops"] else float("nan")
        rows.append([name, r["step_s"] * 1e3, r["tokens_per_s"], rate / 1e12,
                     rate / peak if peak else float("nan"),
                     rate / result["probe"]["flops_per_s"],
                     (r["peak_bytes_in_use"] or 0) / 2**30])
    table(["case", "step ms", "tokens/s", "TFLOP/s", "MFU(sheet)", "MFU(probe)", "peak GiB"],
          rows, ["", ".1f", ".0f", ".1f", ".3f", ".3f", ".1f"])
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
