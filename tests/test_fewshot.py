"""Few-shot harness: prompt tokens, support selection, close-ended ranking, and
flamingo-eval end to end on a tiny checkpoint (SPEC §7, §8)."""

import glob
import json
import os

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import synthetic_eval, synthetic_scenes, tokenizer, train_tokenizer
from experiments import demo
from flamingo_jax import decoding, sharding
from flamingo_jax import eval as eval_cli
from flamingo_jax.checkpointing import Checkpointer
from flamingo_jax.evaluation import cider, datasets, fewshot, prompts, vqa_accuracy
from flamingo_jax.models.flamingo import build_flamingo
from flamingo_jax.trainer import Trainer

STEP = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    paths = synthetic_eval.write_all(str(root / "eval"), seed=0, image_size=32, num_support=6,
                                     num_query=4, num_per_class=(2, 1), caption_max_shapes=1)
    corpus = root / "corpus.txt"
    lines = synthetic_scenes.vocabulary_sentences()
    lines += [f"Question: What colour is the {s}? Answer: {c}"
              for s in synthetic_scenes.SHAPES for c in synthetic_scenes.COLOURS]
    corpus.write_text("\n".join(lines) + "\n")
    spm = train_tokenizer.train_sentencepiece([str(corpus)], str(root / "spm"), vocab_size=400,
                                             model_type="bpe")
    return paths, spm


@pytest.fixture(scope="module")
def vocab(files):
    return tokenizer.load_vocabulary(files[1])


def _config(files, **task_overrides):
    paths, spm = files
    config = demo.get_config()
    config.model.lm.vocab_size = tokenizer.load_vocabulary(spm).base_vocab_size
    config.model.lm.update(num_layers=1, dim=64, num_heads=2, num_kv_heads=1, mlp_dim=128,
                           max_length=128)
    config.model.resampler.update(num_layers=1, dim=64, num_heads=2, head_dim=32,
                                  num_latents=8)
    config.model.xattn.update(every=1, num_heads=2, head_dim=32)
    config.input.update(image_size=32, num_media=2, text_length=32, batch_size=8)
    config.data.tokenizer = spm
    config.eval.batch_size = 8
    config.eval.length_bucket = 64  # captioning and VQA prompts share compiled decoding
    config.eval.tasks = synthetic_eval.task_configs(paths, **task_overrides)
    return config


def _examples(n, kind="captioning"):
    out = []
    for i in range(n):
        scene = synthetic_scenes.random_scene(np.random.default_rng([5, i]), max_shapes=1)
        shape = scene.shapes[0]
        out.append(datasets.EvalExample(
            id=f"e{i}", media=(f"img{i}.jpg",), question=f"What colour is the {shape.shape}?",
            references=(synthetic_scenes.caption(scene), "unused") if kind == "captioning"
            else (shape.colour,) * 9 + ("white",),
            label=i % 4))
    return out


def _sp(vocab, text):
    """Plain SentencePiece ids, independent of FlamingoVocabulary's special-token split."""
    return list(vocab.tokenizer.EncodeAsIds(text))


def test_prompt_tokens_zero_and_four_shots(vocab):
    supports, query = _examples(5)[:4], _examples(5)[4]
    builder = fewshot.PromptBuilder(vocab, "captioning",
                                    prompts.PromptTemplate.for_kind("captioning"))
    img, eoc, bos = vocab.image_id, vocab.eoc_id, vocab.bos_id
    row = builder.prompt(supports, query)
    expected = [bos]
    for s in supports:
        expected += [img] + _sp(vocab, "Output: " + s.references[0]) + [eoc]
    expected += [img] + _sp(vocab, "Output:")
    assert row.tokens == expected
    assert row.media == [s.media for s in supports] + [query.media]
    assert row.continuation_start == len(expected)
    # Zero-shot: two text-only examples, only the query's image.
    row = builder.prompt(supports[:2], query, with_images=False)
    assert row.tokens == ([bos] + _sp(vocab, "Output: " + supports[0].references[0]) + [eoc]
                          + _sp(vocab, "Output: " + supports[1].references[0]) + [eoc]
                          + [img] + _sp(vocab, "Output:"))
    assert row.media == [query.media]

    # VQA: question filled, the most common answer as the support's target.
    vqa = fewshot.PromptBuilder(vocab, "vqa", prompts.PromptTemplate.for_kind("vqa"))
    s, q = _examples(2, "vqa")
    row = vqa.prompt([s], q)
    assert row.tokens == ([bos, img] + _sp(vocab, f"Question: {s.question} Answer: "
                                                  f"{s.references[0]}")
                          + [eoc, img] + _sp(vocab, f"Question: {q.question} Answer:"))
    # Close-ended: the candidate's tokens and <EOC> follow the prompt and are scored.
    classes = fewshot.PromptBuilder(vocab, "classification",
                                    prompts.PromptTemplate.for_kind("classification"),
                                    class_names=synthetic_scenes.SHAPES)
    prompt = classes.prompt([s], q)
    scored = classes.with_continuation(prompt, q, "diamond")
    full = _sp(vocab, "Output: diamond")
    assert full[:len(_sp(vocab, "Output:"))] == _sp(vocab, "Output:")
    assert scored.tokens == prompt.tokens + full[len(_sp(vocab, "Output:")):] + [eoc]
    assert scored.continuation_start == len(prompt.tokens)


def test_templates_are_checked_and_overridable():
    custom = prompts.PromptTemplate.for_kind("captioning", "<image>A photo of {caption}.<EOC>")
    assert custom.query({"caption": "x"}) == "<image>A photo of"
    assert custom.continuation("a dog") == " a dog.<EOC>"
    for bad in ("<image>{answer}<EOC>", "Output: {caption}<EOC>",
                "<image>{caption} and {caption}", "<image>{caption} {question}"):
        with pytest.raises(ValueError, match="config.eval.prompts.captioning"):
            prompts.PromptTemplate.for_kind("captioning", bad, "config.eval.prompts.captioning")


class _StubModel:
    vision = object()


def _evaluator(vocab, **kwargs):
    return fewshot.FewShotEvaluator(_StubModel(), {}, vocab, image_size=32, batch_size=4,
                                    max_length=128, seed=0, progress=False, **kwargs)


def _task(**kw):
    base = dict(kind="captioning", format="karpathy",
                support=dict(path="s.json", images_dir="."),
                query=dict(path="q.json", images_dir="."))
    return fewshot.TaskConfig.from_dict("t", {**base, **kw})


def test_support_selection_random_seeded_and_rices_most_similar_last(vocab):
    support = datasets.EvalSet(_examples(12), {})
    queries = _examples(3)
    positions = np.arange(3)
    evaluator = _evaluator(vocab)
    task = _task(selection="random", trials=3)
    draw = lambda ev, shots, trial: ev.select_supports(  # noqa: E731
        task, shots, trial, support, queries, positions, False)
    first = draw(evaluator, 4, 0)
    assert first.shape == (3, 4) and all(len(set(r)) == 4 for r in first)
    np.testing.assert_array_equal(first, draw(_evaluator(vocab), 4, 0))  # same seed
    assert not np.array_equal(first, draw(evaluator, 4, 1))  # another trial
    assert draw(evaluator, 0, 0).shape == (3, fewshot.ZERO_SHOT_EXAMPLES)
    assert task.num_trials(4) == 3

    # RICES on constructed features: support j has similarity cos(angle_j) to query q.
    angles = np.linspace(0.0, 1.5, 12)
    rng = np.random.default_rng(0)
    order = [rng.permutation(12) for _ in range(3)]  # per query, support j's rank
    support_f = np.zeros((12, 6), np.float32)
    query_f = np.zeros((3, 6), np.float32)
    for q in range(3):
        query_f[q, 2 * q] = 1.0
    support_f[:, 5] = 1.0  # a shared direction keeps every similarity distinct from 0
    for j in range(12):
        q = j % 3  # support j belongs to query j % 3's direction
        support_f[j, 2 * q] = 4.0 * np.cos(angles[order[q][j]])
    features = {id(support.examples): support_f, id(queries): query_f}
    evaluator.vision_features = lambda examples, num_frames: features[id(examples)]
    rices_task = _task(selection="rices", trials=3)
    chosen = evaluator.select_supports(rices_task, 4, 0, support, queries, positions, False)
    sims = (query_f / np.linalg.norm(query_f, axis=1, keepdims=True)) @ (
        support_f / np.linalg.norm(support_f, axis=1, keepdims=True)).T
    for q in range(3):
        np.testing.assert_array_equal(chosen[q], np.argsort(sims[q])[-4:])  # most similar last
        assert np.all(np.diff(sims[q][chosen[q]]) > 0)
    assert rices_task.num_trials(4) == 1 and rices_task.num_trials(0) == 3
    # The prompt lists the supports in that order, the nearest right before the query.
    builder = fewshot.PromptBuilder(vocab, "captioning",
                                    prompts.PromptTemplate.for_kind("captioning"))
    row = builder.prompt([support.examples[j] for j in chosen[0]], queries[0])
    assert row.media[:-1] == [support.examples[j].media for j in chosen[0]]
    assert row.media[-2] == support.examples[int(np.argmax(sims[0]))].media
    # Queries drawn from the support set itself never see their own example.
    same = fewshot.rices_supports(support_f, support_f, 3, np.arange(12), same_set=True)
    assert all(j not in row_ for j, row_ in enumerate(same))


def test_task_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"config.eval.tasks.t.kind='ocr'; allowed"):
        _task(kind="ocr")
    with pytest.raises(ValueError, match=r"t.format='vqav2'; allowed for kind 'captioning'"):
        _task(format="vqav2")
    with pytest.raises(ValueError, match=r"t.selection='nearest'"):
        _task(selection="nearest")
    with pytest.raises(ValueError, match=r"t.ensemble=2: prompt ensembling"):
        _task(ensemble=2)
    with pytest.raises(ValueError, match=r"unknown keys \['beams'\]"):
        _task(beams=3)
    with pytest.raises(ValueError, match=r"t.support: format 'karpathy' takes"):
        _task(support=dict(path="x"))


def test_close_ended_ranking_picks_highest_score(vocab):
    """Constructed scores: a table [query, candidate] plus a shift that depends on the
    order of the support examples. The harness must average the shift over the ensemble's
    orderings (leaving the ranking alone) and pick each query's best candidate."""
    shapes = synthetic_scenes.SHAPES
    support = datasets.EvalSet(_examples(6), {}, class_names=shapes)
    queries = datasets.EvalSet(_examples(4), {}, class_names=shapes)
    table = np.array([[0.9, 0.1, 0.3, 0.2], [0.5, 0.1, 0.2, 0.0],
                      [0.0, 0.1, 0.2, 0.7], [0.3, 0.35, 0.1, 0.0]])  # [query, candidate]
    cand_of = {tuple(_sp(vocab, "Output: " + c)[len(_sp(vocab, "Output:")):]): k
               for k, c in enumerate(shapes)}
    query_of = {}  # prompt tokens -> query index

    def shift(prompt):  # order-dependent, the same for every candidate of one prompt
        return 1e-3 * float(np.sum(np.arange(len(prompt)) * np.asarray(prompt) % 97))

    def score_fn(model, params, tokens, prompt_lengths, mask, *, images, media_mask):
        out = []
        for row, start, m in zip(tokens, prompt_lengths, mask):
            prompt, cont = tuple(row[:start]), tuple(row[m.astype(bool)][:-1])  # no <EOC>
            out.append(table[query_of[prompt], cand_of[cont]] + shift(prompt))
        return np.array(out)

    ev = _evaluator(vocab, score_fn=score_fn)
    ev._batches = lambda rows, length, frames, desc: (  # no image files: tokens only
        (len(rows[i:i + 4]), _token_batch(rows[i:i + 4], length, vocab))
        for i in range(0, len(rows), 4))
    task = _task(kind="classification", format="image_folder", support=dict(root="s"),
                 query=dict(root="q"), ensemble=3, shots=(3,), trials=1)
    template = prompts.PromptTemplate.for_kind("classification")
    builder = fewshot.PromptBuilder(vocab, "classification", template, shapes)
    chosen = ev.select_supports(task, 3, 0, support, queries.examples, np.arange(4), False)
    rng = np.random.default_rng([0, 0, 3, 11])  # the harness's ensemble orderings
    mean_shift = []
    for q, idx in enumerate(chosen):
        orders = [np.arange(3)] + [rng.permutation(3) for _ in range(2)]
        prompts_q = [tuple(builder.prompt([support.examples[idx[o]] for o in order],
                                          queries.examples[q]).tokens) for order in orders]
        query_of.update({p: q for p in prompts_q})
        mean_shift.append(np.mean([shift(p) for p in prompts_q]))
    assert len({p for p in query_of}) > 4  # the orderings gave different prompts

    results, records = ev.evaluate_task(task, template, support, queries)
    np.testing.assert_allclose([r["scores"] for r in records],
                               table + np.array(mean_shift)[:, None], atol=1e-9)
    best = np.argmax(table, axis=1)
    assert [r["prediction"] for r in records] == [shapes[b] for b in best]
    labels = np.array([q.label for q in queries.examples])
    assert results == {"3": {"top1": float(np.mean(best == labels))}}
    np.testing.assert_array_equal(fewshot.rank_candidates(np.array([[1.0, 3.0, 3.0]])), [1])


def _token_batch(rows, length, vocab):
    b = len(rows)
    tokens = np.full((b, length), vocab.pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r.tokens)] = r.tokens
        mask[i, r.continuation_start:len(r.tokens)] = 1
    return dict(tokens=tokens, prompt_lengths=np.array([r.continuation_start for r in rows]),
                continuation_mask=mask, images=None, media_mask=None)


def _tiny_state(trainer, step):
    """A train state with seeded random parameters in the trainer's shardings (built on the
    host: compiling the model's initializer would cost far more than this test)."""
    abstract = jax.eval_shape(trainer.init_state)
    rng = np.random.default_rng(0)

    def value(path, leaf, sharding):
        name = path.rsplit("/", 1)[-1]
        if name in ("scale", "gain"):
            x = np.ones(leaf.shape)
        elif name == "bias":
            x = np.zeros(leaf.shape)
        elif name.startswith("alpha_"):  # open the tanh gates so the images matter
            x = np.full(leaf.shape, 0.5)
        else:
            x = rng.normal(0.0, 0.05 if name != "skip_gain" else 0.2, leaf.shape)
        return jax.device_put(x.astype(leaf.dtype), sharding)

    shardings = trainer.state_shardings
    trainable = {k: value(k, v, shardings.trainable[k]) for k, v in abstract.trainable.items()}
    frozen = {k: value(k, v, shardings.frozen[k]) for k, v in abstract.frozen.items()}
    opt_state = jax.device_put(trainer.tx.init(trainable), shardings.opt_state)
    zero = jnp.zeros((), jnp.int32)
    return abstract.replace(step=jnp.asarray(step, jnp.int32), trainable=trainable,
                            frozen=frozen, opt_state=opt_state,
                            rng=jax.random.PRNGKey(0), skipped_steps=zero,
                            consecutive_skips=zero)


@pytest.fixture(scope="module")
def checkpoint(files, tmp_path_factory):
    """(workdir, host params) of a tiny model's train state saved at STEP on 8 devices."""
    workdir = str(tmp_path_factory.mktemp("run"))
    trainer = Trainer(_config(files))
    state = _tiny_state(trainer, STEP)
    checkpointer = Checkpointer(workdir, keep=2)
    checkpointer.save(STEP, state, {})
    checkpointer.wait()
    checkpointer.close()
    return workdir, jax.device_get(state.params())


E2E_SHOTS = (0, 2)


@pytest.fixture(scope="module")
def evaluated(files, checkpoint):
    """flamingo-eval's work on the checkpoint, restored onto another mesh than it was saved
    from."""
    workdir, _ = checkpoint
    config = _config(files, shots=E2E_SHOTS, trials=2, max_new_tokens=6, beam_size=2)
    config.eval.tasks.synthetic_colour_vqa.selection = "rices"
    config.eval.tasks.synthetic_shapes.shots = (2,)  # the 0-shot path is the captions' one
    config.mesh.update(data=2, fsdp=4, tensor=1)  # saved with fsdp=8
    step, results = eval_cli.evaluate_checkpoint(config, workdir, progress=False)
    with open(os.path.join(workdir, "eval", f"step_{STEP}.json")) as f:
        written = json.load(f)
    with open(os.path.join(workdir, "eval", f"step_{STEP}_predictions.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return config, step, results, written, records, os.path.join(workdir, "eval")


def test_restore_onto_another_mesh(files, checkpoint):
    workdir, saved = checkpoint
    config = _config(files)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    step, params, mesh = eval_cli.restore_params(config, workdir)
    assert step == STEP and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                           params, saved)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 .* \[3\]"):
        eval_cli.restore_params(config, workdir, step=7)


def test_flamingo_eval_writes_results_that_match_its_predictions(evaluated):
    config, step, results, written, records, eval_dir = evaluated
    assert step == STEP
    assert written["step"] == STEP and written["results"] == results
    assert set(results) == {"synthetic_captions", "synthetic_colour_vqa", "synthetic_shapes"}
    metric = {"synthetic_captions": "cider", "synthetic_colour_vqa": "vqa_accuracy",
              "synthetic_shapes": "top1"}
    for task, per_shots in results.items():
        assert set(per_shots) == {str(s) for s in config.eval.tasks[task].shots}
        m = metric[task]
        for shots, values in per_shots.items():
            if task == "synthetic_colour_vqa" and shots != "0":  # RICES: one trial
                assert set(values) == {m}
                continue
            assert set(values) == {m, f"{m}_std", f"{m}/trial_0", f"{m}/trial_1"}
            assert values[m] == pytest.approx((values[f"{m}/trial_0"]
                                               + values[f"{m}/trial_1"]) / 2, abs=1e-12)
        # Every metric equals the metric recomputed from the written predictions.
        for shots, values in per_shots.items():
            for trial in sorted({r["trial"] for r in records
                                 if r["task"] == task and r["shots"] == int(shots)}):
                rows = [r for r in records if r["task"] == task and r["shots"] == int(shots)
                        and r["trial"] == trial]
                assert len(rows) == 4
                preds = [r["prediction"] for r in rows]
                if task == "synthetic_captions":
                    expected = cider.cider(preds, [r["references"] for r in rows])[0]
                elif task == "synthetic_colour_vqa":
                    expected = vqa_accuracy.mean_vqa_accuracy(
                        preds, [r["references"] for r in rows])[0]
                else:
                    expected = np.mean([np.argmax(r["scores"]) == r["label"] for r in rows])
                key = f"{m}/trial_{trial}" if f"{m}/trial_{trial}" in values else m
                assert values[key] == pytest.approx(expected, abs=1e-12)
    assert written["skipped"]["synthetic_captions"] == {"support": {}, "query": {}}
    # RICES: the 2-shot VQA supports are each query's two nearest by the cached vision
    # features, the most similar last; zero-shot prompts hold two text-only examples.
    features = os.path.join(eval_dir, "features")
    support_f = np.load(glob.glob(os.path.join(features, "synthetic_colour_vqa-support-*"))[0])
    query_f = np.load(glob.glob(os.path.join(features, "synthetic_colour_vqa-query-*"))[0])
    task = next(t for t in eval_cli.task_configs(config) if t.name == "synthetic_colour_vqa")
    support_ids = [e.id for e in datasets.read(task.format, **task.support).examples]
    query_ids = [e.id for e in datasets.read(task.format, **task.query).examples]
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = unit(query_f) @ unit(support_f).T  # [Q, S]
    rices_rows = [r for r in records if r["task"] == task.name and r["shots"] == 2]
    assert len(rices_rows) == 4
    for r in rices_rows:
        nearest = np.argsort(sims[query_ids.index(r["id"])])[-2:]
        assert r["supports"] == [support_ids[j] for j in nearest]
    assert all(len(r["supports"]) == fewshot.ZERO_SHOT_EXAMPLES
               for r in records if r["shots"] == 0)
    # The decoded captions vary with the image: the model reads the media.
    captions = [r["prediction"] for r in records if r["task"] == "synthetic_captions"]
    assert len(set(captions)) > 1


def test_candidate_scores_are_continuation_log_likelihoods(evaluated, vocab, checkpoint):
    """The classification scores flamingo-eval wrote are the log-likelihoods of each
    candidate's tokens and <EOC> after the prompt its record names, built here by hand
    (decoding.score_continuations, which test_decoding checks against a full forward)."""
    config, _, _, _, records, _ = evaluated
    task = next(t for t in eval_cli.task_configs(config) if t.name == "synthetic_shapes")
    support = {e.id: e for e in datasets.read(task.format, **task.support).examples}
    query = datasets.read(task.format, **task.query)
    names = query.class_names
    img, eoc = vocab.image_id, vocab.eoc_id
    got = [r for r in records if r["task"] == task.name and r["trial"] == 0]
    assert [r["id"] for r in got] == [e.id for e in query.examples]
    tokens = np.zeros((len(got) * len(names), 64), np.int32)
    mask = np.zeros_like(tokens)
    starts, images = [], []
    for q, record in zip(query.examples, got):
        prefix = [vocab.bos_id]
        for sid in record["supports"]:
            prefix += [img] + _sp(vocab, "Output: " + names[support[sid].label]) + [eoc]
        prefix += [img] + _sp(vocab, "Output:")
        media = [support[sid].media for sid in record["supports"]] + [q.media]
        for name in names:
            i = len(starts)
            row = prefix + _sp(vocab, "Output: " + name)[len(_sp(vocab, "Output:")):] + [eoc]
            tokens[i, :len(row)] = row
            mask[i, len(prefix):len(row)] = 1
            starts.append(len(prefix))
            images.append(np.stack([fewshot.media.load_media(m, 32, 1) for m in media]))
    _, params, mesh = eval_cli.restore_params(config, checkpoint[0])
    model = build_flamingo(config.model)
    expected = []
    with jax.set_mesh(mesh), flax.linen.logical_axis_rules(sharding.logical_rules(config)):
        for b in range(0, len(starts), 8):  # the harness's batch shape: its compiled program
            expected.extend(np.asarray(decoding.score_continuations(
                model, params, tokens[b:b + 8], np.array(starts[b:b + 8]), mask[b:b + 8],
                images=np.stack(images[b:b + 8]), media_mask=np.ones((8, 3), np.int32))))
    expected = np.array(expected).reshape(len(got), len(names))
    np.testing.assert_allclose([r["scores"] for r in got], expected, rtol=0, atol=1e-6)
    assert [r["prediction"] for r in got] == [names[i] for i in np.argmax(expected, axis=1)]
