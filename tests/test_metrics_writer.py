"""MetricsWriter (flamingo_jax/metrics_writer.py): metrics.jsonl and TensorBoard events hold
the same values; rates, MFU and ETA from an injected clock; only process 0 writes."""

import glob
import io
import json
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from flamingo_jax.metrics_writer import MetricsWriter, flatten_counts, format_duration


def read_events(directory: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalars in a directory's TFRecord event files."""
    out: dict[str, dict[int, float]] = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4  # length, its crc, payload, payload crc
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


class Clock:
    def __init__(self, times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("metrics"))
    console = io.StringIO()
    # Constructed at t=100 s; records at t=110 s (step 10) and t=115 s (step 20).
    writer = MetricsWriter(workdir, num_steps=100, start_step=0, peak_flops=1e9,
                           process_index=0, clock=Clock([100.0, 110.0, 115.0]), stream=console)
    metrics = [{"loss": 2.5, "loss/m3w": 2.0, "grad_norm": 0.75, "lr": 1e-4,
                "gate/xattn_0/alpha_xattn": 0.01, "skipped_steps": 0},
               {"loss": 1.5, "loss/m3w": 1.25, "grad_norm": 0.5, "lr": 2e-4,
                "gate/xattn_0/alpha_xattn": 0.02, "skipped_steps": 1}]
    counts = flatten_counts("bad_inputs", {"m3w": {"too_long": 3}, "pairs": {}})
    writer.write(10, metrics[0], examples=80, tokens=5120, flops=4e9, counts=counts)
    writer.write(20, metrics[1], examples=80, tokens=5120, flops=4e9, counts=counts)
    writer.close()
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return workdir, records, console.getvalue().splitlines()


def test_rates_mfu_and_eta_from_the_clock(run):
    _, records, lines = run
    first, second = records
    assert first["step_time"] == pytest.approx(1.0)  # 10 s over 10 steps
    assert second["step_time"] == pytest.approx(0.5)  # 5 s over 10 steps
    assert second["steps_per_sec"] == pytest.approx(2.0)
    assert second["tokens_per_sec"] == pytest.approx(5120 / 5)
    assert second["examples_per_sec"] == pytest.approx(16.0)
    assert first["mfu"] == pytest.approx(4e9 / (10 * 1e9))
    assert second["mfu"] == pytest.approx(4e9 / (5 * 1e9))
    assert second["bad_inputs/m3w/too_long"] == 3.0
    # ETA: 80 steps left at 0.5 s each; 90 at 1 s each.
    assert lines[0].endswith("eta 1:30") and lines[1].endswith("eta 0:40")
    assert "20/100  20%" in lines[1] and "[####----------------]" in lines[1]
    assert "loss 1.5000" in lines[1] and "mfu 80.0%" in lines[1]


def test_tensorboard_events_hold_the_jsonl_values(run):
    workdir, records, _ = run
    events = read_events(os.path.join(workdir, "tensorboard"))
    for record in records:
        for key, value in record.items():
            if key != "step":
                assert events[key][record["step"]] == pytest.approx(value, rel=1e-6), key
    assert set(events) == set(records[0]) - {"step"}


def test_other_processes_write_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path), num_steps=10, process_index=1,
                           clock=Clock([0.0, 1.0]), stream=io.StringIO())
    record = writer.write(1, {"loss": 1.0}, examples=8, tokens=64)
    writer.close()
    assert record["examples_per_sec"] == 8.0  # computed everywhere, written only on 0
    assert os.listdir(tmp_path) == []


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.6, 61, 3723, float("nan"))] == [
        "0:00", "1:00", "1:01", "1:02:03", "?"]
