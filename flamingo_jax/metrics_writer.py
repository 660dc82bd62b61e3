"""Training metrics to `metrics.jsonl`, TensorBoard event files and a console progress
bar, from one place (SPEC §5, §8). Only process 0 writes; elsewhere every call is a no-op.

    writer = MetricsWriter(workdir, num_steps, start_step=step, peak_flops=p)
    writer.write(step, metrics, examples=e, tokens=t, flops=f)   # every log_every steps
    writer.close()

Each record holds the step's metrics (floats) and what the writer derives from the time
since the previous record: step_time, steps_per_sec, and tokens_per_sec, examples_per_sec
and mfu = flops / (elapsed · peak_flops) from the counts passed in (those processed since
the previous record; steps may differ in shape, e.g. round-robin over datasets). The
first record's interval includes compilation. ETA = remaining steps × step_time. TensorBoard scalars go through tensorboardX, imported
on the first write, so importing this module (or flamingo_jax.train) loads no TensorFlow.
"""

import json
import math
import os
import sys
import time
from typing import Callable, Mapping, TextIO

import jax
from absl import logging

BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
    """'1:02:03' / '2:03' for a number of seconds; '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def flatten_counts(prefix: str, counts: Mapping) -> dict[str, float]:
    """{'bad_inputs/m3w/too_long': 3.0} from nested {'m3w': {'too_long': 3}}."""
    out = {}
    for key, value in counts.items():
        if isinstance(value, Mapping):
            out.update(flatten_counts(f"{prefix}/{key}", value))
        else:
            out[f"{prefix}/{key}"] = float(value)
    return out


class MetricsWriter:
    def __init__(
        self,
        workdir: str,
        num_steps: int,
        *,
        start_step: int = 0,
        peak_flops: float | None = None,  # FLOP/s of all the job's devices together
        tensorboard: bool = True,
        process_index: int | None = None,  # default jax.process_index()
        clock: Callable[[], float] = time.perf_counter,
        stream: TextIO | None = None,  # console; default sys.stdout
    ):
        self.primary = (jax.process_index() if process_index is None else process_index) == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        self.num_steps = num_steps
        self.peak_flops = peak_flops
        self._use_tensorboard = tensorboard
        self._tb = None
        self._clock = clock
        self._stream = stream
        self._last_step = start_step
        self._last_time = clock()

    def write(self, step: int, metrics: Mapping[str, float], *, examples: float = 0.0,
              tokens: float = 0.0, flops: float | None = None,
              counts: Mapping[str, float] | None = None) -> dict:
        """Logs one record. `examples`, `tokens` (text positions) and `flops` (model FLOPs,
        flamingo_jax.flops) are the job's totals since the previous record; `counts` are
        extra scalars (e.g. bad-input counts). Returns the record (on every process)."""
        now = self._clock()
        elapsed = max(now - self._last_time, 1e-9)
        steps = max(step - self._last_step, 1)
        step_time = elapsed / steps
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        record.update(counts or {})
        record.update(step_time=step_time, steps_per_sec=steps / elapsed,
                      tokens_per_sec=tokens / elapsed, examples_per_sec=examples / elapsed)
        if flops and self.peak_flops:
            record["mfu"] = flops / (elapsed * self.peak_flops)
        eta = (self.num_steps - step) * step_time
        self._last_step, self._last_time = step, now
        if self.primary:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self._write_tensorboard(record)
            print(self.progress_line(record, eta), file=self._stream or sys.stdout, flush=True)
        return record

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Scalars that are not training metrics (e.g. periodic evaluation) to TensorBoard
        and one console line; metrics.jsonl keeps one training record per logged step."""
        if not self.primary:
            return
        self._write_tensorboard({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
        print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()),
              file=self._stream or sys.stdout, flush=True)

    def progress_line(self, record: Mapping[str, float], eta: float) -> str:
        """'[#####---------------] 25/100  25% | 2.00 steps/s ... | eta 0:37'."""
        done = min(max(record["step"] / max(self.num_steps, 1), 0.0), 1.0)
        filled = int(round(done * BAR_WIDTH))
        parts = [f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {record['step']}/"
                 f"{self.num_steps} {100 * done:3.0f}%",
                 f"{record['steps_per_sec']:.2f} steps/s",
                 f"{record['tokens_per_sec']:,.0f} tokens/s",
                 f"{record['examples_per_sec']:.1f} examples/s"]
        if "mfu" in record:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        parts.append(f"eta {format_duration(eta)}")
        return " | ".join(parts)

    def _write_tensorboard(self, record: Mapping[str, float]) -> None:
        if not self._use_tensorboard:
            return
        if self._tb is None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                logging.warning("tensorboardX is not installed: no TensorBoard events are "
                                "written (pip install tensorboardX)")
                self._use_tensorboard = False
                return
            self._tb = SummaryWriter(self.tensorboard_dir, flush_secs=30)
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
