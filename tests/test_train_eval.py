"""flamingo-train's periodic few-shot evaluation (eval.every_steps): what the loop writes
equals flamingo-eval on the checkpoint of the same step."""

import json
import os

import ml_collections
import pytest

from data_pipelines import synthetic, synthetic_eval, tokenizer, train_tokenizer
from experiments import demo
from flamingo_jax import eval as eval_cli
from flamingo_jax.train import check_periodic_eval, eval_scalars, train


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train_eval"))
    paths = synthetic.write_all(root, seed=0, image_size=32, num_docs=2, num_pairs=32,
                                num_clips=1, num_frames=1, num_eval=1, num_shards=1)
    fewshot = synthetic_eval.write_all(os.path.join(root, "fewshot"), seed=0, image_size=32,
                                       num_support=4, num_query=4, num_per_class=(1, 1),
                                       caption_max_shapes=1)
    spm = train_tokenizer.train_sentencepiece([paths["corpus"]], os.path.join(root, "spm"),
                                              vocab_size=300)
    config = demo.get_config()
    config.model.lm.vocab_size = tokenizer.load_vocabulary(spm).base_vocab_size
    config.model.lm.update(num_layers=1, dim=64, num_heads=2, num_kv_heads=1, mlp_dim=128,
                           max_length=128)  # 2-shot prompts and the answer
    config.model.resampler.update(num_layers=1, dim=64, num_heads=2, head_dim=32,
                                  num_latents=4)
    config.model.xattn.update(num_heads=2, head_dim=32)
    config.input.update(image_size=32, num_media=1, text_length=16)
    config.data.tokenizer = spm
    config.data.tasks = {"pairs": dict(kind="pairs", source="webdataset",
                                       path=paths["webdataset"], batch_size=8, text_length=16)}
    config.train.task_weights = {"pairs": 1.0}
    config.train.update(num_steps=3, log_every=1)
    config.optimizer.update(lr=1e-2, warmup_steps=1)
    config.checkpoint.update(save_every=1, keep=3)
    tasks = synthetic_eval.task_configs(fewshot, shots=(2,), trials=1, num_queries=4,
                                        max_new_tokens=3, beam_size=1)
    config.eval.tasks = {"synthetic_colour_vqa": tasks["synthetic_colour_vqa"]}
    config.eval.update(batch_size=8, length_bucket=32, every_steps=2)
    return config


def test_loop_evaluations_equal_flamingo_eval_of_the_same_checkpoint(config, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    train(config, workdir)
    # Every 2 steps and at the last step.
    assert sorted(n for n in os.listdir(os.path.join(workdir, "eval"))
                  if n.startswith("step_")) == [
        "step_2.json", "step_2_predictions.jsonl", "step_3.json", "step_3_predictions.jsonl"]
    console = capsys.readouterr().out
    assert "step 2: eval/synthetic_colour_vqa/2-shot/vqa_accuracy " in console
    # The last step's evaluation equals flamingo-eval's on the saved step-3 checkpoint.
    eval_dir = os.path.join(workdir, "eval")
    with open(os.path.join(eval_dir, "step_3.json")) as f:
        written = json.load(f)
    with open(os.path.join(eval_dir, "step_3_predictions.jsonl")) as f:
        predictions = f.read()
    step, results = eval_cli.evaluate_checkpoint(config, workdir, progress=False)
    assert step == written["step"] == 3
    assert written["results"] == json.loads(json.dumps(results))
    with open(os.path.join(eval_dir, "step_3_predictions.jsonl")) as f:
        assert f.read() == predictions  # the same generations, token for token
    (name, value), = eval_scalars(results).items()
    assert name == "eval/synthetic_colour_vqa/2-shot/vqa_accuracy"
    assert f"step 3: {name} {value:.4f}" in console


@pytest.mark.parametrize("change, message", [
    (dict(every_steps=-1), r"eval.every_steps=-1: use 0 \(never\)"),
    (dict(every_steps=5, tasks=None), r"eval.every_steps=5 but config.eval.tasks is empty"),
])
def test_bad_eval_schedule_fails_before_training(config, change, message):
    bad = config.copy_and_resolve_references()
    bad.eval.every_steps = change["every_steps"]
    if "tasks" in change:
        bad.eval.tasks = ml_collections.ConfigDict()
    with pytest.raises(ValueError, match=message):
        check_periodic_eval(bad)


def test_eval_schedule_needs_a_flamingo_model(config):
    bad = config.copy_and_resolve_references()
    bad.model.kind = "lm"
    with pytest.raises(ValueError, match=r"evaluates a Flamingo model; model.kind is 'lm'"):
        check_periodic_eval(bad)
