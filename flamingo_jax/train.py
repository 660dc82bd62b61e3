"""flamingo-train: train a Flamingo experiment (SPEC §5, §8).

    flamingo-train --config experiments/X.py[:arg] [--config.a.b=v ...] --workdir DIR

Writes DIR/checkpoints/, DIR/metrics.jsonl (one JSON object per logged step) and
TensorBoard events under DIR/tensorboard/ (process 0 only; flamingo_jax.metrics_writer);
with eval.every_steps = K, the few-shot evaluation of config.eval.tasks every K steps and
at the last step in DIR/eval/step_<N>.json (flamingo_jax.eval). Re-running with the same
workdir resumes from the latest checkpoint, including the input position, so the resumed
run sees the batches the uninterrupted run would have.
"""

import dataclasses
import functools
import os

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from flamingo_jax import distributed, flops
from flamingo_jax.checkpointing import Checkpointer, Preemption
from flamingo_jax.metrics_writer import MetricsWriter, flatten_counts
from flamingo_jax.trainer import Trainer

DATA_MODES = ("per_task", "round_robin", "sampled")
MIXTURE = "mixture"  # the one batch of data.mode="sampled", as shard_batches' task key


def make_input(config, state: dict | None):
    """The iterator over config.data's seqio mixture for config.data.mode, resumed from
    `state`: one batch per task, or (mode "sampled") one batch of examples drawn from the
    tasks at rates λ_m (train.task_weights)."""
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
    batch_sizes = {name: t.batch_size for name, t in config.data.tasks.items()}
    if config.data.mode == "sampled":  # seqio rates λ_m: examples drawn ∝ λ_m
        task_configs = [dataclasses.replace(c, rate=config.train.task_weights[c.name])
                        for c in task_configs]
        mixture = tasks.register_mixture(f"train_{os.getpid()}", task_configs, vocab)
        return mixture_iterator.make_sampled_iterator(
            mixture, config.data.batch_size or sum(batch_sizes.values()),
            seed=config.train.seed, shard_info=host_shard_info(), state=state)
    mixture = tasks.register_mixture(f"train_{os.getpid()}", task_configs, vocab)
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


def sampled_batch(host: dict[str, np.ndarray], names: list[str]) -> dict[str, dict]:
    """{MIXTURE: batch} from a sampled-mode batch, its `task_id` (an index into the
    iterator's task order `names`) re-indexed into sorted task order, as the step expects."""
    order = np.array([sorted(names).index(n) for n in names], np.int32)
    return {MIXTURE: {**host, "task_id": order[host["task_id"]]}}


def peak_flops(config) -> float | None:
    """FLOP/s of all the job's devices (flamingo_jax.flops), or None (no MFU) for a device
    kind without a known peak and no config.train.peak_flops_per_device."""
    try:
        return flops.peak_flops_per_second(per_device=config.train.peak_flops_per_device)
    except ValueError as e:
        logging.warning("%s; mfu is not logged", e)
        return None


def eval_scalars(results: dict) -> dict[str, float]:
    """{'eval/<task>/<shots>-shot/<metric>': value} from flamingo_jax.eval.evaluate's
    {task: {shots: {metric: value}}}."""
    return {f"eval/{task}/{shots}-shot/{metric}": float(value)
            for task, per_shots in results.items() for shots, metrics in per_shots.items()
            for metric, value in metrics.items() if "/" not in metric}


def check_periodic_eval(config) -> int:
    """config.eval.every_steps, checked before anything is built: evaluation needs a Flamingo
    model and at least one task."""
    every = config.eval.get("every_steps", 0) or 0
    if every < 0:
        raise ValueError(f"eval.every_steps={every}: use 0 (never) or a positive step count")
    if every and config.model.kind != "flamingo":
        raise ValueError(f"eval.every_steps={every} evaluates a Flamingo model; model.kind is "
                         f"{config.model.kind!r}: set eval.every_steps=0")
    if every and not config.eval.tasks:
        raise ValueError(f"eval.every_steps={every} but config.eval.tasks is empty: name the "
                         f"few-shot tasks (SPEC §7) or set eval.every_steps=0")
    return every


def train(config, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    eval_every = check_periodic_eval(config)
    os.makedirs(workdir, exist_ok=True)
    # ---- Mesh, model, optimizer, state ------------------------------------------------
    trainer = Trainer(config)
    # ---- Checkpoint: restore the latest (or checkpoint.restore_step), else a fresh state ----
    checkpointer = Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.keep_every,
                                config=config)
    start = checkpointer.step_to_restore(config.checkpoint.restore_step,
                                         config.checkpoint.require)
    if start is None:
        state, data_state = trainer.init_state(), None
    else:
        # Targets in this mesh's shardings: each device reads only its own slices.
        state, data_state = checkpointer.restore(start, jax.eval_shape(trainer._init),
                                                 trainer.state_shardings)
        logging.info("resumed from step %d", start)
    # ---- Input ------------------------------------------------------------------------
    # Each process resumes its own shard's position (distributed.gather_input_states).
    data_state = distributed.input_state_for_process(data_state, jax.process_index(),
                                                     jax.process_count())
    batches = make_input(config, data_state)
    names = sorted(batches.task_names) if hasattr(batches, "task_names") else None
    record: dict = {}
    step = int(state.step)
    writer = MetricsWriter(workdir, config.train.num_steps, start_step=step,
                           peak_flops=peak_flops(config))
    step_flops = functools.lru_cache(maxsize=64)(
        lambda shapes: flops.step_flops(config, dict(shapes)).total)
    tokens_since = examples_since = flops_since = 0.0
    # ---- Update loop --------------------------------------------------------------------
    preemption = Preemption()  # SIGTERM: save at the next step boundary and stop
    first_step = step
    while step < config.train.num_steps:
        host = next(batches)
        if step == first_step:  # every process has its first batch: start stepping together
            distributed.barrier("flamingo_first_batch")
        if config.data.mode == "round_robin":
            name = names[step % len(names)]
            host = {name: host[name]}
        elif config.data.mode == "sampled":
            host = sampled_batch(host, batches.task_names)
        host = {t: to_microbatches(b, config.train.microbatches) for t, b in host.items()}
        batch = trainer.shard_batches(host)
        state, metrics = trainer.step(
            state, batch[MIXTURE] if config.data.mode == "sampled" else batch)
        step += 1
        processes = jax.process_count()
        examples_since += processes * sum(b["tokens"].shape[0] * b["tokens"].shape[1]
                                          for b in host.values())
        tokens_since += processes * sum(b["tokens"].size for b in host.values())
        if config.model.kind in flops.MODEL_KINDS:  # no model-FLOP count (mfu) otherwise
            shapes = flops.shapes_of_batches(host, config.input.image_size)
            flops_since += processes * step_flops(tuple(sorted(shapes.items())))
        if step % config.train.log_every == 0 or step == config.train.num_steps:
            metrics = jax.device_get(metrics)
            if int(metrics["consecutive_skips"]) >= config.train.max_consecutive_skips:
                raise FloatingPointError(
                    f"{int(metrics['consecutive_skips'])} consecutive non-finite losses at step "
                    f"{step}; stopping (train.max_consecutive_skips)"
                )
            record = writer.write(
                step, metrics, examples=examples_since, tokens=tokens_since, flops=flops_since,
                counts=flatten_counts("bad_inputs", batches.bad_input_counts()))
            tokens_since = examples_since = flops_since = 0.0
        preempted = preemption.reached()
        if step % config.checkpoint.save_every == 0 or step == config.train.num_steps or preempted:
            checkpointer.save(step, state, distributed.gather_input_states(batches.get_state()))
        if eval_every and (step % eval_every == 0 or step == config.train.num_steps):
            from flamingo_jax import eval as eval_lib  # decoding and datasets: only when used

            results = eval_lib.evaluate(config, state.params(), step, workdir=workdir,
                                        mesh=trainer.mesh, progress=False)
            writer.write_scalars(step, eval_scalars(results))
        if preempted:
            logging.warning("SIGTERM: saved step %d; stopping (re-run to resume)", step)
            break
    preemption.close()
    writer.close()
    checkpointer.wait()
    checkpointer.close()
    batches.close()
    return record


def run():
    """Console entry point (flags are defined here so that importing this module is free)."""
    config = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    start_up = distributed.define_flags()
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        del argv
        distributed.initialize(**start_up())  # before anything touches devices
        train(config.value, workdir.value)

    app.run(main)


if __name__ == "__main__":
    run()
