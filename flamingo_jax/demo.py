"""`make demo`: the tiny Flamingo of experiments/demo.py on a synthetic interleaved batch.

Until the trainer lands this shows the model end to end on CPU: parameter counts per
component, one forward pass over images and interleaved text, and the check that with the
tanh gates at 0 Flamingo's logits equal the frozen LM's.
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from experiments import demo as demo_experiment
from flamingo_jax.inspect import inspect_config
from flamingo_jax.models.flamingo import build_flamingo


def synthetic_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random interleaved rows: BOS, then per media an `<image>` token and some text."""
    inp = config.input
    rng = np.random.default_rng(seed)
    b, length, n = inp.batch_size, inp.text_length, inp.num_media
    tokens = rng.integers(3, config.model.lm.vocab_size, size=(b, length)).astype(np.int32)
    tokens[:, 0] = 3  # BOS of our SentencePiece models
    media_mask = np.zeros((b, n), np.int32)
    for i in range(b):
        count = rng.integers(1, n + 1)
        positions = np.sort(rng.choice(np.arange(1, length), size=count, replace=False))
        tokens[i, positions] = config.model.image_token_id
        media_mask[i, :count] = 1
    images = rng.normal(size=(b, n, inp.num_frames, inp.image_size, inp.image_size, 3))
    return {"tokens": tokens, "images": images.astype(np.float32), "media_mask": media_mask}


def demo(workdir: str) -> None:
    config = demo_experiment.get_config()
    os.makedirs(workdir, exist_ok=True)
    report = inspect_config(config)
    print("parameters per component:")
    for name, count in report["components"].items():
        print(f"  {name:<10}{count:>12,}")
    print(f"  trainable {report['trainable_params']:>12,}  frozen {report['frozen_params']:,}")

    model = build_flamingo(config.model)
    batch = synthetic_batch(config)
    init = jax.jit(lambda key: model.init(key, **batch))
    params = nn.unbox(init(jax.random.key(config.train.seed)))["params"]
    forward = jax.jit(lambda p, b: model.apply({"params": p}, **b))
    logits = forward(params, batch)
    lm_params = {k: v for k, v in params["lm"].items() if not k.startswith("xattn_")}
    lm_logits = jax.jit(lambda p, t: model.lm.apply({"params": p}, t))(lm_params, batch["tokens"])
    max_diff = float(np.abs(np.asarray(logits) - np.asarray(lm_logits)).max())
    summary = {
        "tokens": list(batch["tokens"].shape),
        "images": list(batch["images"].shape),
        "logits": list(logits.shape),
        "max|flamingo - frozen LM| at init": max_diff,
        **{k: report[k] for k in ("total_params", "trainable_params", "frozen_params")},
    }
    with open(os.path.join(workdir, "forward.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    _workdir = flags.DEFINE_string("workdir", "workdirs/demo", "Where the demo writes outputs.")
    app.run(lambda argv: demo(_workdir.value))
