"""flamingo-eval: few-shot evaluation of a checkpoint (SPEC §7, §8).

    flamingo-eval --config experiments/X.py[:arg] [--config.a.b=v ...] --workdir DIR [--step N]

Restores the parameters saved in DIR/checkpoints/<N> (the latest when --step is not given)
onto the configured mesh, whatever mesh saved them, runs the tasks of `config.eval.tasks`
(see flamingo_jax/base_config.py and flamingo_jax/evaluation/fewshot.py) and writes

    DIR/eval/step_<N>.json               {"step": N, "results": {task: {shots: {metric: value}}},
                                          "skipped": {task: {"support"|"query": {reason: n}}}}
    DIR/eval/step_<N>_predictions.jsonl  one line per query, shots and trial: the decoded
                                          text or the candidates' scores, and the ids of
                                          the support examples in prompt order
    DIR/eval/features/                   cached RICES vision features

`evaluate(config, params, step, workdir=...)` does the same for parameters already in
memory (the trainer's, every K steps).
"""

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from flamingo_jax import distributed, sharding
from flamingo_jax.checkpointing import Checkpointer
from flamingo_jax.evaluation import datasets, fewshot, prompts, rices
from flamingo_jax.models.flamingo import build_flamingo
from flamingo_jax.train_state import merge_params


def task_configs(config) -> list[fewshot.TaskConfig]:
    """config.eval.tasks, checked (before any data is read or anything compiled)."""
    eval_config = config.eval
    defaults = eval_config.task_defaults.to_dict()
    tasks = [fewshot.TaskConfig.from_dict(name, task.to_dict() if hasattr(task, "to_dict")
                                          else dict(task), defaults)
             for name, task in eval_config.tasks.items()]
    if not tasks:
        raise ValueError("config.eval.tasks is empty; add tasks, e.g. "
                         "data_pipelines.synthetic_eval.task_configs(paths)")
    return tasks


def task_template(config, task: fewshot.TaskConfig) -> prompts.PromptTemplate:
    template = task.prompt or config.eval.prompts.get(task.kind, "")
    where = (f"config.eval.tasks.{task.name}.prompt" if task.prompt
             else f"config.eval.prompts.{task.kind}")
    return prompts.PromptTemplate.for_kind(task.kind, template, where)


def load_vocabulary(config):
    """The evaluation tokenizer (config.eval.tokenizer, else config.data.tokenizer), checked
    against the model's `<image>` / `<EOC>` ids."""
    from data_pipelines import tokenizer

    path = config.eval.tokenizer or config.data.tokenizer
    if not path:
        raise ValueError("no tokenizer: set config.eval.tokenizer or config.data.tokenizer to "
                         "a SentencePiece model file")
    vocab = tokenizer.load_vocabulary(path)
    if vocab.image_id != config.model.image_token_id or vocab.eoc_id != config.model.eoc_token_id:
        raise ValueError(
            f"tokenizer {path} has <image>={vocab.image_id}, <EOC>={vocab.eoc_id} but the model "
            f"config has image_token_id={config.model.image_token_id}, eoc_token_id="
            f"{config.model.eoc_token_id}: set model.lm.vocab_size={vocab.base_vocab_size}")
    return vocab


def _check_model_kind(config) -> None:
    kind = config.model.get("kind", "flamingo")
    if kind != "flamingo":
        raise ValueError(f"config.model.kind={kind!r}: few-shot evaluation needs a 'flamingo' "
                         "model (images and text)")


def evaluate(config, params, step: int, *, workdir: str | None = None, mesh=None,
             progress: bool = True) -> dict:
    """Runs config.eval.tasks with `params` (the model's nested parameter dict, on `mesh`,
    by default the configured one); returns {task: {shots: {metric: value}}}. With a
    workdir, process 0 writes DIR/eval/step_<step>.json and the predictions."""
    _check_model_kind(config)
    tasks = task_configs(config)
    templates = {t.name: task_template(config, t) for t in tasks}
    vocab = load_vocabulary(config)
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    eval_dir = None if workdir is None else os.path.join(os.path.abspath(workdir), "eval")
    primary = jax.process_index() == 0
    evaluator = fewshot.FewShotEvaluator(
        build_flamingo(config.model), params, vocab,
        image_size=config.input.image_size, batch_size=config.eval.batch_size,
        max_length=config.model.lm.max_length, length_bucket=config.eval.length_bucket,
        seed=config.eval.seed, mesh=mesh,
        rules=sharding.logical_rules(config),
        feature_cache=None if eval_dir is None else rices.FeatureCache(
            os.path.join(eval_dir, "features")),
        progress=progress and primary, hateful_answers=tuple(config.eval.hateful_answers))
    results, skipped, records = {}, {}, []
    for task in tasks:
        support = datasets.read(task.format, **task.support)
        query = datasets.read(task.format, **task.query)
        skipped[task.name] = {"support": support.skipped, "query": query.skipped}
        if support.skipped or query.skipped:
            logging.warning("task %s: skipped support records %s, query records %s",
                            task.name, support.skipped, query.skipped)
        results[task.name], task_records = evaluator.evaluate_task(
            task, templates[task.name], support, query)
        records.extend(task_records)
    if eval_dir is not None and primary:
        os.makedirs(eval_dir, exist_ok=True)
        with open(os.path.join(eval_dir, f"step_{step}_predictions.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        summary = {"step": int(step), "results": results, "skipped": skipped}
        path = os.path.join(eval_dir, f"step_{step}.json")
        with open(f"{path}.tmp", "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(f"{path}.tmp", path)
    return results


def restore_params(config, workdir: str, step: int | None = None):
    """(step, nested params, mesh): the parameters of DIR/checkpoints/<step> (the latest if
    None) placed on the configured mesh with the trainer's shardings."""
    from flamingo_jax.trainer import Trainer

    config = config.copy_and_resolve_references()
    with config.unlocked():  # the checkpoint holds every parameter: no warm start to read
        for key in ("lm_init", "vision_init"):
            if key in config.model:
                config.model[key] = None
    trainer = Trainer(config)
    checkpointer = Checkpointer(workdir, config.checkpoint.keep)
    try:
        available = checkpointer.all_steps()
        if step is None and available:
            step = available[-1]
        if step is None or step not in available:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {checkpointer.directory} (complete steps: "
                f"{available}); train first, or pass --step with one of those")
        abstract = jax.eval_shape(trainer.init_state)
        state, _ = checkpointer.restore(step, abstract, trainer.state_shardings)
    finally:
        checkpointer.close()
    return step, merge_params(state.trainable, state.frozen), trainer.mesh


def evaluate_checkpoint(config, workdir: str, step: int | None = None,
                        progress: bool = True) -> tuple[int, dict]:
    """Restores a checkpoint and evaluates it; returns (step, results)."""
    _check_model_kind(config)
    task_configs(config)  # fail on a bad task before restoring anything
    step, params, mesh = restore_params(config, workdir, step)
    logging.info("evaluating step %d of %s", step, workdir)
    results = evaluate(config, params, step, workdir=workdir, mesh=mesh, progress=progress)
    return step, results


def format_table(results: dict) -> str:
    """A console table: one line per task and metric, one column per shot count."""
    shots = sorted({int(s) for per_task in results.values() for s in per_task})
    lines = ["task / metric".ljust(40) + "".join(f"{s:>10}-shot" for s in shots)]
    for task, per_shots in results.items():
        metrics = [m for m in next(iter(per_shots.values())) if "/" not in m]
        for m in metrics:
            cells = "".join(f"{per_shots[str(s)][m]:>15.4f}" if str(s) in per_shots
                            else " " * 15 for s in shots)
            lines.append(f"{task} / {m}".ljust(40) + cells)
    return "\n".join(lines)


def run():
    """Console entry point (flags are defined here so that importing this module is free)."""
    config = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    workdir = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
    step = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: latest).")
    start_up = distributed.define_flags()
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        del argv
        distributed.initialize(**start_up())  # before anything touches devices
        done_step, results = evaluate_checkpoint(config.value, workdir.value, step.value)
        if jax.process_index() == 0:
            print(f"step {done_step}")
            print(format_table(results))

    app.run(main)


if __name__ == "__main__":
    run()
