"""Decoding for few-shot evaluation (SPEC §7): greedy and beam search with a key/value
cache, and log-likelihood scoring of continuations.

Public API (used by the few-shot harness):

    generate(model, params, tokens, prompt_lengths, *, images=None, vision_features=None,
             media_mask=None, max_new_tokens, eoc_id, pad_id=0, beam_size=1,
             length_penalty=0.0) -> (out_tokens [B, max_new_tokens] int32, scores [B] float32)

    score_continuations(model, params, tokens, prompt_lengths, continuation_mask, *,
                        images=None, vision_features=None, media_mask=None) -> [B] float32

`model` is a `flamingo_jax.models.flamingo.Flamingo`, `params` its plain (unboxed) parameter
dict. Inputs are host arrays (numpy) so that they can be checked before compilation.

Prompts are RIGHT-padded: row b of `tokens` [B, L] holds its prompt in
tokens[b, :prompt_lengths[b]]; whatever follows is ignored (replaced by `pad_id`). Token ℓ
of a prompt has position ℓ (RoPE) and cache slot ℓ; the t-th new token of row b has
position and slot prompt_lengths[b] + t, so rows of unequal length decode side by side in
one [B, L + max_new_tokens] cache. The vision encoder and resampler run once per query,
the gated layers' media keys/values are computed once at prefill, and each new token
attends to the media of the last `<image>` of its prompt (φ continues from the prompt).

Generation never emits `<image>` or `pad_id` (their log-probabilities are masked out of
the search; scores are the model's own, unrenormalized log-probabilities). Output rows
end with `eoc_id` followed by `pad_id`, or run to max_new_tokens without `eoc_id`.

Beam search keeps `beam_size` live and `beam_size` finished hypotheses per row. Each step
takes the 2·beam_size best extensions of the live ones; those ending in `eoc_id` join the
finished set, ranked by sum log-prob / length**length_penalty (length counts the new
tokens, `eoc_id` included), the others the next live set. The loop ends once, in every
row, no live hypothesis can beat the worst finished one (exact: it returns what running to
max_new_tokens would); the result is the best finished hypothesis, or the best live one
if none finished within max_new_tokens.

Both functions are jit-compiled once per (model, input shapes, beam_size,
max_new_tokens); `eoc_id`, `pad_id` and `length_penalty` are traced, so changing them
does not recompile.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models.flamingo import Flamingo

# Score of an empty or impossible hypothesis; finite so that sums stay ordered.
NEG = -1e9


def generate(
    model: Flamingo,
    params,
    tokens,  # [B, L] int, right-padded prompts
    prompt_lengths,  # [B] int, 1 <= prompt_lengths[b] <= L
    *,
    images=None,  # [B, N, T, H, W, C] float
    vision_features=None,  # [B, N, T, S, d]
    media_mask=None,  # [B, N], 1 = real media
    max_new_tokens: int,
    eoc_id: int,
    pad_id: int = 0,
    beam_size: int = 1,
    length_penalty: float = 0.0,
) -> tuple[jax.Array, jax.Array]:  # tokens [B, max_new_tokens] int32, scores [B] float32
    """Greedy (beam_size=1) or beam-search continuation of each prompt, stopping at
    `eoc_id`; scores are each chosen continuation's sum of log-probabilities."""
    tokens, prompt_lengths = _check_prompts(model, tokens, prompt_lengths, pad_id)
    total_vocab = model.lm.total_vocab_size
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("beam_size", beam_size, 1)
    if tokens.shape[1] + max_new_tokens > model.lm.max_length:
        raise ValueError(
            f"prompt length {tokens.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"lm.max_length={model.lm.max_length}; shorten the prompts, lower max_new_tokens "
            f"or raise model.lm.max_length in the config"
        )
    for name, value in (("eoc_id", eoc_id), ("pad_id", pad_id)):
        if not 0 <= int(value) < total_vocab or int(value) == model.image_token_id:
            raise ValueError(
                f"{name}={value}; must be a token id in [0, {total_vocab}) other than the "
                f"<image> id {model.image_token_id}"
            )
    if 2 * beam_size > total_vocab - 2:
        raise ValueError(
            f"beam_size={beam_size} needs 2·beam_size candidate tokens besides <image> and "
            f"pad; the vocabulary has {total_vocab}"
        )
    if length_penalty < 0:
        raise ValueError(f"length_penalty={length_penalty}; must be >= 0")
    model.check_inputs(tokens, images, vision_features, media_mask)
    return _generate_jit(
        model, params, tokens, prompt_lengths, images, vision_features, media_mask,
        jnp.int32(eoc_id), jnp.int32(pad_id), jnp.float32(length_penalty),
        max_new_tokens=max_new_tokens, beam_size=beam_size,
    )


def score_continuations(
    model: Flamingo,
    params,
    tokens,  # [B, L] int: prompt, then continuation, then padding
    prompt_lengths,  # [B] int
    continuation_mask,  # [B, L], 1 at the continuation tokens to score
    *,
    images=None,
    vision_features=None,
    media_mask=None,
) -> jax.Array:  # [B] float32
    """Sum over positions ℓ with continuation_mask 1 of log p(tokens[ℓ] | tokens[:ℓ]),
    for ranking candidate answers (close-ended tasks). Scored positions must lie at or
    after the prompt (ℓ >= prompt_lengths[b] >= 1) and must not be `<image>`."""
    tokens = np.asarray(tokens)
    continuation_mask = np.asarray(continuation_mask)
    if continuation_mask.shape != tokens.shape:
        raise ValueError(
            f"continuation_mask shape {continuation_mask.shape} != tokens shape {tokens.shape}"
        )
    _, prompt_lengths = _check_prompts(model, tokens, prompt_lengths, pad_id=None)
    scored = continuation_mask.astype(bool)
    before = np.arange(tokens.shape[1])[None, :] < prompt_lengths[:, None]
    if np.any(scored & before):
        row = int(np.nonzero(np.any(scored & before, axis=1))[0][0])
        raise ValueError(
            f"row {row}: continuation_mask marks positions inside the prompt (prompt length "
            f"{prompt_lengths[row]}); mark only tokens after it"
        )
    if np.any(scored & (tokens == model.image_token_id)):
        raise ValueError("continuation_mask marks an <image> token; continuations are text only")
    model.check_inputs(tokens, images, vision_features, media_mask)
    return _score_jit(model, params, tokens, scored, images, vision_features, media_mask)


# ---- Checks ---------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}; must be an integer >= {minimum}")


def _check_prompts(model, tokens, prompt_lengths, pad_id):
    """Host-side checks; returns (tokens with everything after each prompt set to pad_id
    unless pad_id is None, prompt_lengths) as int32 numpy arrays."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integer [B, L], got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    prompt_lengths = np.asarray(prompt_lengths)
    if prompt_lengths.shape != tokens.shape[:1] or not np.issubdtype(
        prompt_lengths.dtype, np.integer
    ):
        raise ValueError(f"prompt_lengths must be integer [B] = {tokens.shape[:1]}, got shape "
                         f"{prompt_lengths.shape} dtype {prompt_lengths.dtype}")
    bad = np.nonzero((prompt_lengths < 1) | (prompt_lengths > tokens.shape[1]))[0]
    if bad.size:
        raise ValueError(f"prompt_lengths[{bad[0]}]={prompt_lengths[bad[0]]}; must be in "
                         f"[1, L={tokens.shape[1]}]")
    if pad_id is not None:
        inside = np.arange(tokens.shape[1])[None, :] < prompt_lengths[:, None]
        tokens = np.where(inside, tokens, pad_id)
    return tokens.astype(np.int32), prompt_lengths.astype(np.int32)


# ---- Compiled decoding ----------------------------------------------------------------------


def _banned(logp: jax.Array, image_id: int, pad_id: jax.Array) -> jax.Array:
    """log-probs [..., V] with `<image>` and pad made unselectable."""
    ids = jnp.arange(logp.shape[-1])
    return jnp.where((ids == image_id) | (ids == pad_id), NEG, logp)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "beam_size"))
def _generate_jit(model, params, tokens, prompt_lengths, images, vision_features, media_mask,
                  eoc_id, pad_id, length_penalty, *, max_new_tokens, beam_size):
    b, length = tokens.shape
    variables = {"params": params}
    cache = model.lm.init_cache(b, length + max_new_tokens)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    logits, cache, xattn_mask = model.apply(
        variables, tokens, positions, cache, images, vision_features, media_mask,
        method=Flamingo.prefill,
    )
    rows = jnp.arange(b)
    last = prompt_lengths - 1
    logp = jax.nn.log_softmax(logits[rows, last])  # [B, V]
    step_mask = xattn_mask[rows, last][:, None, :]  # [B, 1, N]: φ of the prompt's end

    def step(new_tokens, new_positions, cache, mask):  # [B'] , [B'] -> logp [B', V], cache
        logits, cache = model.apply(
            variables, new_tokens[:, None], new_positions[:, None], mask, cache,
            method=Flamingo.decode_step,
        )
        return jax.nn.log_softmax(logits[:, 0]), cache

    search = _greedy if beam_size == 1 else functools.partial(_beam, beam_size=beam_size)
    return search(step, logp, cache, step_mask, prompt_lengths, model.image_token_id, eoc_id,
                  pad_id, length_penalty, max_new_tokens)


def _greedy(step, logp, cache, mask, prompt_lengths, image_id, eoc_id, pad_id, length_penalty,
            max_new_tokens):
    del length_penalty  # one hypothesis per row: nothing to rank
    b = logp.shape[0]

    def body(state):
        t, out, done, score, logp, cache = state
        token = jnp.argmax(_banned(logp, image_id, pad_id), axis=-1)  # [B]
        token_logp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, pad_id, token).astype(jnp.int32)
        score = score + jnp.where(done, 0.0, token_logp)
        out = out.at[:, t].set(token)
        done = done | (token == eoc_id)
        logp, cache = step(token, prompt_lengths + t, cache, mask)
        return t + 1, out, done, score, logp, cache

    def cond(state):
        t, _, done = state[:3]
        return (t < max_new_tokens) & ~jnp.all(done)

    init = (jnp.int32(0), jnp.full((b, max_new_tokens), pad_id, jnp.int32),
            jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32), logp, cache)
    _, out, _, score, _, _ = jax.lax.while_loop(cond, body, init)
    return out, score


def _beam(step, logp, cache, mask, prompt_lengths, image_id, eoc_id, pad_id, length_penalty,
          max_new_tokens, *, beam_size):
    b, vocab = logp.shape
    k, t_max = beam_size, max_new_tokens
    beams = lambda x: jnp.repeat(x, k, axis=0)  # [B, ...] -> [B·K, ...]
    cache = jax.tree.map(beams, cache)
    mask, positions = beams(mask), beams(prompt_lengths)
    logp = beams(logp).reshape(b, k, vocab)
    take = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)),
                                              axis=1)

    def body(state):
        t, alive_seq, alive_score, fin_seq, fin_norm, fin_score, logp, cache = state
        cand = alive_score[..., None] + _banned(logp, image_id, pad_id)  # [B, K, V]
        top_score, top_idx = jax.lax.top_k(cand.reshape(b, k * vocab), 2 * k)  # [B, 2K]
        source, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        seq = take(alive_seq, source).at[:, :, t].set(token)  # [B, 2K, T]
        is_eoc = token == eoc_id
        # Finished: the K best of the old finished and the new ones ending in EOC.
        norm = top_score / (t + 1).astype(jnp.float32) ** length_penalty
        fin_norm, keep = jax.lax.top_k(
            jnp.concatenate([fin_norm, jnp.where(is_eoc, norm, NEG)], axis=1), k
        )
        fin_seq = take(jnp.concatenate([fin_seq, seq], axis=1), keep)
        fin_score = take(jnp.concatenate([fin_score, jnp.where(is_eoc, top_score, NEG)], 1), keep)
        # Alive: the K best extensions that did not end in EOC.
        alive_score, keep = jax.lax.top_k(jnp.where(is_eoc, NEG, top_score), k)
        alive_seq, source, token = take(seq, keep), take(source, keep), take(token, keep)
        flat_source = (jnp.arange(b)[:, None] * k + source).reshape(-1)  # [B·K]
        cache = {name: (jax.tree.map(lambda x: x[flat_source], c)  # media K/V are per row
                        if name.startswith("layers_") else c)
                 for name, c in cache.items()}
        logp, cache = step(token.reshape(-1), positions + t, cache, mask)
        logp = logp.reshape(b, k, vocab)
        return t + 1, alive_seq, alive_score, fin_seq, fin_norm, fin_score, logp, cache

    def cond(state):
        t, _, alive_score, _, fin_norm = state[:5]
        # Sums only fall and length**penalty is at most t_max**penalty, so no live
        # hypothesis can beat the worst finished one once this bound is below it.
        best_possible = alive_score[:, 0] / jnp.float32(t_max) ** length_penalty
        return (t < t_max) & ~jnp.all(fin_norm[:, -1] > best_possible)

    empty = jnp.full((b, k, t_max), pad_id, jnp.int32)
    first_only = jnp.where(jnp.arange(k) == 0, 0.0, NEG)  # the K copies are one hypothesis
    init = (jnp.int32(0), empty, jnp.broadcast_to(first_only, (b, k)).astype(jnp.float32),
            empty, jnp.full((b, k), NEG, jnp.float32), jnp.full((b, k), NEG, jnp.float32),
            logp, cache)
    _, alive_seq, alive_score, fin_seq, fin_norm, fin_score, _, _ = jax.lax.while_loop(
        cond, body, init
    )
    has_finished = fin_norm[:, 0] > NEG / 2  # [B]
    out = jnp.where(has_finished[:, None], fin_seq[:, 0], alive_seq[:, 0])
    score = jnp.where(has_finished, fin_score[:, 0], alive_score[:, 0])
    return out, score


@functools.partial(jax.jit, static_argnames=("model",))
def _score_jit(model, params, tokens, scored, images, vision_features, media_mask):
    logits = model.apply({"params": params}, tokens, images=images,
                         vision_features=vision_features, media_mask=media_mask)
    logp = jax.nn.log_softmax(logits[:, :-1])  # [B, L-1, V]: predicts tokens[:, 1:]
    token_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(scored[:, 1:], token_logp, 0.0), axis=1)
