"""Decoding speed: tokens/s of greedy (and beam) generation with the key/value cache of
flamingo_jax/decoding.py, against the same greedy search without a cache, which reruns the
whole model (vision encoder, resampler, LM over the full [B, prompt + new] buffer) for
every new token. Both are one compiled while-loop; timings exclude compilation (median of
--repeats runs after a warm-up that compiles).

    python benchmarks/decoding.py                            # demo config only
    python benchmarks/decoding.py --config experiments/bench_100m.py
    python benchmarks/decoding.py --config experiments/bench_100m.py --batch 8 \
        --prompt_length 128 --new_tokens 64 --beam 3

Inputs are random and in memory (no tensorflow/seqio). Every row decodes exactly
--new_tokens tokens: `eoc_id` is set to the pad id, which generation never emits.
Unequal prompt lengths (right-padded) and media in every row, as in few-shot evaluation.
"""

import argparse
import functools
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.train_step import load_config  # noqa: E402
from flamingo_jax import decoding  # noqa: E402
from flamingo_jax.models.flamingo import build_flamingo  # noqa: E402

DEMO = "experiments/demo.py"
PAD = 0


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def generate_without_cache(model, params, tokens, prompt_lengths, media, media_mask, eoc_id,
                           pad_id, *, max_new_tokens):
    """Greedy search that reruns the full forward over a fixed [B, L + T] buffer per token."""
    b, length = tokens.shape
    rows = jnp.arange(b)
    buffer = jnp.concatenate([tokens, jnp.full((b, max_new_tokens), pad_id, tokens.dtype)], 1)
    ids = jnp.arange(model.lm.total_vocab_size)
    banned = (ids == model.image_token_id) | (ids == pad_id)

    def body(state):
        t, buffer, done, score = state
        logits = model.apply({"params": params}, buffer, media_mask=media_mask, **media)
        last = prompt_lengths + t - 1
        logp = jax.nn.log_softmax(logits[rows, last])  # [B, V]
        token = jnp.argmax(jnp.where(banned, decoding.NEG, logp), axis=-1)
        score = score + jnp.where(done, 0.0, logp[rows, token])
        token = jnp.where(done, pad_id, token).astype(buffer.dtype)
        buffer = buffer.at[rows, last + 1].set(token)
        return t + 1, buffer, done | (token == eoc_id), score

    def cond(state):
        return (state[0] < max_new_tokens) & ~jnp.all(state[2])

    init = (jnp.int32(0), buffer, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32))
    _, buffer, _, score = jax.lax.while_loop(cond, body, init)
    out = buffer[rows[:, None], prompt_lengths[:, None] + jnp.arange(max_new_tokens)]
    return out, score


def random_inputs(config, batch: int, prompt_length: int, seed: int = 0):
    """Right-padded prompts of unequal lengths, each with every media's <image> token
    early in the prompt; images or vision features of the configured shapes."""
    inp, model_config = config.input, config.model
    n = inp.num_media
    rng = np.random.default_rng(seed)
    lengths = prompt_length - (np.arange(batch) % 4) * max(1, prompt_length // 8)
    if lengths.min() < n + 2:
        raise ValueError(f"--prompt_length {prompt_length} too short for {n} media")
    tokens = rng.integers(3, model_config.lm.vocab_size, size=(batch, prompt_length))
    tokens = np.where(np.arange(prompt_length) < lengths[:, None], tokens, PAD).astype(np.int32)
    image_slots = 1 + np.arange(n) * max(1, (lengths.min() - 2) // n)
    tokens[:, image_slots] = model_config.image_token_id
    shape = (batch, n, inp.num_frames)
    if model_config.vision.variant is None:
        d = model_config.vision.get("feature_dim", model_config.resampler.dim)
        media = {"vision_features": rng.normal(size=shape + ((inp.image_size // 32) ** 2, d))}
    else:
        media = {"images": rng.normal(size=shape + (inp.image_size, inp.image_size, 3))}
    media = {k: v.astype(np.float32) for k, v in media.items()}
    return tokens, lengths.astype(np.int32), media, np.ones((batch, n), np.int32)


def timed(fn, repeats: int) -> tuple[float, float, tuple]:
    """(first call s, median of `repeats` later calls s, last result)."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), result


def bench(spec: str, args) -> list[list[str]]:
    config = load_config(spec)
    model = build_flamingo(config.model)
    tokens, lengths, media, media_mask = random_inputs(config, args.batch, args.prompt_length)
    need = args.prompt_length + args.new_tokens
    if need > model.lm.max_length:  # decoding checks this; the bench may go past training
        model = model.clone(lm=model.lm.clone(max_length=need))
    params = jax.jit(lambda key: model.init(key, tokens, media_mask=media_mask, **media))(
        jax.random.key(0))
    params = nn.unbox(params)["params"]
    num_params = sum(x.size for x in jax.tree.leaves(params))
    t = args.new_tokens
    new = args.batch * t
    name = f"{os.path.basename(spec)} ({num_params / 1e6:.1f}M)"

    def cached(beam):
        return lambda: decoding.generate(
            model, params, tokens, lengths, media_mask=media_mask, max_new_tokens=t,
            eoc_id=PAD, pad_id=PAD, beam_size=beam, **media)

    def uncached():
        return generate_without_cache(model, params, tokens, lengths, media, media_mask,
                                      PAD, PAD, max_new_tokens=t)

    rows = []
    first_c, cached_s, (out_c, score_c) = timed(cached(1), args.repeats)
    first_u, uncached_s, (out_u, score_u) = timed(uncached, args.repeats)
    same = float(np.mean(np.asarray(out_c) == np.asarray(out_u)))
    score_gap = float(np.abs(np.asarray(score_c) - np.asarray(score_u)).max())
    shape = f"{args.batch}×{args.prompt_length}+{t}"
    rows.append([name, shape, "greedy, KV cache", f"{first_c - cached_s:.1f}",
                 f"{cached_s * 1e3:.0f}", f"{new / cached_s:.0f}",
                 f"{uncached_s / cached_s:.1f}×"])
    rows.append([name, shape, "greedy, no cache", f"{first_u - uncached_s:.1f}",
                 f"{uncached_s * 1e3:.0f}", f"{new / uncached_s:.0f}", "1.0×"])
    print(f"  {name}: cached vs uncached tokens equal {same:.0%}, max |Δ score| "
          f"{score_gap:.1e}", flush=True)
    if args.beam > 1:
        first_b, beam_s, _ = timed(cached(args.beam), args.repeats)
        rows.append([name, shape, f"beam {args.beam}, KV cache", f"{first_b - beam_s:.1f}",
                     f"{beam_s * 1e3:.0f}", f"{new / beam_s:.0f}",
                     f"{uncached_s / beam_s:.1f}×"])
    return rows


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for j, row in enumerate([header] + rows):
        print("  ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[],
                   help="a bigger experiment config (path[:arg]) to time after the demo; "
                        "repeatable, e.g. experiments/bench_100m.py")
    p.add_argument("--no_demo", action="store_true", help="skip the demo config")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt_length", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--beam", type=int, default=3, help="also time beam search (1: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--matmul_precision", default="default",
                   choices=("default", "high", "highest"),
                   help="float32 matmul precision; GPUs use TF32 under 'default', so the "
                        "cached and uncached tokens agree exactly only under 'highest'")
    args = p.parse_args()
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    specs = ([] if args.no_demo else [DEMO]) + args.config
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"devices {jax.devices()[0].device_kind} ×{jax.device_count()}, "
          f"matmul precision {args.matmul_precision}", flush=True)
    rows = []
    for spec in specs:
        rows += bench(spec, args)
    print()
    header = ["config", "B×prompt+new", "decoding", "compile s", "ms/run", "new tok/s",
              "speed-up"]
    print_table(header, rows)


if __name__ == "__main__":
    main()
