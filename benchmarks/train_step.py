"""Train-step speed and memory: step time, tokens/s, FLOP rate and MFU on CPU, where the
time goes, how the step scales with text length and media count, and how per-device
parameter bytes fall with the fsdp size.

    python benchmarks/train_step.py --sections probe step components   # ≈5 min
    python benchmarks/train_step.py --sections scaling                  # ≈6 min
    python benchmarks/train_step.py --sections fsdp                     # ≈2 min
    python benchmarks/train_step.py                   # every section, ≈13 min on 2 cores
    python benchmarks/train_step.py --sections scaling --scale_config 100m \
        --lengths 64 128 256 --num_media 1 4 16 --scale_length 256
    python benchmarks/train_step.py --sections fsdp --fsdp_config 100m --json_out bench.json

Sections (all use in-memory synthetic batches; nothing is read from disk):
  probe       jitted fp32 [2048,512]@[512,2048]: the CPU's practical peak GFLOP/s.
  step        the tiny demo config (experiments/demo.py) and the ~100M config
              (experiments/bench_100m.py): step time (median after warm-up), tokens/s,
              examples/s, FLOPs per step from XLA's cost analysis of the compiled step,
              achieved GFLOP/s and that as a fraction of the probe (MFU).
  components  each part of the ~100M step timed alone (resampler, one LM block, one gated
              xattn layer, head+loss, AdamW; then attention cores, FFWs and norms inside
              them) with its XLA FLOPs and GFLOP/s, so the part that falls short shows.
  scaling     step time vs text length L and vs number of media N (default: the tiny
              config on precomputed features; each point compiles a new step).
  fsdp        on 8 fake CPU devices (a subprocess with XLA_FLAGS set before jax imports):
              per-device parameter + optimizer bytes vs fsdp size, next to total ÷ fsdp.

MFU here = XLA-counted FLOPs per step ÷ (step time × probe GFLOP/s). XLA's count includes
every op the compiled step executes (masked attention over all media, elementwise chains),
so it is the work done. The step table also shows the analytic model FLOPs
(flamingo_jax.flops: matmuls and attention cores only, the count behind the train loop's
`mfu`) and the MFU they give. On a shared or throttled CPU the probe itself drifts between
runs, so it is re-timed next to every measurement.
"""

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count"
_CHILD = "--_fsdp_child" in sys.argv
if _CHILD and FAKE_DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    # Must precede the first jax import; the parent normally sets it already.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {FAKE_DEVICES_FLAG}=8").strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flamingo_jax.flops import MatmulProbe, shapes_of_batches, step_flops, xla_flops  # noqa: E402
from flamingo_jax.inspect import inspect_config  # noqa: E402
from flamingo_jax.models.attention import dot_product_attention  # noqa: E402
from flamingo_jax.models.feed_forward import SquaredReluFeedForward, SwiGLUFeedForward  # noqa: E402
from flamingo_jax.models.flamingo import build_flamingo  # noqa: E402
from flamingo_jax.models.gated_xattn import GatedCrossAttentionDense, media_attention_mask  # noqa: E402
from flamingo_jax.models.language_model import DecoderBlock  # noqa: E402
from flamingo_jax.models.normalization import LayerNorm, RMSNorm  # noqa: E402
from flamingo_jax.models.resampler import PerceiverResampler  # noqa: E402
from flamingo_jax.train_state import split_params  # noqa: E402
from flamingo_jax.train_step import weighted_cross_entropy  # noqa: E402
from flamingo_jax.trainer import Trainer  # noqa: E402

CONFIGS = {
    "tiny": "experiments/demo.py",
    "100m": "experiments/bench_100m.py",
    "perf": "experiments/bench_100m.py:perf",  # PERF.md's 65.6M shape
}
SECTIONS = ("probe", "step", "components", "scaling", "fsdp")
WIDTH = 96


# =========================================================================================
# Helpers
# =========================================================================================


def banner(title: str) -> None:
    print("\n" + "=" * WIDTH + f"\n{title}\n" + "=" * WIDTH, flush=True)


def table(headers: list[str], rows: list[list], fmt: list[str]) -> None:
    """Right-aligned columns; the first column left-aligned."""
    cells = [[h for h in headers]] + [
        [("–" if v is None else format(v, f)) for v, f in zip(row, fmt)] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def load_config(name_or_path: str):
    """A config by short name (tiny, 100m, perf) or 'path/to/config.py[:arg]'."""
    spec = CONFIGS.get(name_or_path, name_or_path)
    path, _, arg = spec.partition(":")
    path = path if os.path.isabs(path) else os.path.join(REPO, path)
    module_spec = importlib.util.spec_from_file_location(
        "bench_config_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def time_fn(fn, args, target_s: float = 1.0, min_reps: int = 3, max_reps: int = 50,
            warmup_s: float = 0.3) -> float:
    """Median wall seconds of fn(*args) after warm-up calls (at least one, and until
    warmup_s has passed: thread pools and clocks settle); reps fill ≈target_s."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    while time.perf_counter() - start < warmup_s:
        jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    reps = int(min(max(target_s / max(first, 1e-6), min_reps), max_reps))
    times = [first]
    for _ in range(reps - 1):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic_batch(config, *, batch_size: int, length: int, num_media: int, k: int = 1,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """One task's host batch [K, b, ...]: every example has `num_media` real media, each
    with its `<image>` token at a random position (media and <image> counts match)."""
    if num_media > length - 2:
        raise ValueError(f"{num_media} media do not fit {length} text positions")
    model = config.model
    rng = np.random.default_rng(seed)
    image_id = model.image_token_id
    tokens = rng.integers(3, model.lm.vocab_size, size=(k, batch_size, length + 1)).astype(np.int32)
    for i in np.ndindex(k, batch_size):
        where = np.sort(rng.choice(np.arange(1, length - 1), num_media, replace=False))
        tokens[i][where] = image_id
    batch = {
        "tokens": tokens[..., :-1],  # [K, b, L]
        "targets": tokens[..., 1:],  # [K, b, L]
        "loss_weights": (tokens[..., 1:] != image_id).astype(np.float32),  # [K, b, L]
        "media_mask": np.ones((k, batch_size, num_media), np.int32),  # [K, b, N]
        "assoc_next": rng.integers(0, 2, size=(k, batch_size)).astype(np.int32),  # [K, b]
    }
    t, size = config.input.num_frames, config.input.image_size
    if model.vision.variant is None:
        s = (size // 32) ** 2
        d = model.vision.get("feature_dim", model.resampler.dim)
        batch["vision_features"] = rng.standard_normal(
            (k, batch_size, num_media, t, s, d), np.float32)  # [K, b, N, T, S, d]
    else:
        batch["media"] = rng.standard_normal(
            (k, batch_size, num_media, t, size, size, 3), np.float32)  # [K, b, N, T, H, W, C]
    return batch


def task_batches(config, length=None, num_media=None, seed=0) -> dict:
    """{task: batch} with one batch per task of config.train.task_weights."""
    inp = config.input
    k = config.train.microbatches
    b = inp.batch_size // k
    return {
        name: synthetic_batch(config, batch_size=b, length=length or inp.text_length,
                              num_media=num_media or inp.num_media, k=k, seed=seed + i)
        for i, name in enumerate(sorted(config.train.task_weights))
    }


@contextlib.contextmanager
def with_context(trainer):
    """The mesh and logical-axis rules the trainer's step runs under."""
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        yield


# =========================================================================================
# 1. Matmul probe: the CPU's practical fp32 peak
# =========================================================================================


class Probe(MatmulProbe):
    """flamingo_jax.flops's matmul probe in GFLOP/s, re-timed next to each measurement: on a
    shared or throttled CPU the achievable rate drifts, so MFU divides by an adjacent probe."""

    def gflops_per_s(self) -> float:
        return self.flops_per_second() / 1e9


def probe(args) -> dict:
    banner("1. Matmul probe (fp32, jit): the CPU's practical peak")
    rng = np.random.default_rng(0)
    rows = []
    out = {}
    cases = [  # (name, shapes, fn)
        ("2-D [2048,512]@[512,2048]", ((2048, 512), (512, 2048)),
         lambda a, b: a @ b),
        ("3-D [8,256,512]@[512,2048]", ((8, 256, 512), (512, 2048)),
         lambda a, b: jnp.einsum("bld,df->blf", a, b)),
        ("weight grad [8,256,512]ᵀ@[8,256,2048]", ((8, 256, 512), (8, 256, 2048)),
         lambda a, b: jnp.einsum("bld,blf->df", a, b)),
        ("attn scores B8 H8 L256 Dh64", ((8, 256, 8, 64), (8, 256, 8, 64)),
         lambda q, k: jnp.einsum("blhd,bkhd->bhlk", q, k)),
    ]
    for name, shapes, fn in cases:
        xs = [jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes]
        compiled = jax.jit(fn).lower(*xs).compile()
        flops = xla_flops(compiled)
        seconds = time_fn(compiled, xs, target_s=args.probe_seconds, max_reps=200)
        rows.append([name, seconds * 1e3, flops / 1e9, flops / seconds / 1e9])
        out[name] = {"seconds": seconds, "flops": flops, "gflops_per_s": flops / seconds / 1e9}
    table(["operation", "ms", "GFLOP", "GFLOP/s"], rows, ["", ".2f", ".2f", ".1f"])
    peak = out[cases[0][0]]["gflops_per_s"]
    print(f"\npeak (first row) = {peak:.1f} GFLOP/s on {jax.device_count()} device(s), "
          f"{os.cpu_count()} CPU cores. Later sections re-time this matmul next to each "
          "measurement ('probe' columns) and divide by that.")
    return {"peak_gflops_per_s": peak, "cases": out}


# =========================================================================================
# 2. Train step: time, tokens/s, XLA FLOPs, GFLOP/s, MFU
# =========================================================================================


def time_train_step(trainer, state, host_batches, steps: int, want_flops: bool = True):
    """(state, result) for one shape of batches: first call (compile + run, untimed
    warm-up), XLA FLOPs of the compiled step, then `steps` timed steps; the median is the
    step time."""
    batches = trainer.shard_batches(host_batches)
    start = time.perf_counter()
    state, metrics = trainer.step(state, batches)  # builds trainer._step, compiles
    jax.block_until_ready((state, metrics))
    first = time.perf_counter() - start
    flops = None
    if want_flops:
        start = time.perf_counter()
        compiled = trainer.lower(state, batches).compile()
        lower_s = time.perf_counter() - start
        flops = xla_flops(compiled)
        del compiled
    else:
        lower_s = 0.0
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = trainer.step(state, batches)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    tokens = sum(int(np.prod(b["tokens"].shape)) for b in host_batches.values())
    examples = sum(int(np.prod(b["tokens"].shape[:2])) for b in host_batches.values())
    seconds = statistics.median(times) if times else math.nan
    return state, {
        "first_call_s": first, "cost_analysis_compile_s": lower_s, "step_s": seconds,
        "step_times_s": times, "tokens": tokens, "examples": examples,
        "tokens_per_s": tokens / seconds, "examples_per_s": examples / seconds,
        "flops": flops, "gflops_per_s": flops / seconds / 1e9 if flops else None,
        "loss": loss,
    }


def describe(config) -> str:
    m, inp = config.model, config.input
    media = ("features" if m.vision.variant is None else f"NFNet-{m.vision.variant} "
             f"{inp.image_size}px")
    return (f"LM {m.lm.num_layers}L×{m.lm.dim} V={m.lm.vocab_size}, resampler "
            f"{m.resampler.num_layers}L×{m.resampler.dim}, xattn every {m.xattn.every}, "
            f"B={inp.batch_size} L={inp.text_length} N={inp.num_media} ({media}), {m.dtype}, "
            f"{len(config.train.task_weights)} dataset(s) per step")


def step_section(args, peak, ref: Probe) -> tuple[dict, dict]:
    banner("2. Train step (one device, median of timed steps after a warm-up step)")
    results, trainers = {}, {}
    for name in args.step_configs:
        config = load_config(name)
        report = inspect_config(config, 1)
        print(f"[{name}] {describe(config)}; {report['total_params'] / 1e6:.1f}M params, "
              f"{report['trainable_params'] / 1e6:.1f}M trainable", flush=True)
        start = time.perf_counter()
        trainer = Trainer(config, devices=jax.devices()[:1])
        state = trainer.init_state()
        jax.block_until_ready(state)
        init_s = time.perf_counter() - start
        host = task_batches(config)
        state, r = time_train_step(trainer, state, host, 0)  # compile, warm up, FLOPs
        before = ref.gflops_per_s()
        state, timed = time_train_step(trainer, state, host, args.steps, want_flops=False)
        after = ref.gflops_per_s()
        r.update({k: timed[k] for k in ("step_s", "step_times_s", "tokens_per_s",
                                        "examples_per_s", "loss")})
        r["gflops_per_s"] = r["flops"] / r["step_s"] / 1e9 if r["flops"] else None
        r.update(init_s=init_s, total_params=report["total_params"],
                 trainable_params=report["trainable_params"], config=describe(config),
                 probe_before=before, probe_after=after, probe=(before + after) / 2)
        r["mfu"] = r["gflops_per_s"] / r["probe"] if r["gflops_per_s"] else None
        # Analytic model FLOPs (flamingo_jax.flops, as the train loop logs them).
        r["model_flops"] = step_flops(config, shapes_of_batches(host)).total
        r["model_mfu"] = r["model_flops"] / r["step_s"] / 1e9 / r["probe"]
        r["mfu_vs_section1"] = r["gflops_per_s"] / peak if (r["gflops_per_s"] and peak) else None
        results[name] = r
        trainers[name] = (trainer, state)
        print(f"  init {init_s:.1f}s, first step (compile+run) {r['first_call_s']:.1f}s, "
              f"cost-analysis compile {r['cost_analysis_compile_s']:.1f}s, timed steps "
              f"{', '.join(f'{t:.3f}' for t in r['step_times_s'])} s, loss {r['loss']:.3f}; "
              f"probe before/after {before:.1f}/{after:.1f} GFLOP/s", flush=True)
    print()
    rows = [[n, r["total_params"] / 1e6, r["step_s"], r["tokens_per_s"], r["examples_per_s"],
             (r["flops"] or math.nan) / 1e9, r["gflops_per_s"], r["probe"],
             100 * r["mfu"] if r["mfu"] is not None else None,
             100 * r["mfu_vs_section1"] if r["mfu_vs_section1"] is not None else None,
             r["model_flops"] / 1e9, 100 * r["model_mfu"]]
            for n, r in results.items()]
    table(["config", "params M", "step s", "tokens/s", "examples/s", "GFLOP/step",
           "GFLOP/s", "probe", "MFU %", "MFU % (§1 probe)", "model GFLOP", "model MFU %"],
          rows, ["", ".1f", ".3f", ",.0f", ".2f", ".1f", ".1f", ".1f", ".1f", ".1f", ".1f",
                 ".1f"])
    print("\n(tokens = B×L text positions per step; FLOPs = XLA cost analysis of the "
          "compiled step; probe = mean of the matmul probe timed just before and after the "
          "steps; MFU = GFLOP/s ÷ probe; model GFLOP = flamingo_jax.flops's analytic count "
          "(matmuls and attention, 6/4/2 per weight and row), the train loop's mfu uses it)")
    return results, trainers


# =========================================================================================
# 3. Components: where the step loses time
# =========================================================================================


def _unbox(tree):
    """Strip nn.LogicallyPartitioned boxes without applying their sharding constraints."""
    return jax.tree_util.tree_map(
        lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, tree,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _init(module, *inputs):
    return _unbox(jax.jit(module.init)(jax.random.key(0), *inputs))["params"]


def _vjp_loss(out, seed=1):
    """Σ out·ct with a fixed random cotangent, so the backward pass is the real one."""
    ct = jax.random.normal(jax.random.key(seed), out.shape, jnp.float32).astype(out.dtype)
    return jnp.sum((out * ct).astype(jnp.float32))


def component_cases(config, trainer) -> tuple[list, list]:
    """(top-level components, sub-components): (name, count per step, fn, args)."""
    m, inp = config.model, config.input
    dtype = jnp.dtype(m.dtype)
    model = build_flamingo(m)
    lm = model.lm
    tasks = len(config.train.task_weights)
    k = config.train.microbatches
    b, length, n, t = inp.batch_size // k, inp.text_length, inp.num_media, inp.num_frames
    s = (inp.image_size // 32) ** 2
    d_feat = m.vision.get("feature_dim", m.resampler.dim)
    d, r, dm = lm.dim, m.resampler.num_latents, m.resampler.dim
    head_dim = lm.head_dim or lm.dim // lm.num_heads
    xkw = dict(lm.xattn or {})
    hx, dhx = xkw["num_heads"], xkw["head_dim"]
    n_xattn = len(lm.xattn_layer_indices())
    calls = tasks * k  # model applications per step
    draws = iter(range(10**6))

    def normal(shape, dt=dtype):
        key = jax.random.fold_in(jax.random.key(0), next(draws))
        return jax.random.normal(key, shape, jnp.float32).astype(dt)

    host = synthetic_batch(config, batch_size=b, length=length, num_media=n)
    tokens = jnp.asarray(host["tokens"][0])  # [B, L]
    mask = media_attention_mask(tokens, m.image_token_id, n, jnp.asarray(host["media_mask"][0]),
                                jnp.asarray(host["assoc_next"][0]))  # [B, L, N]
    x = normal((b, length, d))  # [B, L, D] residual stream
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))  # [B, L]
    feats = normal((b, n, t, s, d_feat))  # [B, N, T, S, d]
    media = normal((b, n, r, dm))  # [B, N, R, Dm] resampled latents

    top, sub = [], []

    # Perceiver resampler over all B·N media: forward, and forward + ∂params.
    resampler = PerceiverResampler(**m.resampler, dtype=dtype)
    rp = _init(resampler, feats)
    top.append(("resampler fwd (in fwd+bwd below)", 0,
                lambda p, f: resampler.apply({"params": p}, f), (rp, feats)))
    top.append(("resampler fwd+bwd ∂params", calls,
                jax.grad(lambda p, f: _vjp_loss(resampler.apply({"params": p}, f))), (rp, feats)))

    # One gated xattn layer: ∂params, ∂y (text stream) and ∂media (to the resampler).
    xattn = GatedCrossAttentionDense(**xkw, dtype=dtype)
    xp = _init(xattn, x, media, mask)
    xp = jax.tree_util.tree_map(lambda a: a + 0.1 if a.ndim == 0 else a, xp)  # open gates
    top.append(("gated xattn fwd+bwd ∂(params,y,media)", calls * n_xattn,
                jax.grad(lambda p, y, md, mk: _vjp_loss(xattn.apply({"params": p}, y, md, mk)),
                         argnums=(0, 1, 2)), (xp, x, media, mask)))

    # One frozen LM block: backward to its input only (its weights get no gradient).
    block = DecoderBlock(lm.num_heads, lm.num_kv_heads, head_dim, lm.mlp_dim, lm.rope_theta,
                         lm.norm_eps, lm.qkv_bias, dtype=dtype)
    bp = _init(block, x, positions)
    top.append(("LM block fwd+bwd ∂x", calls * lm.num_layers,
                jax.grad(lambda xx, p, pos: _vjp_loss(block.apply({"params": p}, xx, pos))),
                (x, bp, positions)))

    # Final norm, output head [D, V+E] and the weighted cross-entropy, backward to x.
    head_w, extra_w = normal((d, lm.vocab_size)), normal((d, lm.num_extra_tokens))
    targets, weights = jnp.asarray(host["targets"][0]), jnp.asarray(host["loss_weights"][0])

    def head_loss(xx, w, we, tg, wt):
        h = xx.astype(jnp.float32)
        h = (h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + lm.norm_eps)).astype(dtype)
        logits = jnp.concatenate([h @ w, h @ we], axis=-1).astype(jnp.float32)  # [B, L, V+E]
        return weighted_cross_entropy(logits, tg, wt)[0]

    top.append(("final norm + head + CE fwd+bwd ∂x", calls, jax.grad(head_loss),
                (x, head_w, extra_w, targets, weights)))

    # AdamW (with global-norm clipping) over every trainable parameter.
    shapes, _ = split_params(_unbox(trainer.boxed), config.train.trainable)
    params = {p: jnp.zeros(a.shape, config.train.trainable_param_dtype)
              for p, a in shapes.items()}  # {path: [shape]}
    grads = jax.tree_util.tree_map(lambda a: normal(a.shape, a.dtype) * 1e-3, params)
    opt_state = trainer.tx.init(params)

    def adam(g, o, p):
        updates, o = trainer.tx.update(g, o, p)
        return jax.tree_util.tree_map(jnp.add, p, updates), o

    top.append(("AdamW update (trainable params)", 1, adam, (grads, opt_state, params)))

    if m.vision.variant is not None:
        vision = model.vision
        images = normal((b * n * t, inp.image_size, inp.image_size, 3))
        vp = _init(vision, images)
        top.insert(0, ("vision encoder fwd (frozen)", calls,
                       lambda p, im: vision.apply({"params": p}, im), (vp, images)))

    # ---- inside the blocks ------------------------------------------------------------
    q = normal((b, length, lm.num_heads, head_dim))  # [B, L, H, Dh]
    kv = normal((b, length, lm.num_kv_heads, head_dim))  # [B, L, G, Dh]
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, L, L]
    sub.append((f"self-attn core (causal, L={length}) fwd+bwd", calls * lm.num_layers,
                jax.grad(lambda a, bb, c, mk: _vjp_loss(dot_product_attention(a, bb, c, mk)),
                         argnums=(0, 1, 2)), (q, kv, kv, causal)))
    qx = normal((b, length, hx, dhx))  # [B, L, Hx, Dhx]
    kx = normal((b, n * r, hx, dhx))  # [B, N·R, Hx, Dhx]: keys over all media
    key_mask = jnp.repeat(mask, r, axis=-1)[:, None]  # [B, 1, L, N·R]
    sub.append((f"xattn core (masked, {n}·{r} keys) fwd+bwd", calls * n_xattn,
                jax.grad(lambda a, bb, c, mk: _vjp_loss(dot_product_attention(a, bb, c, mk)),
                         argnums=(0, 1, 2)), (qx, kx, kx, key_mask)))
    mlp = SwiGLUFeedForward(lm.mlp_dim, dtype=dtype)
    mp = _init(mlp, x)
    sub.append((f"LM SwiGLU MLP {d}→{lm.mlp_dim} fwd+bwd ∂x", calls * lm.num_layers,
                jax.grad(lambda xx, p: _vjp_loss(mlp.apply({"params": p}, xx))), (x, mp)))
    ffw = SquaredReluFeedForward(xkw.get("ffw_mult", 4) * d, dtype=dtype)
    fp = _init(ffw, x)
    sub.append((f"xattn sq-ReLU FFW {d}→{xkw.get('ffw_mult', 4) * d} fwd+bwd ∂(p,x)",
                calls * n_xattn,
                jax.grad(lambda p, xx: _vjp_loss(ffw.apply({"params": p}, xx)), argnums=(0, 1)),
                (fp, x)))
    # Projections as the layers write them: [B, L, D]·[D, H, Dh] (tensordot), and the same
    # FLOPs as a plain 2-D matmul [B·L, D]@[D, H·Dh] to tell layout from size.
    wq = normal((d, lm.num_heads, head_dim))  # [D, H, Dh]
    wx = normal((d, hx, dhx))  # [D, Hx, Dhx]
    proj = lambda xx, w: _vjp_loss(jnp.tensordot(xx, w, axes=1))  # noqa: E731
    sub.append((f"LM q/k/v/o projection {d}→{lm.num_heads}×{head_dim} fwd+bwd ∂x",
                calls * 4 * lm.num_layers, jax.grad(proj), (x, wq)))
    sub.append((f"xattn q/k/v/o projection {d}→{hx}×{dhx} fwd+bwd ∂(x,W)",
                calls * 4 * n_xattn, jax.grad(proj, argnums=(0, 1)), (x, wx)))
    x2, w2 = x.reshape(b * length, d), wx.reshape(d, hx * dhx)  # [B·L, D], [D, Hx·Dhx]
    sub.append((f"  same as 2-D matmul [{b * length},{d}]@[{d},{hx * dhx}] fwd+bwd ∂(x,W)",
                0, jax.grad(proj, argnums=(0, 1)), (x2, w2)))
    rms = RMSNorm(lm.norm_eps, dtype=dtype)
    rnp = _init(rms, x)
    sub.append(("RMSNorm [B,L,D] fwd+bwd ∂x", calls * (2 * lm.num_layers + 1),
                jax.grad(lambda xx, p: _vjp_loss(rms.apply({"params": p}, xx))), (x, rnp)))
    ln = LayerNorm(dtype=dtype)
    lnp = _init(ln, x)
    sub.append(("LayerNorm [B,L,D] fwd+bwd ∂(p,x)", calls * 2 * n_xattn,
                jax.grad(lambda p, xx: _vjp_loss(ln.apply({"params": p}, xx)), argnums=(0, 1)),
                (lnp, x)))
    logits = normal((b, lm.num_heads, length, length), jnp.float32)
    sub.append(("softmax [B,H,L,L] fp32 fwd+bwd", calls * lm.num_layers,
                jax.grad(lambda a: _vjp_loss(jax.nn.softmax(a, axis=-1))), (logits,)))
    return top, sub


def measure_cases(cases, seconds: float) -> list[dict]:
    out = []
    for name, count, fn, args in cases:
        try:
            compiled = jax.jit(fn).lower(*args).compile()
            flops = xla_flops(compiled)
            secs = time_fn(compiled, args, target_s=seconds)
            out.append({"name": name, "count": count, "seconds": secs, "flops": flops})
        except Exception as e:  # noqa: BLE001 (a changed module signature: report, go on)
            print(f"  {name}: not measured ({type(e).__name__}: {str(e)[:120]})")
            out.append({"name": name, "count": count, "seconds": None, "flops": None})
        print(f"  measured {name}", flush=True)
    return out


def _rows(results, step_s, peak):
    rows = []
    for c in results:
        secs, flops, count = c["seconds"], c["flops"], c["count"]
        rate = flops / secs / 1e9 if (secs and flops) else None
        per_step = secs * count if (secs is not None and count) else None
        rows.append([c["name"], count, secs * 1e3 if secs else None,
                     per_step * 1e3 if per_step is not None else None,
                     100 * per_step / step_s if (per_step is not None and step_s) else None,
                     flops / 1e9 if flops else None, rate,
                     100 * rate / peak if (rate and peak) else None])
    return rows


def components_section(args, ref: Probe, step_results, trainers) -> dict:
    name = args.components_config
    banner(f"3. Where the time goes: components of the [{name}] step, each timed alone")
    if name in trainers:
        trainer, _ = trainers[name]
        config = trainer.config
    else:
        config = load_config(name)
        trainer = Trainer(config, devices=jax.devices()[:1])
    print(describe(config))
    with with_context(trainer):
        top, sub = component_cases(config, trainer)
        before = ref.gflops_per_s()
        top_r = measure_cases(top, args.component_seconds)
        sub_r = measure_cases(sub, args.component_seconds)
        after = ref.gflops_per_s()
    peak = (before + after) / 2
    step = step_results.get(name)
    step_s = step["step_s"] if step else None
    headers = ["component", "×/step", "ms each", "ms/step", "% step", "GFLOP each",
               "GFLOP/s", "% probe"]
    fmt = ["", "d", ".2f", ".0f", ".1f", ".3f", ".1f", ".0f"]
    print()
    table(headers, _rows(top_r, step_s, peak), fmt)
    accounted = sum(c["seconds"] * c["count"] for c in top_r if c["seconds"] is not None)
    flops_acc = sum((c["flops"] or 0) * c["count"] for c in top_r)
    if step_s:
        print(f"\nsum of components × count = {accounted:.3f} s of the measured {step_s:.3f} s "
              f"step ({100 * accounted / step_s:.0f}%); their FLOPs {flops_acc / 1e9:.1f} GFLOP "
              f"of the step's {(step['flops'] or math.nan) / 1e9:.1f} (XLA)")
        print(f"the rest ({step_s - accounted:+.3f} s) is embedding, mask building, gradient "
              f"accumulation and cross-layer fusion differences")
    print("\ninside those (each row already counted above):")
    table(headers, _rows(sub_r, step_s, peak), fmt)
    print(f"\nprobe = {peak:.1f} GFLOP/s (timed before/after: {before:.1f}/{after:.1f}). Rows "
          "far below it are where the step falls short (% probe < 50 misses the issue's "
          "target).")
    return {"components": top_r, "inside": sub_r, "accounted_s": accounted,
            "accounted_flops": flops_acc, "probe_before": before, "probe_after": after}


# =========================================================================================
# 4. Scaling with text length L and number of media N
# =========================================================================================


def scaling_section(args, ref: Probe) -> dict:
    config = load_config(args.scale_config)
    if not args.scale_vision and config.model.vision.variant is not None:
        # Precomputed features [B, N, T, S, d] instead of images: each (L, N) point compiles
        # in seconds rather than a minute, and the sweep shows the Flamingo-specific parts.
        config.model.vision.variant = None
        config.model.vision.feature_dim = config.model.resampler.dim
    lengths, media = list(args.lengths), list(args.num_media)
    fixed_l, fixed_n = args.scale_length, args.scale_media
    config.model.lm.max_length = max(lengths + [fixed_l, config.model.lm.max_length])
    banner(f"4. Step-time scaling [{args.scale_config}] with text length L (N={fixed_n}) "
           f"and media count N (L={fixed_l})")
    print(describe(config) + " (L and N as per row)")
    trainer = Trainer(config, devices=jax.devices()[:1])
    state = trainer.init_state()
    out = {"length": [], "media": []}
    headers = ["", "step s", "× first", "tokens/s", "examples/s", "GFLOP/step", "GFLOP/s",
               "probe", "MFU %", "compile s"]
    fmt = ["", ".3f", ".2f", ",.0f", ".2f", ".2f", ".1f", ".1f", ".1f", ".1f"]
    for axis, values in (("length", lengths), ("media", media)):
        rows = []
        for v in values:
            length, n = (v, fixed_n) if axis == "length" else (fixed_l, v)
            label = f"L={length} N={n}"
            if n > length - 2:
                print(f"  {label}: skipped ({n} media need more than {length} positions)")
                continue
            host = task_batches(config, length=length, num_media=n)
            state, r = time_train_step(trainer, state, host, args.scale_steps,
                                       want_flops=not args.no_scale_flops)
            peak = ref.gflops_per_s() if not args.no_scale_flops else None
            r.update(length=length, num_media=n, probe=peak)
            out[axis].append(r)
            base = out[axis][0]["step_s"]
            rate = r["gflops_per_s"]
            rows.append([label, r["step_s"], r["step_s"] / base, r["tokens_per_s"],
                         r["examples_per_s"], r["flops"] / 1e9 if r["flops"] else None, rate,
                         peak, 100 * rate / peak if (rate and peak) else None, r["first_call_s"]])
            print(f"  measured {label}: {r['step_s']:.3f} s", flush=True)
        print(f"\nvs text length L (N={fixed_n}):" if axis == "length"
              else f"\nvs number of media N (L={fixed_l}):")
        table(headers, rows, fmt)
    return out


# =========================================================================================
# 5. Per-device parameter + optimizer bytes vs fsdp size (8 fake devices)
# =========================================================================================


def _state_bytes(state) -> tuple[int, dict]:
    """(global bytes, {device: bytes}) of params and optimizer state."""
    per_device: dict = {}
    total = 0
    for leaf in jax.tree_util.tree_leaves((state.trainable, state.frozen, state.opt_state)):
        total += leaf.nbytes
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return total, per_device


def fsdp_child(args) -> dict:
    """Runs in the subprocess with 8 fake devices."""
    n_dev = jax.device_count()
    config0 = load_config(args.fsdp_config)
    rows, out = [], []
    replicated = []
    for f in args.fsdp_sizes:
        if n_dev % f:
            print(f"  fsdp={f}: skipped ({n_dev} devices)")
            continue
        config = load_config(args.fsdp_config)
        config.mesh.update(data=n_dev // f, fsdp=f, tensor=1, num_devices=None)
        report = inspect_config(config, n_dev)
        trainer = Trainer(config, devices=jax.devices()[:n_dev])
        state = trainer.init_state()
        jax.block_until_ready(state)
        total, per_device = _state_bytes(state)
        first = sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(
            (state.trainable, state.frozen, state.opt_state)))
        worst, best = max(per_device.values()), min(per_device.values())
        ideal = total / f
        if f == max(args.fsdp_sizes):
            flat = {**state.trainable, **state.frozen}
            replicated = sorted(
                ((p, x.nbytes) for p, x in flat.items()
                 if x.addressable_shards[0].data.nbytes == x.nbytes and x.nbytes >= 1 << 16),
                key=lambda t: -t[1])[:5]
        mib = 2**20
        rows.append([f"{f}", f"({n_dev // f},{f},1)", report["bytes_per_device"] / mib,
                     first / mib, worst / mib, total / mib, ideal / mib, worst / ideal])
        out.append({"fsdp": f, "mesh": [n_dev // f, f, 1],
                    "inspect_bytes_per_device": report["bytes_per_device"],
                    "shard0_bytes": first, "max_device_bytes": worst, "min_device_bytes": best,
                    "total_bytes": total, "total_over_fsdp": ideal, "ratio": worst / ideal})
        del state, trainer
        gc.collect()
        print(f"  measured fsdp={f}", flush=True)
    print()
    table(["fsdp", "mesh (d,f,t)", "inspect MiB/dev", "shard[0] MiB", "max MiB/dev",
           "total MiB", "total÷fsdp MiB", "max ÷ ideal"], rows,
          ["", "", ".1f", ".1f", ".1f", ".1f", ".1f", ".4f"])
    print("\n(params + AdamW moments; 'shard[0]' sums x.addressable_shards[0].data.nbytes, "
          "'max' is the fullest device; the target is max ÷ ideal ≤ 1.10)")
    if replicated:
        print("largest parameters left whole on every device at the largest fsdp:")
        for p, nbytes in replicated:
            print(f"  {p:<48} {nbytes / 2**10:10.1f} KiB")
    else:
        print("no parameter of 64 KiB or more is left whole on every device at the largest "
              "fsdp")
    return {"config": args.fsdp_config, "devices": n_dev, "rows": out,
            "replicated": replicated}


def fsdp_section(args) -> dict:
    banner(f"5. Parameter + optimizer bytes per device vs fsdp size [{args.fsdp_config}], "
           f"{args.fake_devices} fake CPU devices")
    if jax.device_count() >= args.fake_devices:
        return fsdp_child(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fsdp.json")
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" {FAKE_DEVICES_FLAG}={args.fake_devices}").strip()
        cmd = [sys.executable, os.path.abspath(__file__), "--_fsdp_child",
               "--fsdp_config", args.fsdp_config, "--_child_json", path,
               "--fsdp_sizes", *map(str, args.fsdp_sizes)]
        subprocess.run(cmd, env=env, check=True, cwd=REPO)
        with open(path) as f:
            return json.load(f)


# =========================================================================================
# Main
# =========================================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--step_configs", nargs="+", default=["tiny", "100m"],
                   help="short names (tiny, 100m, perf) or config.py[:arg] paths")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    p.add_argument("--probe_seconds", type=float, default=1.0)
    p.add_argument("--components_config", default="100m")
    p.add_argument("--component_seconds", type=float, default=2.0,
                   help="time budget per component measurement (min 3 reps)")
    p.add_argument("--scale_config", default="tiny")
    p.add_argument("--scale_vision", action="store_true",
                   help="keep the config's vision encoder in the sweep (default: precomputed "
                        "features, much faster to compile)")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--num_media", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--scale_length", type=int, default=128, help="L for the N sweep")
    p.add_argument("--scale_media", type=int, default=4, help="N for the L sweep")
    p.add_argument("--scale_steps", type=int, default=3)
    p.add_argument("--no_scale_flops", action="store_true",
                   help="skip the second compile for XLA FLOPs in the scaling sweep")
    p.add_argument("--fsdp_config", default="100m")
    p.add_argument("--fsdp_sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--fake_devices", type=int, default=8)
    p.add_argument("--json_out", default=None, help="also write every figure as JSON here")
    p.add_argument("--_fsdp_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_child_json", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args._fsdp_child:
        result = fsdp_child(args)
        if args._child_json:
            with open(args._child_json, "w") as f:
                json.dump(result, f)
        return
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{jax.device_count()} device(s), {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.2f} (anything else on the CPUs skews every figure)")
    start = time.perf_counter()
    results: dict = {}
    peak = None
    if "probe" in args.sections or {"step", "components", "scaling"} & set(args.sections):
        results["probe"] = probe(args)
        peak = results["probe"]["peak_gflops_per_s"]
        ref = Probe(args.probe_seconds)
    trainers: dict = {}
    step_results: dict = {}
    if "step" in args.sections:
        step_results, trainers = step_section(args, peak, ref)
        results["step"] = step_results
    if "components" in args.sections:
        results["components"] = components_section(args, ref, step_results, trainers)
    trainers.clear()
    gc.collect()
    if "scaling" in args.sections:
        results["scaling"] = scaling_section(args, ref)
    if "fsdp" in args.sections:
        results["fsdp"] = fsdp_section(args)
    print(f"\ntotal benchmark wall time {time.perf_counter() - start:.0f} s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
