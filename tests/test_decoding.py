"""KV-cached decoding (SPEC §7) against a reference that recomputes the full forward pass
for every new token: same tokens, log-probabilities within 1e-5, greedy and beam search,
a batch of prompts of unequal lengths with media present and open gates; EOC stops and
pads; score_continuations equals the full-forward log-likelihood."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import demo
from flamingo_jax import decoding
from flamingo_jax.models.flamingo import build_flamingo

B, L, N, S, DF = 3, 10, 2, 4, 32  # prompts, prompt buffer length, media, positions, width
T, K = 8, 3  # new tokens, beams
PROMPT_LENGTHS = np.array([10, 7, 4], np.int32)
PAD = 0


def _config():
    config = demo.get_config()
    config.model.vision.variant = None
    config.model.vision.feature_dim = DF
    config.model.resampler.update(num_layers=1, dim=DF, num_heads=2, head_dim=16, num_latents=4)
    config.model.lm.update(vocab_size=64, num_layers=2, dim=64, num_heads=4, num_kv_heads=2,
                           mlp_dim=128, max_length=L + T)
    config.model.xattn.update(every=1, num_heads=2, head_dim=16)
    return config


def _random_params(shapes, seed=0):
    """Every parameter drawn afresh (no init to compile): weights ~ N(0, 1/fan_in),
    embeddings ~ N(0, 1), norm scales ~ U(0.5, 1.5), biases ~ N(0, 0.1²), gates open
    (α ~ U(0.3, 1)): logits spread by O(1), so greedy and beam choices are far from ties,
    and the gated cross-attention changes them."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if "alpha" in name:
            value = rng.uniform(0.3, 1.0)
        elif "embedding" in name:
            value = rng.normal(size=x.shape)
        elif "scale" in name:
            value = rng.uniform(0.5, 1.5, size=x.shape)
        elif "bias" in name:
            value = 0.1 * rng.normal(size=x.shape)
        else:
            assert x.ndim >= 2, name
            value = rng.normal(size=x.shape) / np.sqrt(x.shape[0])
        return jnp.asarray(value, x.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module", autouse=True)
def float32_matmuls():
    """Full float32 matmuls on every backend (GPUs default to TF32, ~1e-3 off)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def setup():
    config = _config()
    model = build_flamingo(config.model)
    image_id = config.model.image_token_id
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, size=(B, L)).astype(np.int32)
    tokens[0, [1, 5]] = image_id  # two media; new tokens attend to the second
    tokens[1, 8] = image_id  # after row 1's prompt (7 tokens): ignored, row 1 is text only
    tokens[2, 3] = image_id  # the prompt ends with <image>
    media_mask = np.array([[1, 1], [0, 0], [1, 0]], np.int32)
    features = rng.normal(size=(B, N, 1, S, DF)).astype(np.float32)
    prompts = [tokens[b, :n] for b, n in enumerate(PROMPT_LENGTHS)]
    init_tokens = np.where(np.arange(L) < PROMPT_LENGTHS[:, None], tokens, PAD)
    shapes = jax.eval_shape(lambda key: model.init(key, init_tokens, vision_features=features,
                                                   media_mask=media_mask), jax.random.key(0))
    params = _random_params(nn.unbox(shapes)["params"])
    full_logp = jax.jit(lambda p, t, f, m: jax.nn.log_softmax(
        model.apply({"params": p}, t, vision_features=f, media_mask=m)))
    return dict(model=model, params=params, tokens=tokens, media_mask=media_mask,
                features=features, prompts=prompts, image_id=image_id,
                eoc_id=config.model.eoc_token_id, full_logp=full_logp)


# ---- Reference: the full forward pass over prompt + generated tokens at every step ----------


def _next_logp(s, seqs, owners):
    """log p(next | seq) [len(seqs), V] for each sequence, by one full forward over all of
    them right-padded to L + T (rows padded to B·K so one compiled program serves all)."""
    rows = np.full((B * K, L + T), PAD, np.int32)
    for i, seq in enumerate(seqs):
        rows[i, :len(seq)] = seq
    owner = np.zeros(B * K, int)
    owner[:len(owners)] = owners
    logp = s["full_logp"](s["params"], rows, s["features"][owner], s["media_mask"][owner])
    logp = np.asarray(logp)
    return np.stack([logp[i, len(seq) - 1] for i, seq in enumerate(seqs)])


def _allowed(s, logp):
    logp = logp.copy()
    logp[[s["image_id"], PAD]] = -np.inf
    return logp


def _reference_greedy(s, eoc_id):
    seqs = [list(p) for p in s["prompts"]]
    out = np.full((B, T), PAD, np.int32)
    scores = np.zeros(B, np.float32)
    done = np.zeros(B, bool)
    for t in range(T):
        logp = _next_logp(s, seqs, range(B))
        for b in np.nonzero(~done)[0]:
            token = int(np.argmax(_allowed(s, logp[b])))
            scores[b] += logp[b, token]
            seqs[b].append(token)
            out[b, t] = token
            done[b] = token == eoc_id
    return out, scores


def _reference_beam(s, eoc_id, length_penalty):
    """Beam search as documented in flamingo_jax/decoding.py, run to the last step with
    no early stopping: live hypotheses (new tokens, sum log-prob) and finished ones
    (normalized score, sum, tokens) per row."""
    alive = [[([], np.float32(0))] for _ in range(B)]
    finished = [[] for _ in range(B)]
    for t in range(T):
        seqs = [list(s["prompts"][b]) + new for b in range(B) for new, _ in alive[b]]
        owners = [b for b in range(B) for _ in alive[b]]
        logp = iter(_next_logp(s, seqs, owners))
        for b in range(B):
            candidates = []
            for new, score in alive[b]:
                lp = _allowed(s, next(logp))
                candidates += [(score + lp[v], new + [v]) for v in np.nonzero(lp > -np.inf)[0]]
            candidates = sorted(candidates, key=lambda c: -c[0])[:2 * K]
            finished[b] += [(score / np.float32(t + 1) ** length_penalty, score, new)
                            for score, new in candidates if new[-1] == eoc_id]
            finished[b] = sorted(finished[b], key=lambda f: -f[0])[:K]
            alive[b] = [(new, score) for score, new in candidates if new[-1] != eoc_id][:K]
    out = np.full((B, T), PAD, np.int32)
    scores = np.zeros(B, np.float32)
    for b in range(B):
        if finished[b]:
            _, scores[b], new = finished[b][0]
        else:  # nothing finished within T tokens: the best live hypothesis
            new, scores[b] = alive[b][0]
        out[b, :len(new)] = new
    return out, scores


def _generate(s, **kw):
    return decoding.generate(s["model"], s["params"], s["tokens"], PROMPT_LENGTHS,
                             vision_features=s["features"], media_mask=s["media_mask"],
                             max_new_tokens=T, pad_id=PAD, **kw)


@pytest.fixture(scope="module")
def greedy(setup):
    """Greedy output without an EOC in sight, and an EOC id chosen from it: the first new
    token (after the first step, before the last) that a row has not emitted before, so
    that this row stops early there while other rows may not."""
    out, scores = _generate(setup, eoc_id=setup["eoc_id"])
    out = np.asarray(out)
    b, t = next((b, t) for b in range(B) for t in range(1, T - 1) if out[b, t] not in out[b, :t])
    return out, np.asarray(scores), int(out[b, t]), (b, t)


# ---- Tests ------------------------------------------------------------------------------------


def test_media_changes_the_logits_of_rows_that_have_media(setup):
    seqs = [list(p) for p in setup["prompts"]]
    before = _next_logp(setup, seqs, range(B))
    other = np.random.default_rng(7).normal(size=setup["features"].shape).astype(np.float32)
    setup_changed = dict(setup, features=other)
    after = _next_logp(setup_changed, seqs, range(B))
    change = np.abs(after - before).max(axis=-1)
    assert change[0] > 1e-2 and change[2] > 1e-2
    assert change[1] == 0.0  # row 1 has no media: its cross-attention output is exactly zero


def test_greedy_with_cache_equals_full_forward_reference(setup, greedy):
    out, scores, _, _ = greedy
    ref_out, ref_scores = _reference_greedy(setup, setup["eoc_id"])
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)


def test_eoc_stops_and_pads_without_recompiling(setup, greedy):
    out_free, scores_free, eoc_id, (row, step) = greedy
    compiled = decoding._generate_jit._cache_size()
    out, scores = _generate(setup, eoc_id=eoc_id)
    out, scores = np.asarray(out), np.asarray(scores)
    assert decoding._generate_jit._cache_size() == compiled  # eoc_id is traced, not static
    for b in range(B):
        hits = np.nonzero(out_free[b] == eoc_id)[0]
        stop = hits[0] + 1 if hits.size else T
        np.testing.assert_array_equal(out[b, :stop], out_free[b, :stop])
        np.testing.assert_array_equal(out[b, stop:], PAD)
    assert out[row, step] == eoc_id and np.all(out[row, step + 1:] == PAD)
    assert any(eoc_id not in out_free[b] for b in range(B))  # and some row runs to the end
    ref_out, ref_scores = _reference_greedy(setup, eoc_id)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
    assert scores[row] > scores_free[row]  # fewer (negative) log-probs summed


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_with_cache_equals_full_forward_reference(setup, greedy, length_penalty):
    eoc_id = greedy[2]
    out, scores = _generate(setup, eoc_id=eoc_id, beam_size=K, length_penalty=length_penalty)
    out, scores = np.asarray(out), np.asarray(scores)
    ref_out, ref_scores = _reference_beam(setup, eoc_id, length_penalty)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
    assert np.any(out[:, :-1] == eoc_id)  # some hypothesis finished early: EOC path exercised


def test_score_continuations_equals_full_forward_log_likelihood(setup, greedy):
    """Each prompt with three candidate continuations (the greedy one, and two random
    ones of unequal length), scored in one batch of B·K rows."""
    out, greedy_scores = greedy[:2]
    rng = np.random.default_rng(3)
    tokens = np.full((B * K, L + T), PAD, np.int32)
    mask = np.zeros_like(tokens)
    prompt_lengths = np.repeat(PROMPT_LENGTHS, K)
    expected = np.zeros(B * K)
    for i in range(B * K):
        b, n = i // K, PROMPT_LENGTHS[i // K]
        cont = out[b] if i % K == 0 else rng.integers(1, 64, size=2 + i % K * 2)
        tokens[i, :n] = setup["prompts"][b]
        tokens[i, n:n + len(cont)] = cont
        mask[i, n:n + len(cont)] = 1
        seq = list(setup["prompts"][b])
        for token in cont:  # one full forward per scored token, over the prefix only
            expected[i] += _next_logp(setup, [seq], [b])[0, token]
            seq.append(int(token))
    scores = decoding.score_continuations(
        setup["model"], setup["params"], tokens, prompt_lengths, mask,
        vision_features=setup["features"][np.repeat(np.arange(B), K)],
        media_mask=setup["media_mask"][np.repeat(np.arange(B), K)],
    )
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=0, atol=1e-5)
    # The cached generation's own scores agree with the full forward's.
    np.testing.assert_allclose(np.asarray(scores)[::K], greedy_scores, rtol=0, atol=1e-5)


def test_bad_inputs_fail_before_compiling(setup):
    s = setup
    with pytest.raises(ValueError, match=r"prompt_lengths\[1\]=0"):
        decoding.generate(s["model"], s["params"], s["tokens"], np.array([10, 0, 4]),
                          vision_features=s["features"], media_mask=s["media_mask"],
                          max_new_tokens=T, eoc_id=s["eoc_id"])
    with pytest.raises(ValueError, match="lm.max_length"):
        decoding.generate(s["model"], s["params"], s["tokens"], PROMPT_LENGTHS,
                          vision_features=s["features"], media_mask=s["media_mask"],
                          max_new_tokens=T + 1, eoc_id=s["eoc_id"])
    with pytest.raises(ValueError, match="eoc_id"):
        _generate(s, eoc_id=s["image_id"])
    with pytest.raises(ValueError, match="each media needs exactly one"):
        decoding.generate(s["model"], s["params"], s["tokens"], PROMPT_LENGTHS,
                          vision_features=s["features"], media_mask=np.ones((B, N), np.int32),
                          max_new_tokens=T, eoc_id=s["eoc_id"])
    with pytest.raises(ValueError, match="inside the prompt"):
        decoding.score_continuations(s["model"], s["params"], s["tokens"], PROMPT_LENGTHS,
                                     np.ones((B, L), np.int32), vision_features=s["features"],
                                     media_mask=s["media_mask"])
