"""Text-only pretraining of the demo's LM: the first stage of `make demo`.

The LM of experiments/demo.py trained alone (model.kind "lm", every parameter trainable)
on the synthetic text documents; the Flamingo stage (experiments/demo.py) then freezes it
by naming this run's workdir in model.lm_init.

    flamingo-train --config experiments/demo_lm.py:workdirs/demo --workdir workdirs/demo/lm

The argument is the demo workdir (experiments/demo.data_paths); without one the config has
no data, for tests that add their own.
"""

import os

from experiments import demo


def text_tasks(paths: dict[str, str], heldout: bool = False) -> dict[str, dict]:
    """The LM stage's `config.data.tasks` (held-out: the other seed's documents, first
    window)."""
    root = os.path.join(paths["heldout"], "text") if heldout else paths["text"]
    return {"text": dict(kind="text", source="text", path=root, batch_size=16, text_length=64,
                         train=not heldout)}


def get_config(arg=None):
    config = demo.get_config(arg)  # the same LM, tokenizer and input sizes
    config.model.kind = "lm"
    config.model.lm_init = None
    config.model.vision_init = None
    config.train.trainable = (".*",)
    config.train.task_weights = {"text": 1.0}
    config.optimizer.update(lr=3e-3, warmup_steps=20, schedule="cosine", end_lr_fraction=0.1,
                            lr_multipliers=())  # one rate: there are no gates or resampler
    if arg is None:
        return config
    config.data.tasks = text_tasks(demo.data_paths(arg))
    config.train.update(num_steps=90, log_every=10)  # the training loss flattens by ~70
    config.checkpoint.update(save_every=90, keep=1)
    return config
