"""Text-only LM pretraining with the Flamingo trainer (model.kind "lm"), and a Flamingo
whose frozen LM is read from that run's checkpoint (model.lm_init)."""

import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from data_pipelines import mixture_iterator, tasks, tokenizer, train_tokenizer
from experiments import demo, demo_lm
from flamingo_jax.checkpointing import Checkpointer
from flamingo_jax.models.flamingo import abstract_params
from flamingo_jax.train_state import merge_params
from flamingo_jax.trainer import Trainer

V, L, N, S, D_FEAT = 200, 16, 2, 4, 16  # vocabulary, text length, media, positions, width


def _shrink(config):
    config.model.lm.update(vocab_size=V, num_layers=1, dim=32, num_heads=2, num_kv_heads=1,
                           mlp_dim=64, max_length=L)
    config.model.xattn.update(num_heads=2, head_dim=16)
    config.model.resampler.update(num_layers=1, dim=32, num_heads=2, head_dim=16,
                                  num_latents=4)
    config.model.vision.variant = None  # precomputed features keep compilation small
    config.model.vision.feature_dim = D_FEAT
    config.input.update(num_media=N, text_length=L)
    config.train.task_weights = {"text": 1.0}
    config.mesh.update(data=1, fsdp=2, tensor=1)  # parameters sharded over 2 devices
    return config


def _trainer(config):
    """Plain SGD keeps the compiled step small; what trains is the trainer's business."""
    return Trainer(config, devices=jax.devices()[:2], tx=optax.sgd(1e-2))


def _lm_config():
    return _shrink(demo_lm.get_config())


def _flamingo_config(lm_workdir):
    config = _shrink(demo.get_config())
    config.model.lm_init = lm_workdir
    return config


def _text_batch(seed, image_id=None):
    """Host batch [K=1, B=4, L] over the whole vocabulary, `<image>`/`<EOC>` ids included
    (so their rows get gradients too); with `image_id`, tokens 3 and 9 are `<image>`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V + 2, size=(1, 4, L + 1)).astype(np.int32)
    if image_id is not None:
        tokens[tokens == image_id] = 5
        tokens[..., [3, 9]] = image_id
    weights = np.ones((1, 4, L), np.float32)
    weights[..., -2:] = 0.0
    batch = {"tokens": tokens[..., :-1], "targets": tokens[..., 1:], "loss_weights": weights}
    if image_id is not None:
        batch["vision_features"] = rng.normal(size=(1, 4, N, 1, S, D_FEAT)).astype(np.float32)
        batch["media_mask"] = np.ones((1, 4, N), np.int32)
    return batch


def _host(state_part):
    return {k: np.asarray(v) for k, v in state_part.items()}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """An LM-kind state before and after one step, saved as an LM-stage checkpoint."""
    trainer = _trainer(_lm_config())
    state = trainer.init_state()
    before = _host(state.trainable)
    state, _ = trainer.step(state, trainer.shard_batches({"text": _text_batch(0)}))
    workdir = str(tmp_path_factory.mktemp("lm_stage"))
    checkpointer = Checkpointer(workdir, keep=1)
    checkpointer.save(1, state, {})
    checkpointer.wait()
    checkpointer.close()
    return trainer, state, before, workdir


@pytest.fixture(scope="module")
def flamingo_run(lm_run):
    trainer = _trainer(_flamingo_config(lm_run[3]))
    return trainer, trainer.init_state()


def test_lm_kind_trains_every_lm_parameter(lm_run):
    trainer, state, before, _ = lm_run
    assert not state.frozen
    after = _host(state.trainable)
    # Exactly the LM's parameters: Flamingo's lm/ subtree minus the gated layers.
    flamingo_lm = {k[len("lm/"):] for k in _flat_shapes(demo.get_config())
                   if k.startswith("lm/") and not k.startswith("lm/xattn_")}
    assert set(after) == flamingo_lm
    unchanged = [k for k in after if np.array_equal(after[k], before[k])]
    assert not unchanged


def _flat_shapes(config):
    return traverse_util.flatten_dict(nn.unbox(abstract_params(_shrink(config))), sep="/")


def test_lm_checkpoint_fills_the_frozen_lm_bitwise(lm_run, flamingo_run):
    _, lm_state, _, _ = lm_run
    _, state = flamingo_run
    lm = _host(lm_state.trainable)
    params = {**_host(state.frozen), **_host(state.trainable)}
    extra = ("embed/extra_embedding", "extra_head/kernel")
    for path, value in lm.items():
        if path not in extra:
            np.testing.assert_array_equal(params[f"lm/{path}"], value, err_msg=path)
    # `<image>`/`<EOC>` rows start at the mean pretrained row / head column (trainable).
    mean_row = lm["embed/embedding"].mean(axis=0, dtype=np.float32)
    mean_col = lm["head/kernel"].mean(axis=1, dtype=np.float32)
    np.testing.assert_allclose(params["lm/embed/extra_embedding"], np.stack([mean_row] * 2),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(params["lm/extra_head/kernel"], np.stack([mean_col] * 2, 1),
                               rtol=1e-6, atol=1e-7)
    assert "lm/embed/extra_embedding" in state.trainable
    assert "lm/layers_0/attn/q/kernel" in state.frozen


def test_flamingo_with_closed_gates_equals_the_pretrained_lm(lm_run, flamingo_run):
    lm_trainer, lm_state, _, _ = lm_run
    trainer, state = flamingo_run
    config = trainer.config
    batch = {k: v[0] for k, v in _text_batch(1, config.model.image_token_id).items()}
    # Eager (op by op): two forward passes of a tiny model cost less than compiling them.
    logits = trainer.model.apply({"params": state.params()}, batch["tokens"],
                                 vision_features=batch["vision_features"],
                                 media_mask=batch["media_mask"])
    # The pretrained LM with the appended rows Flamingo starts from.
    lm_params = _host(lm_state.trainable)
    for path in ("embed/extra_embedding", "extra_head/kernel"):
        lm_params[path] = np.asarray(state.trainable[f"lm/{path}"])
    lm_logits = lm_trainer.model.apply({"params": merge_params(lm_params, {})},
                                       batch["tokens"])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(lm_logits), rtol=0, atol=1e-5)
    # An appended token's logit starts as the mean of the pretrained logits.
    logits = np.asarray(logits)
    np.testing.assert_allclose(logits[..., V], logits[..., :V].mean(-1), atol=1e-5)


def test_flamingo_step_leaves_the_frozen_lm_bitwise_unchanged(flamingo_run):
    trainer, state = flamingo_run
    state = jax.tree_util.tree_map(lambda x: x.copy(), state)  # the step donates its input
    frozen, trainable = _host(state.frozen), _host(state.trainable)
    batch = _text_batch(2, trainer.config.model.image_token_id)
    state, metrics = trainer.step(state, trainer.shard_batches({"text": batch}))
    assert int(metrics["skipped_steps"]) == 0
    assert all(k.startswith("lm/") for k in frozen if not k.startswith("vision/"))
    for path, value in _host(state.frozen).items():
        np.testing.assert_array_equal(value, frozen[path], err_msg=path)
    assert not np.array_equal(np.asarray(state.trainable["lm/xattn_0/alpha_xattn"]),
                              trainable["lm/xattn_0/alpha_xattn"])


def test_lm_init_that_does_not_fit_is_an_error_naming_the_parameters(lm_run):
    config = _flamingo_config(lm_run[3])
    config.model.lm.dim = 48
    with pytest.raises(ValueError, match=r"(?s)lm_init.*mis-shaped.*embed/embedding"):
        Trainer(config, devices=jax.devices()[:2])
    config = _flamingo_config(os.path.join(lm_run[3], "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.model.lm_init"):
        Trainer(config, devices=jax.devices()[:2])
    config = _flamingo_config(None)
    config.model.kind = "vlm"
    with pytest.raises(ValueError, match=r"config.model.kind='vlm'; allowed: .*'lm'"):
        Trainer(config, devices=jax.devices()[:2])


# ---- The text task (data_pipelines/text_documents.py) ---------------------------------------


def test_text_task_windows_documents_and_counts_bad_lines(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red circle at the top left.\nQuestion: What colour is the square? "
                      "Answer: blue\nthe blue square on the right.\n" * 20)
    vocab = tokenizer.load_vocabulary(train_tokenizer.train_sentencepiece(
        [str(corpus)], str(tmp_path / "spm"), vocab_size=60, model_type="bpe"))
    docs = ["a red circle at the top left.", "", "the blue square on the right."]
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    (text_dir / "a.txt").write_text("\n".join(docs) + "\n")
    (text_dir / "b.txt").write_bytes(b"\xff\xfe not utf-8\n")
    configs = tasks.configs_from_dict(
        {"text": dict(kind="text", source="text", path=str(text_dir), text_length=6,
                      train=False, image_size=8)})
    mixture = tasks.register_mixture("test_text", configs, vocab)
    iterators = mixture_iterator.make_task_iterators(mixture, 2, shuffle=False, num_epochs=1)
    try:
        batch = next(iterators)["text"]
        counts = iterators.bad_input_counts()["text"]
    finally:
        iterators.close()
    bodies = [vocab.encode(d) + [vocab.eos_id] for d in docs if d]
    for row, body in enumerate(bodies):
        window = body[:6]
        np.testing.assert_array_equal(batch["targets"][row, :len(window)], window)
        np.testing.assert_array_equal(batch["tokens"][row, :len(window)],
                                      [vocab.bos_id] + window[:-1])
        assert batch["loss_weights"][row].sum() == len(window)
    assert batch["media"].shape == (2, 0, 1, 8, 8, 3)
    assert counts["non_utf8_text"] == 1 and sum(counts.values()) == 1
