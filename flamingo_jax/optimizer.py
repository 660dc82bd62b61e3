"""AdamW with the paper's schedule and weight-decay exemptions (SPEC §5).

Learning rate: linear warmup to `lr` over `warmup_steps`, then constant (paper) or cosine
decay to `end_lr_fraction · lr` at `num_steps`. Global-norm clipping before AdamW (or,
for NFNet pretraining, adaptive gradient clipping on some parameters and global-norm
clipping on others: `gradient_clipping`). Weight decay applies to trainable parameters
except those matched by `no_weight_decay` regexes (the paper exempts the resampler and the
embeddings). `lr_multipliers`, ((regex, factor), ...), scales the learning rate of the
matched parameters (the first matching regex wins), e.g. a faster rate for the gates' α.
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


def _matching(paths: list[str], patterns, key: str) -> set[str]:
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(f"optimizer.{key} has an invalid regex: {e}") from e
    matched = {p for p in paths if any(c.search(p) for c in compiled)}
    if not matched:
        raise ValueError(f"optimizer.{key}={tuple(patterns)} matches no trainable parameter "
                         f"(e.g. {sorted(paths)[:3]})")
    return matched


def clip_groups(opt_config, trainable_paths: list[str]) -> dict[str, str]:
    """{path: 'agc' | 'global_norm' | 'none'}: adaptive clipping for `agc_params` (when
    agc_clip > 0), global-norm clipping for the `grad_clip_params` not already under AGC,
    none for the rest (e.g. the NFNet's final classifier / projection, which AGC exempts)."""
    agc = set()
    if opt_config.get("agc_clip", 0.0):
        agc = _matching(trainable_paths, opt_config.agc_params, "agc_params")
    global_norm = set(trainable_paths)
    if opt_config.get("grad_clip_params") is not None:
        global_norm = _matching(trainable_paths, opt_config.grad_clip_params, "grad_clip_params")
    return {p: "agc" if p in agc else "global_norm" if p in global_norm else "none"
            for p in trainable_paths}


def gradient_clipping(opt_config, trainable_paths: list[str]) -> optax.GradientTransformation:
    """Global-norm clipping of every gradient (Flamingo, SPEC §5), or, when the config sets
    `agc_clip` / `grad_clip_params` (contrastive NFNet pretraining, SPEC §3.1), unit-wise
    adaptive gradient clipping (λ = agc_clip, floor agc_eps) on the parameters matched by
    `agc_params` and global-norm clipping, over their own norm, on `grad_clip_params`."""
    if not opt_config.get("agc_clip", 0.0) and opt_config.get("grad_clip_params") is None:
        return optax.clip_by_global_norm(opt_config.grad_clip_norm)
    return optax.multi_transform(
        {"agc": optax.adaptive_grad_clip(opt_config.get("agc_clip", 0.0),
                                         eps=opt_config.get("agc_eps", 1e-3)),
         "global_norm": optax.clip_by_global_norm(opt_config.grad_clip_norm),
         "none": optax.identity()},
        clip_groups(opt_config, trainable_paths),
    )


def lr_factors(opt_config, trainable_paths: list[str]) -> dict[str, float]:
    """{path: learning-rate factor} from `optimizer.lr_multipliers` (1 where none matches);
    a regex that matches no trainable parameter is an error (a typo would be silent)."""
    factors = {p: 1.0 for p in trainable_paths}
    claimed: set[str] = set()
    for entry in opt_config.get("lr_multipliers") or ():
        if len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"optimizer.lr_multipliers entry {entry!r}: expected (regex, factor)")
        pattern, factor = entry
        if not factor > 0:
            raise ValueError(f"optimizer.lr_multipliers[{pattern!r}]={factor}: must be > 0")
        for p in sorted(_matching(trainable_paths, [pattern], "lr_multipliers") - claimed):
            factors[p] = float(factor)
            claimed.add(p)
    return factors


def scale_by_factors(factors: dict[str, float]) -> optax.GradientTransformation:
    """Multiplies each update of a flat {path: array} dict by its path's factor."""

    def update(updates, state, params=None):
        del params
        return {p: u * factors[p] if factors[p] != 1.0 else u for p, u in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt_config, num_steps: int, trainable_paths: list[str]):
    """optax transformation over a flat {path: array} dict of trainable parameters."""
    schedule = learning_rate_schedule(opt_config, num_steps)
    factors = lr_factors(opt_config, trainable_paths)
    tx = optax.chain(
        gradient_clipping(opt_config, trainable_paths),
        optax.adamw(
            schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
            weight_decay=opt_config.weight_decay,
            mask=weight_decay_mask(trainable_paths, opt_config.no_weight_decay),
        ),
        *([scale_by_factors(factors)] if set(factors.values()) != {1.0} else []),
    )
    return tx, schedule
