"""Hugging Face Llama-family import (SPEC §3.4, §3.7): logits parity with transformers.

Tiny random checkpoints are built locally (no downloads): every weight, RMSNorm scale and
bias is re-drawn so activations are O(1) and a wrong layout could not pass.
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from flamingo_jax import base_config, sharding
from flamingo_jax.importers.hf_llama import lm_config_from_hf, load_hf_llama
from flamingo_jax.models.language_model import LanguageModel

transformers.utils.logging.disable_progress_bar()

B, L, E = 2, 16, 2
COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5, max_position_embeddings=128,
)
CASES = {
    # name: (HF model class, config kwargs, save dtype, max_shard_size)
    "llama_gqa_sharded_files": (
        transformers.LlamaForCausalLM, dict(vocab_size=101), torch.float32, "30KB"
    ),
    "qwen2_qkv_bias": (transformers.Qwen2ForCausalLM, dict(vocab_size=128), torch.float32, None),
    "llama_tied": (
        transformers.LlamaForCausalLM, dict(vocab_size=101, tie_word_embeddings=True),
        torch.float32, None,
    ),
    "mistral_bf16_window": (
        transformers.MistralForCausalLM, dict(vocab_size=101, sliding_window=32),
        torch.bfloat16, None,
    ),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm scales ~ U(0.5, 1.5),
    biases ~ N(0, 0.5²): O(1) activations, every parameter away from its HF init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def _save(case: str, directory) -> tuple[torch.nn.Module, dict]:
    """A random HF model saved as safetensors; returns it (float32) and its config.json."""
    model_cls, kwargs, save_dtype, shard = CASES[case]
    config_cls = model_cls.config_class
    model = model_cls(config_cls(**COMMON, **kwargs)).eval()
    _randomize(model, seed=len(case))
    with torch.no_grad():  # the float32 reference holds exactly the saved values
        for p in model.parameters():
            p.copy_(p.to(save_dtype).float())
    # Cast a copy: `.to(bfloat16)` would also round the reference's RoPE inv_freq buffer.
    copy.deepcopy(model).to(save_dtype).save_pretrained(
        directory, safe_serialization=True, **({"max_shard_size": shard} if shard else {})
    )
    with open(os.path.join(directory, "config.json")) as f:
        config_json = json.load(f)
    return model, config_json


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


def _lm(config_json: dict) -> LanguageModel:
    return LanguageModel(**lm_config_from_hf(config_json), num_extra_tokens=E)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf_model, config_json = _save(case, tmp_path)
    lm = _lm(config_json)
    params = load_hf_llama(tmp_path, lm)

    tokens = np.random.default_rng(0).integers(0, lm.vocab_size, (B, L))
    ours = np.asarray(jax.jit(lm.apply)({"params": params}, jnp.asarray(tokens)))
    ref = _hf_logits(hf_model, tokens)
    v = lm.vocab_size
    err = np.abs(ours[..., :v] - ref).max()
    print(f"{case}: max |ours - transformers| = {err:.2e}, logits std {ref.std():.2f}")
    assert ours.shape == (B, L, v + E)
    assert ref.std() > 0.5  # not vacuous: O(1) logits
    assert err < 1e-4
    # Mean init of the appended rows: each new token's logit is the mean pretrained logit.
    np.testing.assert_allclose(
        ours[..., v:], np.repeat(ours[..., :v].mean(-1, keepdims=True), E, -1), atol=1e-5
    )


def test_config_mapping_and_sharded_files(tmp_path):
    _, config_json = _save("llama_gqa_sharded_files", tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert lm_config_from_hf(config_json) == dict(
        vocab_size=101, num_layers=2, dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
        mlp_dim=128, rope_theta=5000.0, norm_eps=1e-5, qkv_bias=False, tie_embeddings=False,
        max_length=128,
    )
    mistral = dict(config_json, model_type="mistral", sliding_window=32)
    assert lm_config_from_hf(mistral)["max_length"] == 32  # exact up to the window
    qwen = dict(config_json, model_type="qwen2", sliding_window=32, use_sliding_window=False)
    assert lm_config_from_hf(qwen)["max_length"] == 128 and lm_config_from_hf(qwen)["qkv_bias"]


def test_streams_into_target_shardings(tmp_path):
    """Each tensor lands with its sharding; values equal the unsharded import; extra rows
    from zeros init give zero logits."""
    _, config_json = _save("qwen2_qkv_bias", tmp_path)
    lm = _lm(config_json)
    config = base_config.get_config()
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    boxed = jax.eval_shape(lm.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    specs = sharding.param_partition_specs(boxed, sharding.logical_rules(config))
    shardings = jax.tree.map(
        lambda s: jax.sharding.NamedSharding(mesh, s), specs,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    placed = load_hf_llama(tmp_path, lm, shardings=shardings, extra_init="zeros")
    host = load_hf_llama(tmp_path, lm, extra_init="zeros")
    q = placed["layers_0"]["attn"]["q"]["kernel"]
    assert q.sharding == shardings["layers_0"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), placed, host)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, lm.vocab_size, (B, L)))
    logits = np.asarray(jax.jit(lm.apply)({"params": placed}, tokens))
    assert np.all(logits[..., lm.vocab_size:] == 0)


def test_bfloat16_params(tmp_path):
    """A bf16 checkpoint imported as bf16 keeps the saved values bit for bit."""
    _, config_json = _save("mistral_bf16_window", tmp_path)
    lm = _lm(config_json)
    params = load_hf_llama(tmp_path, lm, dtype=jnp.bfloat16, extra_dtype=jnp.float32)
    saved = load_file(tmp_path / "model.safetensors")
    down = params["layers_1"]["mlp"]["down"]["kernel"]
    assert down.dtype == jnp.bfloat16
    assert params["embed"]["extra_embedding"].dtype == np.float32
    np.testing.assert_array_equal(
        down.astype(np.float32), saved["model.layers.1.mlp.down_proj.weight"].float().numpy().T
    )


def test_one_error_names_every_bad_tensor(tmp_path):
    _, config_json = _save("llama_gqa_sharded_files", tmp_path / "ok")
    tensors = {}
    for f in (tmp_path / "ok").glob("model-*.safetensors"):
        tensors.update(load_file(f))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # ignored buffer
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(ValueError) as info:
        load_hf_llama(bad, _lm(config_json))
    message = str(info.value)
    assert "1 missing" in message and "model.layers.1.mlp.up_proj.weight [128, 64]" in message
    assert "1 unexpected" in message and "model.layers.0.self_attn.o_proj.bias [64]" in message
    assert "1 mis-shaped" in message
    assert "model.layers.0.self_attn.k_proj.weight: got [16, 64], expected [32, 64]" in message
    assert "inv_freq" not in message


@pytest.mark.parametrize("key, value", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
    ("hidden_act", "gelu"),
    ("model_type", "gpt2"),
    ("attention_bias", True),
    ("mlp_bias", True),
])
def test_unsupported_config_names_the_key(key, value):
    config_json = dict(
        model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
    )
    config_json[key] = value
    with pytest.raises(ValueError, match=key):
        lm_config_from_hf(config_json)


@pytest.mark.parametrize("case, override, message", [
    ("llama_tied", dict(rope_theta=1e4), "rope_theta: model has 10000.0, checkpoint needs 5000.0"),
    ("llama_tied", dict(tie_embeddings=False), "tie_embeddings: model has False"),
    ("mistral_bf16_window", dict(max_length=64), "max_length: model has 64, .* at most 32"),
])
def test_model_config_mismatch_names_the_key(case, override, message, tmp_path):
    _, config_json = _save(case, tmp_path)
    lm = LanguageModel(**dict(lm_config_from_hf(config_json), **override))
    with pytest.raises(ValueError, match=message):
        load_hf_llama(tmp_path, lm)
