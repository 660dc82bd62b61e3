"""Every experiments/*.py loads and passes flamingo-inspect (abstract shapes, nothing
allocated); each ablation and the fine-tuning config differ from their base in exactly the
intended keys, with the parameter counts those keys imply."""

import glob
import importlib.util
import json
import os

import pytest

from flamingo_jax import inspect as inspect_lib
from flamingo_jax.models.flamingo import MEDIA_ATTENTION
from flamingo_jax.models.gated_xattn import GATES
from flamingo_jax.train import DATA_MODES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(os.path.basename(p)[:-3]
                     for p in glob.glob(os.path.join(REPO, "experiments", "*.py")))

# Ablation / fine-tuning experiment → (base experiment, the flattened keys it changes).
DELTAS = {
    "ablation_round_robin": ("flamingo_3b", {"data.mode": "round_robin"}),
    "ablation_sampled": ("flamingo_3b", {"data.mode": "sampled"}),
    "ablation_all_previous_media": ("flamingo_3b", {"model.media_attention": "all_previous"}),
    "ablation_xattn_every_4": ("flamingo_3b", {"model.xattn.every": 4}),
    "ablation_no_tanh_gate": ("flamingo_3b", {"model.xattn.gate": "none"}),
    "ablation_lm_unfrozen": ("flamingo_3b", {"train.trainable": (
        r"^resampler/", r"^lm/xattn_\d+/", r"/extra_", r"^lm/")}),
    "finetune": ("flamingo_3b", {
        "model.init_from": "workdirs/flamingo_3b", "input.image_size": 480,
        "train.trainable": (r"^resampler/", r"^lm/xattn_\d+/", r"/extra_", r"^vision/"),
        "optimizer.lr": 1e-5, "optimizer.warmup_steps": 500, "train.num_steps": 10_000}),
}


# Model keys that change the forward pass but no parameter shape.
FORWARD_ONLY = {"model.media_attention", "model.xattn.gate", "model.init_from"}


def load(name: str):
    path = os.path.join(REPO, "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def flat(config) -> dict:
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = tuple(value) if isinstance(value, list) else value

    walk("", config.to_dict())
    return out


@pytest.fixture(scope="module")
def inspected():
    """inspect_config per experiment. Experiments whose model and input sections agree up
    to keys that change the forward pass but no parameter (FORWARD_ONLY; their values are
    checked in test_ablation_changes_only_its_keys) have the same parameter shapes, so
    those are traced once and shared. The paper models go first: their shapes, traced
    under their own config, are the ones flamingo_jax.inspect keeps for test_inspect."""
    shapes, reports = {}, {}
    original = inspect_lib.abstract_params

    def shared(config, model=None):
        model_keys = {k: v for k, v in flat(config).items()
                      if k.startswith(("model.", "input.")) and k not in FORWARD_ONLY}
        key = json.dumps(model_keys, sort_keys=True, default=str)
        if key not in shapes:
            shapes[key] = original(config, model)
        return shapes[key]

    inspect_lib.abstract_params = shared
    try:
        for name in sorted(EXPERIMENTS, key=lambda n: not n.startswith("flamingo_")):
            reports[name] = inspect_lib.inspect_config(load(name), num_devices=8)
    finally:
        inspect_lib.abstract_params = original
    return reports


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_loads_and_inspects(inspected, name):
    report = inspected[name]
    assert report["total_params"] == sum(report["components"].values()) > 0
    assert 0 < report["trainable_params"] <= report["total_params"]
    assert report["bytes_per_device"] > 0


@pytest.mark.parametrize("name", sorted(DELTAS))
def test_ablation_changes_only_its_keys(name):
    base_name, expected = DELTAS[name]
    base, config = flat(load(base_name)), flat(load(name))
    assert set(config) == set(base)
    changed = {k: config[k] for k in config if config[k] != base[k]}
    assert changed == expected
    assert config["model.media_attention"] in MEDIA_ATTENTION
    assert config["model.xattn.gate"] in GATES
    assert config["data.mode"] in DATA_MODES


def test_parameter_counts_follow_the_deltas(inspected):
    base = inspected["flamingo_3b"]
    parts = base["components"]
    # Gated layers before every 4th of 24 blocks: a quarter of them.
    assert inspected["ablation_xattn_every_4"]["components"]["xattn"] * 4 == parts["xattn"]
    # Unfrozen LM: everything but the vision encoder trains.
    unfrozen = inspected["ablation_lm_unfrozen"]
    assert unfrozen["trainable_params"] == base["total_params"] - parts["vision"]
    # Fine-tuning: the vision encoder trains too.
    finetune = inspected["finetune"]
    assert finetune["trainable_params"] == base["trainable_params"] + parts["vision"]
    assert finetune["total_params"] == base["total_params"]  # 480 px: same parameters
    for name in ("ablation_round_robin", "ablation_sampled", "ablation_all_previous_media",
                 "ablation_no_tanh_gate"):
        assert inspected[name]["trainable_params"] == base["trainable_params"]
        assert inspected[name]["bytes_per_device"] == base["bytes_per_device"]
