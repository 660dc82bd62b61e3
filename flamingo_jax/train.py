"""flamingo-train: train a Flamingo experiment (SPEC §5, §8).

    flamingo-train --config experiments/X.py[:arg] [--config.a.b=v ...] --workdir DIR

Writes DIR/checkpoints/ and DIR/metrics.jsonl (one JSON object per logged step; process 0
only). Re-running with the same workdir resumes from the latest checkpoint, including the
input position, so the resumed run sees the batches the uninterrupted run would have.
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from flamingo_jax.checkpointing import Checkpointer
from flamingo_jax.trainer import Trainer

DATA_MODES = ("per_task", "round_robin")


def make_input(config, state: dict | None):
    """The per-task iterator over config.data's seqio mixture, resumed from `state`."""
    from data_pipelines import mixture_iterator, tasks, tokenizer
    from data_pipelines.global_batch import host_shard_info

    if config.data.mode not in DATA_MODES:
        raise ValueError(f"data.mode={config.data.mode!r}; allowed: {DATA_MODES}")
    vocab = tokenizer.load_vocabulary(config.data.tokenizer)
    if vocab.image_id != config.model.image_token_id or vocab.eoc_id != config.model.eoc_token_id:
        raise ValueError(
            f"tokenizer {config.data.tokenizer} has <image>={vocab.image_id}, <EOC>={vocab.eoc_id}"
            f" but the model config has image_token_id={config.model.image_token_id}, "
            f"eoc_token_id={config.model.eoc_token_id}: set model.lm.vocab_size="
            f"{vocab.base_vocab_size}"
        )
    task_configs = tasks.configs_from_dict(
        config.data.tasks.to_dict(), image_size=config.input.image_size
    )
    missing = sorted({c.name for c in task_configs} - set(config.train.task_weights))
    if missing:
        raise ValueError(f"train.task_weights has no λ for tasks {missing}")
    mixture = tasks.register_mixture(f"train_{os.getpid()}", task_configs, vocab)
    batch_sizes = {name: t.batch_size for name, t in config.data.tasks.items()}
    return mixture_iterator.make_task_iterators(
        mixture, batch_sizes, seed=config.train.seed, shard_info=host_shard_info(), state=state
    )


def to_microbatches(batch: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """[b, ...] → [k, b/k, ...]."""
    out = {}
    for name, value in batch.items():
        if value.dtype.kind not in "biuf":
            continue
        if value.shape[0] % k:
            raise ValueError(f"batch of {value.shape[0]} is not divisible into {k} microbatches")
        out[name] = value.reshape((k, value.shape[0] // k) + value.shape[1:])
    return out


class MetricsLog:
    """metrics.jsonl and a console line; only process 0 writes."""

    def __init__(self, workdir: str):
        self.primary = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")

    def write(self, record: dict, num_steps: int, seconds_per_step: float) -> None:
        if not self.primary:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        eta = (num_steps - record["step"]) * seconds_per_step
        print(f"step {record['step']}/{num_steps} loss {record['loss']:.4f} "
              f"{1 / max(seconds_per_step, 1e-9):.2f} steps/s eta {eta:.0f}s", flush=True)


def train(config, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    os.makedirs(workdir, exist_ok=True)
    # ---- Mesh, model, optimizer, state ------------------------------------------------
    trainer = Trainer(config)
    checkpointer = Checkpointer(workdir, config.checkpoint.keep)
    state = trainer.init_state()
    data_state = None
    start = checkpointer.latest_step()
    if start is not None:
        state, data_state = checkpointer.restore(start, state, trainer.state_shardings)
        logging.info("resumed from step %d", start)
    # ---- Input ------------------------------------------------------------------------
    batches = make_input(config, data_state)
    names = sorted(batches.task_names) if hasattr(batches, "task_names") else None
    log = MetricsLog(workdir)
    record: dict = {}
    step = int(state.step)
    tick, tokens_since, examples_since, steps_since = time.time(), 0.0, 0, 0
    # ---- Update loop --------------------------------------------------------------------
    while step < config.train.num_steps:
        host = next(batches)
        if config.data.mode == "round_robin":
            name = names[step % len(names)]
            host = {name: host[name]}
        host = {t: to_microbatches(b, config.train.microbatches) for t, b in host.items()}
        state, metrics = trainer.step(state, trainer.shard_batches(host))
        step += 1
        steps_since += 1
        examples_since += sum(b["tokens"].shape[0] * b["tokens"].shape[1] for b in host.values())
        if step % config.train.log_every == 0 or step == config.train.num_steps:
            metrics = jax.device_get(metrics)
            if int(metrics["consecutive_skips"]) >= config.train.max_consecutive_skips:
                raise FloatingPointError(
                    f"{int(metrics['consecutive_skips'])} consecutive non-finite losses at step "
                    f"{step}; stopping (train.max_consecutive_skips)"
                )
            tokens_since += sum(float(v) for k, v in metrics.items() if k.startswith("tokens/"))
            elapsed = time.time() - tick
            record = {"step": step, **{k: float(v) for k, v in metrics.items()},
                      "tokens_per_sec": tokens_since / elapsed,
                      "examples_per_sec": examples_since / elapsed,
                      "bad_inputs": batches.bad_input_counts()}
            log.write(record, config.train.num_steps, elapsed / steps_since)
            tick, tokens_since, examples_since, steps_since = time.time(), 0.0, 0, 0
        if step % config.checkpoint.save_every == 0 or step == config.train.num_steps:
            checkpointer.save(step, state, batches.get_state())
    checkpointer.wait()
    checkpointer.close()
    batches.close()
    return record


def run():
    """Console entry point (flags are defined here so that importing this module is free)."""
    config = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(lambda argv: train(config.value, workdir.value))


if __name__ == "__main__":
    run()
