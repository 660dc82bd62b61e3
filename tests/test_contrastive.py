"""Contrastive pretraining of the NFNet (SPEC §3.1, issue 8): the loss against open_clip,
the global batch across devices, the sharded step, AGC's exemption of the projection,
retrieval metrics, and the image tower's checkpoint read back as Flamingo's vision tree."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import open_clip.loss
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments import demo, demo_contrastive, nfnet_f6_contrastive
from flamingo_jax.checkpointing import Checkpointer
from flamingo_jax.contrastive_loss import contrastive_logits, contrastive_loss
from flamingo_jax.evaluation import retrieval
from flamingo_jax.models import flamingo
from flamingo_jax.models.contrastive import load_vision_params
from flamingo_jax.optimizer import clip_groups, gradient_clipping
from flamingo_jax.trainer import Trainer

B, E, L, S = 16, 12, 8, 16  # pairs per task, joint dim, text length, image size


def _unit(rng, shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---- The loss ------------------------------------------------------------------------


def _open_clip_reference(image, text, scale, smoothing):
    """open_clip's ClipLoss logits, scored with torch's label-smoothed cross-entropy."""
    clip = open_clip.loss.ClipLoss()
    img, txt = torch.from_numpy(image), torch.from_numpy(text)
    per_image, per_text = clip.get_logits(img, txt, torch.tensor(scale))
    labels = torch.arange(len(image))
    return float((F.cross_entropy(per_image, labels, label_smoothing=smoothing)
                  + F.cross_entropy(per_text, labels, label_smoothing=smoothing)) / 2)


def test_loss_equals_open_clip():
    rng = np.random.default_rng(0)
    image, text = _unit(rng, (B, E)), _unit(rng, (B, E))
    text[:4] = _unit(rng, (4, E)) * 0.2 + image[:4]  # some positives score high
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    scale = 14.285714
    ours = lambda s: float(contrastive_loss(image, text, jnp.float32(scale), s))  # noqa: E731
    clip = open_clip.loss.ClipLoss()(torch.from_numpy(image), torch.from_numpy(text),
                                     torch.tensor(scale))
    np.testing.assert_allclose(ours(0.0), float(clip), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours(0.1), _open_clip_reference(image, text, scale, 0.1),
                               rtol=0, atol=1e-5)
    assert abs(ours(0.1) - ours(0.0)) > 1e-2  # smoothing changes the value measurably


def test_global_batch_loss_on_8_devices_equals_single_device():
    rng = np.random.default_rng(1)
    image, text = _unit(rng, (B, E)), _unit(rng, (B, E))
    scale = jnp.float32(10.0)
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    sharded = NamedSharding(mesh, P("data", None))
    image_s, text_s = jax.device_put(image, sharded), jax.device_put(text, sharded)
    assert len(image_s.addressable_shards) == 8 and image_s.addressable_shards[0].data.shape[0] == 2

    logits = jax.jit(contrastive_logits)(image_s, text_s, scale)
    assert logits.shape == (B, B)  # every device's pairs are negatives of every other's
    loss_fn = jax.jit(functools.partial(contrastive_loss, label_smoothing=0.1))
    single = jax.device_put((image, text), jax.devices()[0])
    np.testing.assert_allclose(float(loss_fn(image_s, text_s, scale)),
                               float(loss_fn(*single, scale)), rtol=1e-6)
    # Not the mean of per-device losses over 2 pairs each.
    per_device = np.mean([float(loss_fn(image[i:i + 2], text[i:i + 2], scale))
                          for i in range(0, B, 2)])
    assert abs(per_device - float(loss_fn(*single, scale))) > 0.5


# ---- The sharded update step --------------------------------------------------------


def _config(mesh):
    config = demo_contrastive.get_config("/unused")
    # A one-block NFNet and a one-layer text tower keep compilation short.
    config.model.vision.update(widths=(8,), depths=(1,), stem_widths=(8,), group_width=4)
    config.model.lm.vocab_size = 50
    config.model.text.update(num_layers=1, dim=16, num_heads=2, mlp_dim=32)
    config.model.contrastive.embed_dim = E
    config.input.update(image_size=S, text_length=L)
    config.train.task_weights = {"pairs": 0.5}
    config.optimizer.update(lr=1e-2, warmup_steps=0, grad_clip_norm=0.05)
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    return config


def _pair_batches(seed):
    """One pair task's batch [K=1, B, ...] (the fields the contrastive kind reads)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 52, size=(1, B, L)).astype(np.int32)
    tokens[..., -2:] *= rng.integers(0, 2, size=(1, B, 1))  # some padding
    return {"pairs": {"tokens": tokens,
                      "media": rng.normal(size=(1, B, 1, 1, S, S, 3)).astype(np.float32)}}


@functools.lru_cache(maxsize=None)
def _run(mesh):
    trainer = Trainer(_config(mesh), devices=jax.devices()[: int(np.prod(mesh))])
    state = trainer.init_state()
    state, metrics = trainer.step(state, trainer.shard_batches(_pair_batches(0)))
    return trainer, state, jax.tree_util.tree_map(np.asarray, metrics)


def test_sharded_step_equals_single_device_step():
    _, ref_state, ref_metrics = _run((1, 1, 1))
    trainer, state, metrics = _run((2, 2, 2))
    assert state.trainable["text/token_embedding"].sharding.spec == P("tensor", "fsdp")
    for key in ("loss", "loss/pairs", "grad_norm"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(metrics["loss"], 0.5 * metrics["loss/pairs"], rtol=1e-6)
    assert metrics["tokens/pairs"] == B and metrics["skipped_steps"] == 0
    assert set(state.trainable) == set(ref_state.trainable) and not state.frozen
    # Adam's first step moves a parameter by ≈ lr·sign(g) (lr 1e-2); summation order
    # differs between meshes, so compare to 1e-3 of that step.
    init = trainer.init_state().trainable
    moved = np.abs(np.asarray(state.trainable["text_projection/kernel"])
                   - np.asarray(init["text_projection/kernel"]))
    assert moved.max() > 5e-3
    for path, value in ref_state.trainable.items():
        np.testing.assert_allclose(np.asarray(state.trainable[path]), np.asarray(value),
                                   rtol=1e-5, atol=1e-5, err_msg=path)


def test_image_tower_checkpoint_loads_as_flamingo_vision(tmp_path):
    _, state, _ = _run((2, 2, 2))  # written sharded, read whole on the host
    checkpointer = Checkpointer(str(tmp_path), keep=1)
    checkpointer.save(2, state, {})
    checkpointer.wait()
    checkpointer.close()
    loaded = load_vision_params(str(tmp_path))
    vision = {k: np.asarray(v) for k, v in state.trainable.items() if k.startswith("vision/")}
    assert set(loaded) == set(vision)
    for path, value in vision.items():
        np.testing.assert_array_equal(loaded[path], value, err_msg=path)
    # A Flamingo with the same model.vision has exactly these vision/ parameters.
    flamingo_config = demo.get_config()
    flamingo_config.model.vision = _config((1, 1, 1)).model.vision
    flamingo_config.input.image_size = S
    boxed = flamingo.abstract_params(flamingo_config)
    flat = traverse_util.flatten_dict(nn.unbox(boxed), sep="/")
    target = {k: v.shape for k, v in flat.items() if k.startswith("vision/")}
    assert target == {k: v.shape for k, v in loaded.items()}


# ---- Adaptive gradient clipping -------------------------------------------------------


def test_agc_clips_the_nfnet_but_not_its_projection():
    opt = nfnet_f6_contrastive.get_config().optimizer
    rng = np.random.default_rng(2)
    params = {
        "vision/stage0_block0/conv1/kernel": rng.normal(size=(1, 1, 4, 3)).astype(np.float32),
        "image_head/final_conv/kernel": rng.normal(size=(1, 1, 3, 6)).astype(np.float32),
        "image_head/projection/kernel": rng.normal(size=(6, 5)).astype(np.float32),
        "text/layers_0/mlp/wi/kernel": rng.normal(size=(4, 8)).astype(np.float32),
        "text_projection/kernel": rng.normal(size=(4, 5)).astype(np.float32),
        "logit_scale": np.float32(2.0),
    }
    grads = {k: (100.0 * np.ones_like(v)) for k, v in params.items()}  # far above λ·‖w‖
    tx = gradient_clipping(opt, sorted(params))
    out, _ = tx.update(grads, tx.init(params), params)
    out = {k: np.asarray(v) for k, v in out.items()}
    # Unit-wise AGC: each output unit's gradient norm becomes 0.01·max(‖w_unit‖, 1e-3).
    for path, axes in (("vision/stage0_block0/conv1/kernel", (0, 1, 2)),
                       ("image_head/final_conv/kernel", (0, 1, 2))):
        w_norm = np.sqrt(np.sum(params[path] ** 2, axis=axes))
        g_norm = np.sqrt(np.sum(out[path] ** 2, axis=axes))
        np.testing.assert_allclose(g_norm, 0.01 * np.maximum(w_norm, 1e-3), rtol=1e-5)
    # Exempt: the projection (the NFNet's final classifier) and the temperature.
    np.testing.assert_array_equal(out["image_head/projection/kernel"], grads[
        "image_head/projection/kernel"])
    np.testing.assert_array_equal(out["logit_scale"], grads["logit_scale"])
    # Global norm over the text tower alone.
    text_norm = np.sqrt(sum(np.sum(out[k] ** 2) for k in out if k.startswith("text")))
    np.testing.assert_allclose(text_norm, opt.grad_clip_norm, rtol=1e-5)
    np.testing.assert_allclose(out["text_projection/kernel"] / grads["text_projection/kernel"],
                               out["text/layers_0/mlp/wi/kernel"][0, 0] / 100.0, rtol=1e-6)


def test_every_model_parameter_is_in_the_right_clip_group():
    trainer, _, _ = _run((1, 1, 1))
    paths = list(traverse_util.flatten_dict(nn.unbox(trainer.boxed), sep="/"))
    groups = clip_groups(trainer.config.optimizer, paths)
    for path, group in groups.items():
        expected = ("agc" if path.startswith(("vision/", "image_head/final_conv/"))
                    else "global_norm" if path.startswith("text") else "none")
        assert group == expected, path
    assert {p for p, g in groups.items() if g == "none"} == {
        "image_head/projection/kernel", "image_head/projection/bias", "logit_scale"}


def test_bad_clip_regex_fails_naming_the_key():
    opt = nfnet_f6_contrastive.get_config().optimizer
    opt.agc_params = (r"^nfnet/",)
    with pytest.raises(ValueError, match="optimizer.agc_params"):
        gradient_clipping(opt, ["vision/stem_conv1/kernel", "text/token_embedding"])


# ---- Evaluation ------------------------------------------------------------------------


def test_recall_at_k_on_constructed_embeddings():
    # 4 images, 5 texts; texts 0 and 1 describe image 0, text i+1 describes image i.
    image = np.eye(4, dtype=np.float32)
    text = np.array([[0.9, 0.1, 0.0, 0.0],    # → image 0 (correct)
                     [0.0, 0.0, 0.8, 0.1],    # → image 2 (its image 0 is ranked 3rd)
                     [0.7, 0.6, 0.0, 0.0],    # → image 0, its image 1 2nd
                     [0.0, 0.0, 0.5, 0.4],    # → image 2 (correct)
                     [0.0, 0.0, 0.6, 0.5]],   # → image 2, its image 3 2nd
                    np.float32)
    m = retrieval.retrieval_metrics(image, text, np.array([0, 0, 1, 2, 3]), ks=(1, 2, 3))
    # image→text: image 0 best text 0 (hit); image 1 best text 2 (hit); image 2 best text 1
    # (miss; its text 3 ranks 3rd: 0.8, 0.6, 0.5); image 3 best text 4 (hit).
    assert m["image_to_text/recall@1"] == 3 / 4
    assert m["image_to_text/recall@2"] == 3 / 4
    assert m["image_to_text/recall@3"] == 1.0
    # text→image: text 0 hit@1; text 1's image 0 ranks 3rd (images 2, 3, then 0 and 1 tie
    # at 0.0, the tie broken towards the lower index); text 2 rank 2; text 3 hit@1; text 4
    # rank 2.
    assert m["text_to_image/recall@1"] == 2 / 5
    assert m["text_to_image/recall@2"] == 4 / 5
    assert m["text_to_image/recall@3"] == 1.0


def test_zero_shot_accuracy_from_prompt_ensembles():
    # 3 classes × 2 prompts; class embedding = normalised mean of its prompts.
    prompts = np.array([[[1, 0, 0], [0.6, 0.8, 0]],
                        [[0, 1, 0], [0, 0.6, 0.8]],
                        [[0, 0, 1], [0.8, 0, 0.6]]], np.float32)
    classes = retrieval.class_embeddings(prompts)
    np.testing.assert_allclose(classes[0], np.array([1.6, 0.8, 0]) / np.hypot(1.6, 0.8),
                               rtol=1e-6)
    images = np.array([[1, 0.1, 0], [0, 0, 1], [0, 1, 0.05], [0.7, 0, 0.7]], np.float32)
    # Image 3 scores 0.94 with class 2 and 0.63 with its class 0: wrong at top-1, right at
    # top-2; the other three are right at top-1.
    acc = retrieval.zero_shot_accuracy(images, classes, np.array([0, 2, 1, 0]), ks=(1, 2))
    assert acc == {"top1": 0.75, "top2": 1.0}
