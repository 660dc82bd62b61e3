"""AdamW with the paper's schedule and weight-decay exemptions (SPEC §5).

Learning rate: linear warmup to `lr` over `warmup_steps`, then constant (paper) or cosine
decay to `end_lr_fraction · lr` at `num_steps`. Global-norm clipping before AdamW. Weight
decay applies to trainable parameters except those matched by `no_weight_decay` regexes
(the paper exempts the resampler and the embeddings).
"""

import re

import optax

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(opt_config, num_steps: int) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, opt_config.lr, max(opt_config.warmup_steps, 1))
    decay_steps = max(num_steps - opt_config.warmup_steps, 1)
    end = opt_config.lr * opt_config.end_lr_fraction
    if opt_config.schedule == "constant":
        after = optax.constant_schedule(opt_config.lr)
    elif opt_config.schedule == "cosine":
        after = optax.cosine_decay_schedule(opt_config.lr, decay_steps, alpha=end / opt_config.lr)
    elif opt_config.schedule == "linear":
        after = optax.linear_schedule(opt_config.lr, end, decay_steps)
    else:
        raise ValueError(f"optimizer.schedule={opt_config.schedule!r}; allowed: {SCHEDULES}")
    return optax.join_schedules([warmup, after], [opt_config.warmup_steps])


def weight_decay_mask(paths: list[str], patterns) -> dict[str, bool]:
    compiled = [re.compile(p) for p in patterns]
    return {p: not any(c.search(p) for c in compiled) for p in paths}


def make_optimizer(opt_config, num_steps: int, trainable_paths: list[str]):
    """optax transformation over a flat {path: array} dict of trainable parameters."""
    schedule = learning_rate_schedule(opt_config, num_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(opt_config.grad_clip_norm),
        optax.adamw(
            schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
            weight_decay=opt_config.weight_decay,
            mask=weight_decay_mask(trainable_paths, opt_config.no_weight_decay),
        ),
    )
    return tx, schedule
