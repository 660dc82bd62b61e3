"""NFNet: parity with timm's dm_nfnet, parameter counts, importer errors, stochastic depth
and scaled weight standardization."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from safetensors.numpy import save_file
from timm.layers import ScaledStdConv2dSame
from timm.models.nfnet import NormFreeNet, model_cfgs

from flamingo_jax.importers.timm_nfnet import TIMM_WS_EPS, load_timm_nfnet, timm_name_table
from flamingo_jax.models.nfnet import (
    NFNet,
    ScaledStdConv,
    nfnet_variant,
    standardize_kernel,
)

# Tiny NFNet that timm can build too (timm's stem is stem_chs/8, /4, /2, stem_chs).
TINY_TIMM_CFG = dict(widths=(16, 32, 64, 64), depths=(1, 2, 1, 1), group_width=8)
TINY_OURS = dict(**TINY_TIMM_CFG, stem_widths=(1, 2, 4))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Moves every gain, bias and skip gain off its init value so that every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skipinit_gain"):
                p.copy_(torch.rand((), generator=g) + 0.5)
            elif name.endswith(".gain"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name == "head.fc.weight":
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def _timm_outputs(model: torch.nn.Module, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits [B, K], last stage output before final_conv [B, h, w, C]) of a timm NFNet."""
    captured = {}
    hook = model.stages.register_forward_hook(lambda m, i, o: captured.update(stages=o))
    with torch.no_grad():
        logits = model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).numpy()
    hook.remove()
    return logits, captured["stages"].permute(0, 2, 3, 1).numpy()


def _rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _ours(model: NFNet, params, x: np.ndarray):
    @jax.jit
    def run(p, images):
        logits = model.apply({"params": p}, images)
        feats = model.apply({"params": p}, images, return_features=True)
        return logits, feats

    return run(params, jnp.asarray(x))


def _param_count(model: NFNet, size: int = 64) -> int:
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    return sum(x.size for x in jax.tree.leaves(nn.unbox(shapes["params"])))


@pytest.fixture(scope="module")
def timm_f0():
    torch.manual_seed(0)
    model = timm.create_model("dm_nfnet_f0", pretrained=False, num_classes=10).eval()
    _randomize(model, seed=1)
    return model


def test_f0_matches_timm(timm_f0):
    # 192×200: the odd widths (25, 13) exercise asymmetric 'SAME' padding and the ceil-mode
    # average pool of the shortcut; H ≠ W catches a transposed layout.
    x = np.random.default_rng(0).standard_normal((2, 192, 200, 3)).astype(np.float32)
    ref_logits, ref_feats = _timm_outputs(timm_f0, x)
    model = NFNet(**nfnet_variant("F0"), num_classes=10, **TIMM_WS_EPS)
    params = load_timm_nfnet(timm_f0.state_dict(), model)
    logits, feats = _ours(model, params, x)
    assert logits.shape == (2, 10) and feats.shape == ref_feats.shape == (2, 6, 7, 1536)
    assert _rel_err(logits, ref_logits) < 1e-4
    assert _rel_err(feats, ref_feats) < 1e-4
    assert np.std(ref_logits) > 1e-2  # the comparison is not between near-constants


def test_features_only_model_imports_timm_without_head(timm_f0):
    model = NFNet(**nfnet_variant("F0"), num_classes=None)
    params = load_timm_nfnet(timm_f0.state_dict(), model)
    assert "head" not in params and "final_conv" not in params
    np.testing.assert_array_equal(
        params["stage2_block3"]["conv2"]["kernel"],
        timm_f0.stages[2][3].conv2.weight.detach().numpy().transpose(2, 3, 1, 0),
    )
    assert float(params["stage1_block1"]["skip_gain"]) == pytest.approx(
        float(timm_f0.stages[1][1].skipinit_gain.detach())
    )


def test_tiny_matches_timm_from_files(tmp_path):
    cfg = dataclasses.replace(
        model_cfgs["dm_nfnet_f0"], depths=(1, 2, 1, 1), channels=(16, 32, 64, 64),
        group_size=8, stem_chs=8, num_features=128,
    )
    torch.manual_seed(0)
    ref = NormFreeNet(cfg, num_classes=5).eval()
    _randomize(ref, seed=2)
    x = np.random.default_rng(1).standard_normal((3, 40, 36, 3)).astype(np.float32)
    ref_logits, ref_feats = _timm_outputs(ref, x)
    model = NFNet(**TINY_OURS, num_classes=5, **TIMM_WS_EPS)

    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    save_file(sd, str(tmp_path / "tiny.safetensors"))
    torch.save(ref.state_dict(), tmp_path / "tiny.pth")
    from_st = load_timm_nfnet(tmp_path / "tiny.safetensors", model)
    from_pth = load_timm_nfnet(str(tmp_path / "tiny.pth"), model)
    jax.tree.map(np.testing.assert_array_equal, from_st, from_pth)

    logits, feats = _ours(model, from_st, x)
    assert _rel_err(logits, ref_logits) < 1e-4
    assert _rel_err(feats, ref_feats) < 1e-4


def test_param_counts():
    timm_f0 = timm.create_model("dm_nfnet_f0", pretrained=False, device="meta")
    timm_count = sum(p.numel() for p in timm_f0.parameters())
    f0 = _param_count(NFNet(**nfnet_variant("F0"), num_classes=1000))
    assert abs(f0 - timm_count) / timm_count < 0.005
    assert abs(f0 - 71.5e6) / 71.5e6 < 0.005
    f6 = _param_count(NFNet(**nfnet_variant("F6"), num_classes=1000))
    assert abs(f6 - 438e6) / 438e6 < 0.01
    f0_features = _param_count(NFNet(**nfnet_variant("F0"), num_classes=None))
    assert f0 - f0_features == 1536 * 3072 + 2 * 3072 + 3072 * 1000 + 1000  # final_conv + head


def test_importer_reports_every_problem(timm_f0):
    sd = dict(timm_f0.state_dict())
    del sd["stages.2.4.conv2b.gain"]
    sd["stages.3.3.conv1.weight"] = torch.zeros(768, 1536, 1, 1)
    sd["stages.1.0.attn_last.fc1.weight"] = torch.zeros(256, 512, 3, 3)
    with pytest.raises(ValueError) as err:
        load_timm_nfnet(sd, NFNet(**nfnet_variant("F0"), num_classes=10))
    msg = str(err.value)
    assert "1 missing" in msg and "stages.2.4.conv2b.gain [768, 1, 1, 1]" in msg
    assert "1 unexpected" in msg and "stages.3.3.conv1.weight [768, 1536, 1, 1]" in msg
    assert "1 mis-shaped" in msg
    assert "stages.1.0.attn_last.fc1.weight: got [256, 512, 3, 3], expected [256, 512, 1, 1]" in msg


def test_importer_rejects_wrong_variant_and_head_size(timm_f0):
    with pytest.raises(ValueError) as err:
        load_timm_nfnet(timm_f0.state_dict(), NFNet(**nfnet_variant("F1"), num_classes=1000))
    msg = str(err.value)
    assert "stages.0.1.conv1.weight" in msg  # F1 has two blocks in stage 0, F0 one
    assert "head.fc.weight: got [10, 3072], expected [1000, 3072]" in msg
    table = timm_name_table(NFNet(**nfnet_variant("F0"), num_classes=10))
    assert set(table) == set(timm_f0.state_dict())


def _random_params(model: NFNet, image_shape: tuple, seed: int = 0) -> dict:
    """Params drawn in numpy (no init compile): kernels N(0, 1/fan_in), gains 1 + N(0, 0.1²),
    biases N(0, 0.1²), skip gains U(0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(image_shape))

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        if name == "gain":
            return 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        if name == "skip_gain":
            return rng.uniform(0.5, 1.5, leaf.shape)
        return 0.1 * rng.standard_normal(leaf.shape)

    params = jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes["params"]))
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def test_init_values():
    model = NFNet(widths=(16, 32), depths=(1, 1), stem_widths=(4,), group_width=8, num_classes=3)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    params = nn.unbox(params)
    block = params["stage1_block0"]
    assert block["conv2"]["kernel"].shape == (3, 3, 8, 16)  # 16 wide bottleneck, 2 groups of 8
    np.testing.assert_array_equal(block["conv3"]["gain"], np.ones(32))
    np.testing.assert_array_equal(block["conv3"]["bias"], np.zeros(32))
    assert float(block["skip_gain"]) == 0.0  # every residual branch starts switched off
    np.testing.assert_array_equal(params["head"]["kernel"], np.zeros((64, 3)))
    k = np.asarray(params["final_conv"]["kernel"])  # [1, 1, 32, 64], N(0, 1/32)
    assert abs(np.std(k) * np.sqrt(32) - 1.0) < 0.1 and abs(np.mean(k)) < 0.05


def test_stochastic_depth_drops_whole_branches_without_rescale():
    # Two blocks; block i has rate·i/num_blocks, so block 1 drops with probability 0.5.
    model = NFNet(widths=(16,), depths=(2,), stem_widths=(4,), group_width=8,
                  stochastic_depth_rate=1.0)
    image = np.random.default_rng(0).standard_normal((1, 16, 16, 3)).astype(np.float32)
    x = jnp.broadcast_to(jnp.asarray(image), (64, 16, 16, 3))  # one image, 64 times
    params = _random_params(model, x.shape)
    no_branch = {**params, "stage0_block1": {**params["stage0_block1"], "skip_gain": jnp.zeros(())}}

    @jax.jit
    def run(p, rng):
        eval_out = model.apply({"params": p}, x)  # [64, 4, 4, 16]
        train_out = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
        no_drop = model.clone(stochastic_depth_rate=0.0).apply(
            {"params": p}, x, train=True, rngs={"dropout": rng})
        return eval_out, train_out, no_drop

    kept, train, train0 = run(params, jax.random.key(2))
    dropped, _, _ = run(no_branch, jax.random.key(2))  # block 1's branch removed
    assert float(jnp.max(jnp.abs(kept - dropped))) > 1e-2
    is_kept = jnp.all(jnp.isclose(train, kept, atol=1e-5), axis=(1, 2, 3))
    is_dropped = jnp.all(jnp.isclose(train, dropped, atol=1e-5), axis=(1, 2, 3))
    assert bool(jnp.all(is_kept ^ is_dropped))  # per example: whole branch, no 1/keep scale
    assert 16 <= int(jnp.sum(is_dropped)) <= 48
    np.testing.assert_array_equal(train0, kept)  # rate 0: train mode changes nothing


def test_stochastic_depth_on_tiny_variant():
    model = NFNet(**{**nfnet_variant("tiny"), "stochastic_depth_rate": 0.5})
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 64, 3)), jnp.float32)
    params = _random_params(model, x.shape)

    @jax.jit
    def run(rng):
        return (model.apply({"params": params}, x),
                model.apply({"params": params}, x, train=True, rngs={"dropout": rng}))

    eval_out, train_out = run(jax.random.key(3))
    assert eval_out.shape == (4, 2, 2, 64)
    assert float(jnp.max(jnp.abs(train_out - eval_out))) > 1e-3
    np.testing.assert_array_equal(train_out, run(jax.random.key(3))[1])  # fixed rng: same output


def test_bfloat16_forward_follows_float32():
    model = NFNet(widths=(16, 32), depths=(1, 2), stem_widths=(4,), group_width=8)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    params = _random_params(model, x.shape)
    bf16 = model.clone(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params_bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    out32, out16 = jax.jit(
        lambda p32, p16: (model.apply({"params": p32}, x), bf16.apply({"params": p16}, x))
    )(params, params_bf16)
    assert out16.dtype == jnp.bfloat16 and out16.shape == out32.shape == (2, 4, 4, 32)  # stride 8
    assert _rel_err(out16.astype(jnp.float32), np.asarray(out32)) < 0.05


def test_standardized_kernel_statistics():
    rng = np.random.default_rng(0)
    kernel = 3.0 + 0.5 * rng.standard_normal((3, 3, 8, 5))  # [kh, kw, I, O]
    kernel = jnp.asarray(kernel, jnp.float32)
    gain = jnp.asarray(rng.uniform(0.5, 2.0, 5), jnp.float32)
    w = standardize_kernel(kernel, gain)
    np.testing.assert_allclose(jnp.mean(w, axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(w, axis=(0, 1, 2)) * 72, gain**2, rtol=1e-4)
    assert bool(jnp.all(jnp.isfinite(standardize_kernel(jnp.ones((1, 1, 4, 2)), jnp.ones(2)))))
    # eps floors var·fan_in in the default form; timm's form adds eps to var instead.
    tiny = 1e-3 * jnp.array([1.0, -1.0]).reshape(1, 1, 2, 1)  # var·fan_in = 2e-6 < 1e-4
    np.testing.assert_allclose(standardize_kernel(tiny, jnp.ones(1)).ravel(),
                               [1e-3 / 1e-2, -1e-3 / 1e-2], rtol=1e-5)
    np.testing.assert_allclose(standardize_kernel(tiny, jnp.ones(1), 1e-5, "add").ravel(),
                               np.array([1e-3, -1e-3]) / np.sqrt((1e-6 + 1e-5) * 2), rtol=1e-5)


@pytest.mark.parametrize("stride,groups", [(2, 1), (1, 4)])
def test_scaled_std_conv_matches_timm(stride, groups):
    torch.manual_seed(0)
    ref = ScaledStdConv2dSame(8, 12, 3, stride=stride, groups=groups, eps=1e-5)
    with torch.no_grad():
        ref.gain.copy_(1.0 + 0.3 * torch.randn_like(ref.gain))
        ref.bias.copy_(0.1 * torch.randn_like(ref.bias))
    x = np.random.default_rng(0).standard_normal((2, 10, 11, 8)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    conv = ScaledStdConv(12, 3, stride, groups, ws_eps=1e-5, ws_eps_form="add")
    params = {
        "kernel": ref.weight.detach().numpy().transpose(2, 3, 1, 0),
        "gain": ref.gain.detach().numpy().reshape(-1),
        "bias": ref.bias.detach().numpy(),
    }
    out = conv.apply({"params": params}, jnp.asarray(x))
    assert out.shape == expected.shape
    assert _rel_err(out, expected) < 1e-5


def test_every_param_has_logical_axes():
    model = NFNet(**nfnet_variant("tiny"), num_classes=7)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    leaves = jax.tree.leaves(shapes["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for box in leaves:
        assert len(box.names) == box.value.ndim
    p = shapes["params"]
    assert p["stage1_block0"]["conv2"]["kernel"].names == (None, None, "conv_in", "conv_out")
    assert p["stage1_block0"]["se"]["fc1"]["kernel"].names == ("conv_in", "conv_out")
    assert p["head"]["kernel"].names == ("conv_in", "classes")
    assert set(nn.unbox(p)) == {
        "stem_conv1", "stem_conv2", "stem_conv3", "stem_conv4", "stage0_block0",
        "stage1_block0", "stage2_block0", "stage3_block0", "final_conv", "head",
    }


def test_bad_inputs_and_names():
    model = NFNet(**nfnet_variant("tiny"))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\], got shape \(32, 32, 3\)"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="float array, got dtype uint8"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
    with pytest.raises(ValueError, match="allowed: F0, F1, F2, F3, F4, F5, F6, F7, tiny"):
        nfnet_variant("F9")
    with pytest.raises(ValueError, match="activation must be one of"):
        jax.eval_shape(NFNet(activation="swish").init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert nfnet_variant("F6")["depths"] == (7, 14, 42, 21)
    f6 = nfnet_variant("F6")
    assert (f6["train_resolution"], f6["test_resolution"], f6["dropout_rate"]) == (448, 576, 0.5)
