"""Model FLOPs per train step, peak FLOP/s of the devices, and MFU (SPEC §5).

    per_step = step_flops(config, shapes_of_batches(host_batches)).total
    mfu = per_step / (step_seconds * peak_flops_per_second(devices))

Convention (MaxText-style model FLOPs; remat recomputation and elementwise work are not
counted). A weight matmul over T rows with fan-in I and fan-out O costs 2·T·I·O forward.
The backward pass adds 2·T·I·O for the weight gradient when the weight trains, and 2·T·I·O
for the input gradient when the input depends on a trained parameter (gradients must flow
through it). So, per parameter and row:

    trained weight, gradient flows in    6        frozen weight, gradient flows through   4
    trained weight, input is data        4        frozen weight before anything trained   2

With the paper's defaults (trainable `<image>`/`<EOC>` embedding rows, gated layers and
resampler), every frozen LM block is a "4" and the frozen vision encoder is a "2" (forward
only). Which weights train is read from config.train.trainable, so the same count serves
fine-tuning (vision unfrozen) and the unfrozen-LM ablations.

Attention cores (no weights) cost 4·B·H·Q·K·Dh forward (scores and weighted values) over
the full score matrix our dense kernel computes: no causal halving, and the gated
cross-attention is counted over all N·R media positions, as it runs. The backward pass
adds 2·B·H·Q·K·Dh each for ∂scores (when q or k needs a gradient), ∂q, ∂k and ∂v.

Peak FLOP/s: a table of dense bf16 peaks per accelerator kind (keyed on
`device.device_kind`); on CPU, a matmul probe timed once per process (fp32).
"""

import dataclasses
import functools
import math
import re
import statistics
import time
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# =========================================================================================
# Analytic model FLOPs
# =========================================================================================

MODEL_KINDS = ("flamingo", "lm")  # config.model.kind values counted here


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """Shape of one dataset's batch in a step (all microbatches together)."""

    batch: int  # examples
    length: int  # L text positions
    num_media: int  # N
    num_frames: int = 1  # T
    image_size: int | None = None  # pixels (images) ...
    spatial: int | None = None  # ... or S positions of precomputed vision features


@dataclasses.dataclass
class StepFlops:
    """FLOPs of one train step by component (vision, resampler, xattn, lm, head)."""

    components: dict[str, float]

    @property
    def total(self) -> float:
        return float(sum(self.components.values()))


def _matcher(patterns: Sequence[str]):
    compiled = [re.compile(p) for p in patterns]
    return lambda path: any(c.search(path) for c in compiled)


def matmul_flops(rows: int, fan_in: int, fan_out: int, trained: bool, input_grad: bool) -> float:
    """Forward + backward FLOPs of one weight matmul (see the module docstring)."""
    return 2.0 * rows * fan_in * fan_out * (1 + trained + input_grad)


def attention_flops(batch_heads: int, q: int, k: int, head_dim: int, q_grad: bool,
                    kv_grad: bool) -> float:
    """Forward + backward FLOPs of softmax(q·kᵀ)·v for `batch_heads` (B·H) problems."""
    unit = 2.0 * batch_heads * q * k * head_dim
    backward = (q_grad or kv_grad) + q_grad + 2 * kv_grad  # ∂scores, ∂q, ∂k and ∂v
    return unit * (2 + backward)


@functools.lru_cache(maxsize=32)
def _vision_convs(vision_key: tuple, image_size: int) -> tuple[tuple, tuple[int, ...]]:
    """((parameter path, forward FLOPs per image) of every weight of the vision encoder in
    execution order, feature map shape [1, h, w, d]), from abstract shapes (nothing is
    allocated)."""
    from flamingo_jax.models.flamingo import build_vision_encoder

    import ml_collections

    encoder = build_vision_encoder(ml_collections.ConfigDict(dict(vision_key)), jnp.float32)
    found: list[tuple[str, int]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        params = context.module.variables.get("params", {})
        if context.method_name == "__call__" and "kernel" in params:
            kernel = params["kernel"]
            kernel = getattr(kernel, "value", kernel)  # nn.LogicallyPartitioned
            positions = math.prod(out.shape) // kernel.shape[-1]
            path = "/".join(("vision",) + tuple(context.module.path))
            found.append((path, 2 * positions * math.prod(kernel.shape)))
        return out

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(record):
        features, _ = jax.eval_shape(
            lambda x: encoder.init_with_output(jax.random.key(0), x), images)
    return tuple(found), tuple(features.shape)


def model_flops(config, shape: BatchShape) -> dict[str, float]:
    """Forward + backward FLOPs by component for one dataset's batch of `shape`, for the
    model kinds of MODEL_KINDS (the text-only "lm" kind: the LM blocks and head only)."""
    m = config.model
    kind = m.get("kind", "flamingo")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model FLOPs are counted for model.kind in {MODEL_KINDS}, not {kind!r}")
    trains = _matcher(config.train.trainable)
    b, length, n, t = shape.batch, shape.length, shape.num_media, shape.num_frames
    out = {"vision": 0.0, "resampler": 0.0, "xattn": 0.0, "lm": 0.0, "head": 0.0}
    if kind == "lm":
        return _language_model_flops(config, shape, trains, media_grad=False, out=out,
                                     prefix="", with_xattn=False)

    # ---- Vision encoder: once per frame; forward only unless some of it trains ----------
    media_grad = False  # does the media stream depend on a trained parameter yet?
    if m.vision.variant is not None:
        if shape.image_size is None:
            raise ValueError("BatchShape.image_size is needed for a config with a vision encoder")
        convs, (_, h, w, feature_dim) = _vision_convs(tuple(sorted(m.vision.items())),
                                                      shape.image_size)
        for path, fwd in convs:
            trained = trains(path + "/kernel")
            out["vision"] += b * n * t * fwd * (1 + trained + media_grad)
            media_grad = media_grad or trained
        spatial = h * w
    else:
        spatial = shape.spatial or (shape.image_size // 32) ** 2
        feature_dim = m.vision.get("feature_dim", m.resampler.dim)

    # ---- Perceiver resampler over B·N media of T·S positions --------------------------
    rs = m.resampler
    dm, r, hd = rs.dim, rs.num_latents, rs.num_heads * rs.head_dim
    media, positions = b * n, t * spatial
    if feature_dim != dm:
        out["resampler"] += matmul_flops(media * positions, feature_dim, dm,
                                         trains("resampler/input_proj/kernel"), media_grad)
    media_grad = media_grad or trains("resampler/time_embedding") or trains("resampler/latents")
    for i in range(rs.num_layers):
        p = f"resampler/layers_{i}_"
        grad_in = media_grad  # into q, k, v; after them also when the layer itself trains
        media_grad = media_grad or any(trains(p + s) for s in ("attn/", "ffw/"))
        out["resampler"] += (
            matmul_flops(media * r, dm, hd, trains(p + "attn/q/kernel"), grad_in)
            + sum(matmul_flops(media * (positions + r), dm, hd, trains(p + f"attn/{w}/kernel"),
                               grad_in) for w in "kv")
            + attention_flops(media * rs.num_heads, r, positions + r, rs.head_dim, media_grad,
                              media_grad)
            + matmul_flops(media * r, hd, dm, trains(p + "attn/o/kernel"), media_grad)
            + matmul_flops(media * r, dm, rs.ffw_mult * dm, trains(p + "ffw/wi/kernel"),
                           media_grad)
            + matmul_flops(media * r, rs.ffw_mult * dm, dm, trains(p + "ffw/wo/kernel"),
                           media_grad)
        )
    return _language_model_flops(config, shape, trains, media_grad, out, "lm/", True)


def _language_model_flops(config, shape: BatchShape, trains, media_grad: bool, out: dict,
                          prefix: str, with_xattn: bool) -> dict[str, float]:
    """Adds the LM's (and its gated xattn layers') FLOPs over B·L positions to `out`."""
    m = config.model
    lm, xa, rs = m.lm, m.xattn, m.resampler
    b, length, n = shape.batch, shape.length, shape.num_media
    rows, d, dm, r = b * length, lm.dim, rs.dim, rs.num_latents
    dh = lm.head_dim or lm.dim // lm.num_heads
    text_grad = trains(prefix + "embed/embedding") or trains(prefix + "embed/extra_embedding")
    for i in range(lm.num_layers):
        if with_xattn and i % xa.every == 0:
            p, xhd = f"{prefix}xattn_{i}/", xa.num_heads * xa.head_dim
            kv_rows = b * n * r
            layer_trains = any(trains(p + s) for s in ("q/", "k/", "v/", "o/", "ffw/"))
            q_grad = text_grad
            text_grad = text_grad or layer_trains or media_grad
            out["xattn"] += (
                matmul_flops(rows, d, xhd, trains(p + "q/kernel"), q_grad)
                + sum(matmul_flops(kv_rows, dm, xhd, trains(p + f"{w}/kernel"), media_grad)
                      for w in "kv")
                + matmul_flops(rows, xhd, d, trains(p + "o/kernel"), text_grad)
                + attention_flops(b * xa.num_heads, length, n * r, xa.head_dim,
                                  q_grad, media_grad)
                + matmul_flops(rows, d, xa.ffw_mult * d, trains(p + "ffw/wi/kernel"),
                               text_grad)
                + matmul_flops(rows, xa.ffw_mult * d, d, trains(p + "ffw/wo/kernel"),
                               text_grad)
            )
        p = f"{prefix}layers_{i}/"
        grad_in = text_grad
        text_grad = text_grad or any(trains(p + s) for s in ("attn/", "mlp/"))
        out["lm"] += (
            matmul_flops(rows, d, lm.num_heads * dh, trains(p + "attn/q/kernel"), grad_in)
            + sum(matmul_flops(rows, d, lm.num_kv_heads * dh, trains(p + f"attn/{w}/kernel"),
                               grad_in) for w in "kv")
            + matmul_flops(rows, lm.num_heads * dh, d, trains(p + "attn/o/kernel"), text_grad)
            + attention_flops(b * lm.num_heads, length, length, dh, text_grad, text_grad)
            + sum(matmul_flops(rows, d, lm.mlp_dim, trains(p + f"mlp/{w}/kernel"), text_grad)
                  for w in ("gate", "up"))
            + matmul_flops(rows, lm.mlp_dim, d, trains(p + "mlp/down/kernel"), text_grad)
        )
    if lm.tie_embeddings:
        head = ((prefix + "embed/embedding", lm.vocab_size),
                (prefix + "embed/extra_embedding", lm.num_extra_tokens))
    else:
        head = ((prefix + "head/kernel", lm.vocab_size),
                (prefix + "extra_head/kernel", lm.num_extra_tokens))
    for path, vocab in head:
        out["head"] += matmul_flops(rows, d, vocab, trains(path), text_grad)
    return out


def step_flops(config, shapes: Mapping[str, BatchShape]) -> StepFlops:
    """Model FLOPs of one train step over the datasets' batches {task: shape}."""
    total: dict[str, float] = {}
    for shape in shapes.values():
        for name, value in model_flops(config, shape).items():
            total[name] = total.get(name, 0.0) + value
    return StepFlops(total)


def shapes_of_batches(host_batches: Mapping[str, Mapping[str, np.ndarray]],
                      image_size: int | None = None) -> dict[str, BatchShape]:
    """{task: BatchShape} of a step's host batches [K, b, ...] (one batch per task)."""
    shapes = {}
    for task, batch in host_batches.items():
        k, b, length = batch["tokens"].shape
        if "media" in batch:  # [K, b, N, T, H, W, C]
            _, _, n, t, h = batch["media"].shape[:5]
            shapes[task] = BatchShape(k * b, length, n, t, image_size=h)
        elif "vision_features" in batch:  # [K, b, N, T, S, d]
            _, _, n, t, s = batch["vision_features"].shape[:5]
            shapes[task] = BatchShape(k * b, length, n, t, spatial=s, image_size=image_size)
        else:  # text only (the "lm" kind)
            shapes[task] = BatchShape(k * b, length, 0)
    return shapes


# =========================================================================================
# Peak FLOP/s
# =========================================================================================

# Dense bf16 peak FLOP/s per chip (vendor figures), matched as substrings of
# device.device_kind, most specific first.
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
)


def device_peak_flops(device_kind: str) -> float:
    """Dense bf16 peak FLOP/s of one accelerator of `device_kind`."""
    for key, peak in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peak
    raise ValueError(
        f"no peak FLOP/s known for device kind {device_kind!r}; known kinds: "
        f"{[k for k, _ in PEAK_FLOPS]}. Set config.train.peak_flops_per_device (FLOP/s of one "
        "device) to get MFU on this hardware."
    )


def peak_flops_per_second(devices: Sequence[jax.Device] | None = None,
                          per_device: float | None = None) -> float:
    """Peak FLOP/s of `devices` together (default: every device of the job).

    Accelerators: the table (or `per_device`) × the number of devices. CPU: the matmul
    probe's rate on this host, shared by all its (possibly fake) devices, × processes.
    """
    devices = list(devices) if devices is not None else jax.devices()
    if per_device is not None:
        return per_device * len(devices)
    if devices[0].platform == "cpu":
        return cpu_peak_flops() * len({d.process_index for d in devices})
    return device_peak_flops(devices[0].device_kind) * len(devices)


# =========================================================================================
# CPU matmul probe
# =========================================================================================


def xla_flops(compiled) -> float | None:
    """FLOPs of a compiled executable by XLA's cost analysis (None if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (some backends have none)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


class MatmulProbe:
    """A jitted fp32 [2048,512]@[512,2048] on the default device: the CPU's practical peak.
    Compiled once; `flops_per_second()` re-times it (on a shared CPU the rate drifts, so a
    benchmark re-times it next to each measurement)."""

    SHAPES = ((2048, 512), (512, 2048))  # [M, K] @ [K, N]

    def __init__(self, seconds: float = 0.5):
        a, b = (jnp.ones(s, jnp.float32) for s in self.SHAPES)
        self.args = (a, b)
        self.compiled = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
        self.flops = xla_flops(self.compiled) or 2.0 * 2048 * 512 * 2048
        self.seconds = seconds

    def flops_per_second(self) -> float:
        """FLOPs ÷ median time of calls filling ≈`seconds` after two warm-up calls."""
        for _ in range(2):
            jax.block_until_ready(self.compiled(*self.args))
        times: list[float] = []
        deadline = time.perf_counter() + self.seconds
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
            start = time.perf_counter()
            jax.block_until_ready(self.compiled(*self.args))
            times.append(time.perf_counter() - start)
        return self.flops / statistics.median(times)


@functools.lru_cache(maxsize=1)
def cpu_peak_flops() -> float:
    """The matmul probe's FLOP/s, measured once per process."""
    return MatmulProbe().flops_per_second()
