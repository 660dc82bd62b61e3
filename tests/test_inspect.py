"""flamingo-inspect on the paper configurations (SPEC §3.6, §8): sizes from abstract shapes."""

import json
import os
import subprocess
import sys

import pytest

from experiments import flamingo_3b, flamingo_9b, flamingo_80b
from flamingo_jax.inspect import inspect_config

PAPER = {  # config → (total params, trainable params) reported in the paper
    "3b": (flamingo_3b, 3.2e9, 1.4e9),
    "9b": (flamingo_9b, 9.3e9, 1.8e9),
    "80b": (flamingo_80b, 80e9, 10e9),
}
RESAMPLER_PARAMS = 194e6
LM_PARAMS = {"3b": 1.4e9, "9b": 7.1e9, "80b": 70e9}


@pytest.fixture(scope="module", params=sorted(PAPER))
def report(request):
    module, total, trainable = PAPER[request.param]
    return request.param, inspect_config(module.get_config(), num_devices=256), total, trainable


def test_sizes_match_the_paper(report):
    name, r, total, trainable = report
    assert abs(r["total_params"] / total - 1) < 0.05, r
    assert abs(r["components"]["resampler"] / RESAMPLER_PARAMS - 1) < 0.05, r
    assert abs(r["components"]["lm"] / LM_PARAMS[name] - 1) < 0.02, r
    assert set(r["components"]) == {"vision", "resampler", "xattn", "lm"}
    assert r["total_params"] == sum(r["components"].values())
    assert r["trainable_params"] + r["frozen_params"] == r["total_params"]
    # Trainable: resampler + gated layers + the appended <image>/<EOC> rows, nothing else.
    extra_rows = 2 * 2 * {"3b": 2048, "9b": 4096, "80b": 8192}[name]
    assert r["trainable_params"] == (
        r["components"]["resampler"] + r["components"]["xattn"] + extra_rows
    )
    # The paper's trainable counts are approximate; ours are within 25%.
    assert abs(r["trainable_params"] / trainable - 1) < 0.25, r


def test_bytes_per_device_fall_with_fsdp(report):
    name, r, _, _ = report
    # bf16 frozen weights; f32 trainable weights with two f32 Adam moments.
    full = r["frozen_params"] * 2 + r["trainable_params"] * 12
    assert r["mesh"] == {"data": 1, "fsdp": 256, "tensor": 1}
    assert abs(r["bytes_per_device"] / (full / 256) - 1) < 0.10


def test_cli_prints_one_json_object():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "flamingo_jax.inspect", "--config", "experiments/flamingo_9b.py",
         "--json", "--config.mesh.fsdp=-1", "--config.mesh.tensor=4", "--num_devices=64"],
        capture_output=True, text=True, check=True, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"total_params", "trainable_params", "frozen_params", "components",
            "bytes_per_device"} <= set(report)
    assert report["mesh"] == {"data": 1, "fsdp": 16, "tensor": 4}
    assert abs(report["total_params"] / 9.3e9 - 1) < 0.05
