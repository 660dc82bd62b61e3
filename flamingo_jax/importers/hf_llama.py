"""Import Hugging Face Llama / Mistral / Qwen2 checkpoints into our LanguageModel (SPEC §3.7).

    cfg = json.load(open(f"{ckpt}/config.json"))
    lm = LanguageModel(**lm_config_from_hf(cfg), num_extra_tokens=2)
    params = load_hf_llama(ckpt, lm, dtype=jnp.bfloat16, shardings=lm_shardings)

Reads `config.json` and `model.safetensors` or a sharded `model.safetensors.index.json`
(safetensors only: nothing is unpickled). Every shape is checked against the target tree of
`jax.eval_shape(lm.init, ...)` from the file headers before any tensor is read, and one
ValueError lists every missing, unexpected and mis-shaped tensor. Tensors are then read one
at a time and each is placed with `jax.device_put(array, sharding)` as soon as it is
converted, so a 70B import holds one tensor in host memory, not the model.

Name table (HF → ours, per layer i; H heads, G kv heads, Dh head size):
    model.embed_tokens.weight [V, D]                  → embed/embedding [V, D]
    model.layers.i.input_layernorm.weight [D]         → layers_i/attn_norm/scale
    model.layers.i.self_attn.q_proj.weight [H·Dh, D]  → layers_i/attn/q/kernel [D, H, Dh]
    model.layers.i.self_attn.q_proj.bias [H·Dh]       → layers_i/attn/q/bias [H, Dh] (qkv_bias)
    model.layers.i.self_attn.{k,v}_proj.* [G·Dh, D]   → layers_i/attn/{k,v}/* [D, G, Dh]
    model.layers.i.self_attn.o_proj.weight [D, H·Dh]  → layers_i/attn/o/kernel [H, Dh, D]
    model.layers.i.post_attention_layernorm.weight    → layers_i/mlp_norm/scale
    model.layers.i.mlp.{gate,up}_proj.weight [F, D]   → layers_i/mlp/{gate,up}/kernel [D, F]
    model.layers.i.mlp.down_proj.weight [D, F]        → layers_i/mlp/down/kernel [F, D]
    model.norm.weight [D]                             → final_norm/scale
    lm_head.weight [V, D]                             → head/kernel [D, V] (untied only)
Ignored: `*.rotary_emb.inv_freq` buffers of old checkpoints, and `lm_head.weight` of a
tied checkpoint (Hugging Face ignores it too).

Appended vocabulary (`<image>`, `<EOC>`; SPEC §3.5) is not in the checkpoint. With
`extra_init="mean"` (default) every appended input row is the mean of the pretrained
embedding rows and every appended output column is the mean of the pretrained head columns
(with tied embeddings the mean embedding row serves both), so a new token's logit starts as
the mean of the pretrained logits: neither dominant nor negligible. `extra_init="zeros"`
gives zero rows and zero logits. Both are deterministic. The gated cross-attention layers
(`xattn_{i}`) are not produced: merge the result with their initialised parameters.
"""

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from flamingo_jax.models.language_model import LanguageModel

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
EXTRA_INITS = ("mean", "zeros")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---- config.json → config.model.lm --------------------------------------------------------


def _rope_theta(cfg: Mapping) -> float:
    """RoPE base; raises when a scaling rule (Llama 3, YaRN, linear, ...) would change it.

    transformers < 5 writes `rope_theta` and `rope_scaling`; transformers 5 writes
    `rope_parameters = {"rope_type": ..., "rope_theta": ...}`.
    """
    scaling = cfg.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        raise ValueError(
            f"config.json sets rope_scaling={cfg['rope_scaling']!r}; only unscaled RoPE is "
            "supported (our RoPE would silently differ)"
        )
    params = cfg.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"config.json sets rope_parameters.rope_type={rope_type!r}; only 'default' "
            "(unscaled) RoPE is supported"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"config.json sets rope_parameters.partial_rotary_factor="
            f"{params['partial_rotary_factor']}; only full rotary embeddings are supported"
        )
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def _sliding_window(cfg: Mapping) -> int | None:
    """The attention window when one is active, else None."""
    window = cfg.get("sliding_window")
    if window is None:
        return None
    if cfg["model_type"] == "qwen2":  # the window applies only to layers marked as sliding
        sliding = cfg.get("use_sliding_window", False) or "sliding_attention" in (
            cfg.get("layer_types") or ()
        )
        return int(window) if sliding else None
    return int(window)  # mistral: any window is active


def lm_config_from_hf(config_json: Mapping[str, Any]) -> dict:
    """Hugging Face config.json (llama, mistral, qwen2) → our `config.model.lm` keys.

    Raises ValueError naming the key for anything our decoder would compute differently:
    an unknown model_type, hidden_act other than silu, RoPE scaling, an output-projection
    or MLP bias. An active sliding window W caps max_length at W: up to W tokens full
    causal attention is exact (HF masks key j for query i only when i − j ≥ W).
    """
    cfg = dict(config_json)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json model_type={model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
    if model_type == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v biases and no output-projection bias
    else:
        if cfg.get("attention_bias", False):
            raise ValueError(
                "config.json sets attention_bias=true: Llama then has biases on q/k/v and "
                "on o_proj, and our decoder has no output-projection bias"
            )
        qkv_bias = False
    if cfg.get("mlp_bias", False):
        raise ValueError("config.json sets mlp_bias=true; our SwiGLU MLP has no biases")

    num_heads = int(cfg["num_attention_heads"])
    dim = int(cfg["hidden_size"])
    max_length = int(cfg["max_position_embeddings"])
    window = _sliding_window(cfg)
    if window is not None:
        max_length = min(max_length, window)
    return dict(
        vocab_size=int(cfg["vocab_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        dim=dim,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or dim // num_heads),
        mlp_dim=int(cfg["intermediate_size"]),
        rope_theta=_rope_theta(cfg),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_length=max_length,
    )


def _check_lm_matches(lm: LanguageModel, hf: dict) -> None:
    """Every numerics-relevant LM attribute must equal the checkpoint's."""
    ours = dict(
        vocab_size=lm.vocab_size, num_layers=lm.num_layers, dim=lm.dim, num_heads=lm.num_heads,
        num_kv_heads=lm.num_kv_heads, head_dim=lm.head_dim or lm.dim // lm.num_heads,
        mlp_dim=lm.mlp_dim, rope_theta=lm.rope_theta, norm_eps=lm.norm_eps,
        qkv_bias=lm.qkv_bias, tie_embeddings=lm.tie_embeddings,
    )
    wrong = [
        f"{k}: model has {v!r}, checkpoint needs {hf[k]!r}"
        for k, v in ours.items()
        if not (v == hf[k] or (isinstance(v, float) and math.isclose(v, hf[k], rel_tol=1e-9)))
    ]
    if lm.max_length > hf["max_length"]:
        wrong.append(
            f"max_length: model has {lm.max_length}, checkpoint supports at most "
            f"{hf['max_length']} (max_position_embeddings, or an active sliding_window)"
        )
    if wrong:
        raise ValueError(
            "LanguageModel does not match the checkpoint's config.json; build it from "
            "lm_config_from_hf(config):\n  " + "\n  ".join(wrong)
        )


# ---- name table ---------------------------------------------------------------------------
# Each transform: (HF array, our shape) → our array, and our shape → the HF shape.

_TRANSFORMS = {
    "same": (lambda a, s: a, lambda s: tuple(s)),
    # nn.Linear weight [out, in] → kernel [in, out]
    "linear": (lambda a, s: a.T, lambda s: (s[1], s[0])),
    # q/k/v weight [N·Dh, D] → kernel [D, N, Dh]
    "heads_in": (
        lambda a, s: a.reshape(s[1], s[2], s[0]).transpose(2, 0, 1),
        lambda s: (s[1] * s[2], s[0]),
    ),
    # q/k/v bias [N·Dh] → [N, Dh]
    "heads_bias": (lambda a, s: a.reshape(s), lambda s: (s[0] * s[1],)),
    # o weight [D, H·Dh] → kernel [H, Dh, D]
    "heads_out": (
        lambda a, s: a.reshape(s[2], s[0], s[1]).transpose(1, 2, 0),
        lambda s: (s[2], s[0] * s[1]),
    ),
}

_TOP = {
    ("embed", "embedding"): ("model.embed_tokens.weight", "same"),
    ("final_norm", "scale"): ("model.norm.weight", "same"),
    ("head", "kernel"): ("lm_head.weight", "linear"),
}
_LAYER = {
    ("attn_norm", "scale"): ("input_layernorm.weight", "same"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "same"),
    ("attn", "o", "kernel"): ("self_attn.o_proj.weight", "heads_out"),
    ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", "linear"),
    ("mlp", "up", "kernel"): ("mlp.up_proj.weight", "linear"),
    ("mlp", "down", "kernel"): ("mlp.down_proj.weight", "linear"),
    **{("attn", p, "kernel"): (f"self_attn.{p}_proj.weight", "heads_in") for p in "qkv"},
    **{("attn", p, "bias"): (f"self_attn.{p}_proj.bias", "heads_bias") for p in "qkv"},
}
# Our parameters that are not in the checkpoint: appended-vocabulary rows, derived from
# the named HF tensor [V, D] (mean over its V rows).
_EXTRA = {
    ("embed", "extra_embedding"): "model.embed_tokens.weight",
    ("extra_head", "kernel"): "lm_head.weight",
}


def _hf_name(path: tuple) -> tuple[str, str]:
    """Our parameter path → (HF tensor name, transform kind)."""
    if path in _TOP:
        return _TOP[path]
    head, *rest = path
    if head.startswith("layers_") and tuple(rest) in _LAYER:
        name, kind = _LAYER[tuple(rest)]
        return f"model.layers.{head[len('layers_'):]}.{name}", kind
    raise ValueError(f"no Hugging Face name for our parameter {'/'.join(path)}")


def target_shapes(lm: LanguageModel) -> dict[tuple, jax.ShapeDtypeStruct]:
    """Our LM param paths → ShapeDtypeStruct (text-only init: no xattn; nothing allocated)."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(lm.init, jax.random.key(0), tokens)
    return traverse_util.flatten_dict(nn.unbox(variables["params"]))


def hf_name_table(lm: LanguageModel) -> dict[str, tuple[tuple, str]]:
    """HF tensor name → (our param path, transform kind) for every checkpoint tensor of `lm`."""
    table = {}
    for path in target_shapes(lm):
        if path not in _EXTRA:
            name, kind = _hf_name(path)
            table[name] = (path, kind)
    return table


# ---- checkpoint files ---------------------------------------------------------------------


def _checkpoint_files(checkpoint_dir: str) -> dict[str, list[str]]:
    """safetensors file → the tensor names it holds, from the index or the single file."""
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    single = os.path.join(checkpoint_dir, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(os.path.join(checkpoint_dir, file), []).append(name)
        return files
    if os.path.exists(single):
        with safe_open(single, framework="numpy") as f:
            return {single: list(f.keys())}
    raise ValueError(
        f"{checkpoint_dir} has neither model.safetensors nor model.safetensors.index.json; "
        "convert .bin checkpoints to safetensors first (we never unpickle)"
    )


def _place(array: np.ndarray, sharding: Any, path: tuple) -> Any:
    if sharding is None:
        return array
    try:
        return jax.device_put(array, sharding)
    except ValueError as e:
        raise ValueError(f"cannot place {'/'.join(path)} {list(array.shape)}: {e}") from e


def _sharding_of(shardings: Any, targets: Mapping[tuple, Any]) -> dict[tuple, Any]:
    """Our param path → its Sharding (or None), checked before anything is read."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return {path: shardings for path in targets}
    flat = traverse_util.flatten_dict(shardings)
    absent = [p for p in targets if p not in flat]
    if absent:
        raise ValueError("shardings has no entry for " + ", ".join("/".join(p) for p in absent))
    return {p: flat[p] for p in targets}


def _check_checkpoint(
    checkpoint_dir: str,
    files: Mapping[str, list[str]],
    table: Mapping[str, tuple[tuple, str]],
    targets: Mapping[tuple, jax.ShapeDtypeStruct],
    tied: bool,
) -> None:
    """One ValueError listing every missing, unexpected and mis-shaped tensor, from the
    safetensors headers alone (no tensor is read)."""
    found: dict[str, tuple] = {}
    for file, names in files.items():
        with safe_open(file, framework="numpy") as f:
            for name in names:
                found[name] = tuple(f.get_slice(name).get_shape())
    missing, unexpected, mis_shaped = [], [], []
    for name, (path, kind) in table.items():
        expected = _TRANSFORMS[kind][1](targets[path].shape)
        if name not in found:
            missing.append(f"{name} {list(expected)} (-> {'/'.join(path)})")
        elif found[name] != expected:
            mis_shaped.append(
                f"{name}: got {list(found[name])}, expected {list(expected)} "
                f"(-> {'/'.join(path)} {list(targets[path].shape)})"
            )
    for name, shape in found.items():
        ignored = name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight")
        if name not in table and not ignored:
            unexpected.append(f"{name} {list(shape)}")
    if missing or unexpected or mis_shaped:
        lines = [
            f"Hugging Face checkpoint {checkpoint_dir} does not match the model "
            f"({len(table)} tensors expected):"
        ]
        for title, items in (
            ("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)
        ):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in items)
        raise ValueError("\n".join(lines))


def load_hf_llama(
    checkpoint_dir: str | os.PathLike,
    lm: LanguageModel,
    dtype: Any = None,
    shardings: Any = None,
    extra_init: str = "mean",
    extra_dtype: Any = None,
) -> dict:
    """Our LM parameters (unboxed nested dict, no `xattn_*`) from an HF checkpoint directory.

    dtype: dtype of the imported tensors (default: each target's, i.e. lm.param_dtype).
    extra_dtype: dtype of the appended-vocabulary rows (default: the target's).
    shardings: None (numpy arrays on the host), one jax.sharding.Sharding for every
        parameter, or a tree of Shardings over our LM parameter paths (extra entries such
        as xattn_* are ignored); each tensor is device_put as soon as it is read.
    extra_init: "mean" or "zeros", the appended rows' initialisation (module docstring).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    if extra_init not in EXTRA_INITS:
        raise ValueError(f"extra_init={extra_init!r}; allowed: {EXTRA_INITS}")
    with open(os.path.join(checkpoint_dir, "config.json")) as f:
        _check_lm_matches(lm, lm_config_from_hf(json.load(f)))
    targets = target_shapes(lm)
    table = hf_name_table(lm)
    sharding_of = _sharding_of(shardings, targets)
    files = _checkpoint_files(checkpoint_dir)
    _check_checkpoint(checkpoint_dir, files, table, targets, lm.tie_embeddings)

    # Stream: one tensor at a time is read, converted, cast and placed.
    extras_from = {hf: path for path, hf in _EXTRA.items() if path in targets}
    flat: dict[tuple, Any] = {}
    for file, names in files.items():
        with safe_open(file, framework="numpy") as f:
            for name in (n for n in names if n in table):
                path, kind = table[name]
                array = f.get_tensor(name)  # numpy; bfloat16 via ml_dtypes
                if name in extras_from:
                    extra = extras_from[name]
                    rows = _extra_rows(array, extra, targets[extra], extra_init, extra_dtype)
                    flat[extra] = _place(rows, sharding_of[extra], extra)
                converted = np.ascontiguousarray(
                    _TRANSFORMS[kind][0](array, targets[path].shape),
                    dtype=targets[path].dtype if dtype is None else dtype,
                )
                del array
                flat[path] = _place(converted, sharding_of[path], path)
    return traverse_util.unflatten_dict(flat)


def _extra_rows(
    hf_rows: np.ndarray,  # [V, D] embed_tokens or lm_head weight
    path: tuple,  # embed/extra_embedding [E, D] or extra_head/kernel [D, E]
    target: jax.ShapeDtypeStruct,
    extra_init: str,
    dtype: Any,
) -> np.ndarray:
    dtype = target.dtype if dtype is None else dtype
    if extra_init == "zeros":
        return np.zeros(target.shape, dtype)
    mean = hf_rows.mean(axis=0, dtype=np.float32)  # [D], accumulated in float32
    rows = mean[None, :] if path == ("embed", "extra_embedding") else mean[:, None]
    return np.ascontiguousarray(np.broadcast_to(rows, target.shape), dtype=dtype)
