"""Fine-tuning a trained Flamingo on a downstream task (paper Appendix B.2): the vision
encoder unfrozen and fed 480 px images, starting from a Flamingo checkpoint.

    flamingo-train --config experiments/finetune.py:3b --workdir workdirs/ft \
        --config.model.init_from=workdirs/flamingo_3b --config.data.tasks=...

The argument names the model (3b, 9b or 80b; default 3b). model.init_from names the
pretraining run (a workdir, its checkpoints/ or one checkpoints/<step>); every parameter,
trainable and frozen, starts from it. The paper tunes the learning rate per task within
3e-8 to 1e-5; this sets the upper end with a short warmup. Lower it with
--config.optimizer.lr, or give parameter groups their own rate, e.g. the unfrozen vision
encoder 100x slower:

    --config.optimizer.lr_multipliers='(("^vision/", 0.01),)'
"""

from experiments import flamingo_3b, flamingo_80b, flamingo_9b

MODELS = {"3b": flamingo_3b, "9b": flamingo_9b, "80b": flamingo_80b}


def get_config(arg=None):
    model = arg or "3b"
    if model not in MODELS:
        raise ValueError(f"finetune config arg {arg!r}; allowed: {sorted(MODELS)}")
    config = MODELS[model].get_config()
    config.model.init_from = f"workdirs/flamingo_{model}"
    config.input.image_size = 480
    config.train.trainable = tuple(config.train.trainable) + (r"^vision/",)
    config.optimizer.update(lr=1e-5, warmup_steps=500)
    config.train.num_steps = 10_000
    return config
