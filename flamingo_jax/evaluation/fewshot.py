"""Few-shot in-context evaluation (SPEC §7): support and query sets, prompts, decoding and
ranking, metrics.

For each task and each number of shots k, every query gets a prompt of k support examples
(`prompts.PromptTemplate`) followed by its own example cut before the target:
- supports are drawn at random (seeded; `trials` draws, reported as the mean and per
  trial) or by RICES (nearest by mean-pooled frozen vision-encoder features, cached; the
  most similar last, right before the query);
- zero-shot prompts hold two random text-only support examples (the paper's protocol;
  RICES is not used there, since the neighbours' texts would describe the query image);
- open-ended kinds (captioning, VQA, video) are decoded with `decoding.generate` (beam 3
  by default; beam_size=1 is greedy) and scored with CIDEr or VQA accuracy;
- close-ended kinds (classification, HatefulMemes) rank candidate targets by their
  log-likelihood (`decoding.score_continuations`), optionally averaged over `ensemble`
  orderings of the support examples (prompt ensembling), and are scored with top-1
  accuracy or ROC-AUC.

Batches have fixed shapes within a (task, shots) run: prompts are right-padded to one
length (a multiple of `length_bucket`, at most what the LM allows), every row holds k + 1
media (1 for zero-shot), and the last batch is filled with copies of its last row, so
decoding compiles once per (task, shots), and tasks whose shapes agree share programs.
Metric scales: CIDEr as pycocoevalcap computes it (paper's numbers / 100); accuracies and
ROC-AUC in [0, 1].
"""

import dataclasses
import hashlib
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from flamingo_jax import decoding
from flamingo_jax.evaluation import cider as cider_lib
from flamingo_jax.evaluation import classification_metrics, datasets, media, prompts, rices
from flamingo_jax.evaluation import vqa_accuracy as vqa_lib

KINDS = prompts.KINDS
OPEN_ENDED = ("captioning", "vqa", "video_captioning", "video_qa")
CLOSE_ENDED = ("classification", "hateful_memes")
SELECTIONS = ("random", "rices")
ZERO_SHOT_EXAMPLES = 2  # text-only examples in a zero-shot prompt


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """One entry of `config.eval.tasks`; unset fields come from `config.eval.task_defaults`."""

    name: str
    kind: str  # one of KINDS
    format: str  # a datasets.FORMATS name allowed for the kind
    support: Mapping[str, Any]  # the reader's arguments for the support set
    query: Mapping[str, Any]  # ... and for the query set
    shots: tuple[int, ...] = (0, 4, 8, 16, 32)
    num_queries: int = 0  # 0: every query; else a seeded subset of this size
    trials: int = 3  # random support draws (RICES runs once; zero-shot uses `trials`)
    selection: str = "random"  # or "rices"
    max_new_tokens: int = 20
    beam_size: int = 3  # 1: greedy
    length_penalty: float = 0.0
    ensemble: int = 1  # close-ended: support orderings whose log-likelihoods are averaged
    num_frames: int = 1  # frames per media (video tasks)
    prompt: str = ""  # template override; "" = config.eval.prompts.<kind>

    @classmethod
    def from_dict(cls, name: str, task: Mapping[str, Any],
                  defaults: Mapping[str, Any] | None = None) -> "TaskConfig":
        """Builds and checks the task; every error names the config key and allowed values."""
        where = f"config.eval.tasks.{name}"
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        merged = {**dict(defaults or {}), **dict(task)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
        missing = sorted({"kind", "format", "support", "query"} - set(merged))
        if missing:
            raise ValueError(f"{where}: missing keys {missing}")
        merged["shots"] = tuple(int(s) for s in merged.get("shots", cls.shots))
        merged["support"] = dict(merged["support"])
        merged["query"] = dict(merged["query"])
        cfg = cls(name=name, **merged)
        cfg.check(where)
        return cfg

    def check(self, where: str) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{where}.kind={self.kind!r}; allowed: {KINDS}")
        allowed_formats = datasets.KIND_FORMATS[self.kind]
        if self.format not in allowed_formats:
            raise ValueError(f"{where}.format={self.format!r}; allowed for kind {self.kind!r}: "
                             f"{allowed_formats}")
        datasets.check_reader_args(self.format, dict(self.support), f"{where}.support")
        datasets.check_reader_args(self.format, dict(self.query), f"{where}.query")
        if self.selection not in SELECTIONS:
            raise ValueError(f"{where}.selection={self.selection!r}; allowed: {SELECTIONS}")
        if not self.shots or any(s < 0 for s in self.shots):
            raise ValueError(f"{where}.shots={self.shots}: give one or more shot counts >= 0")
        for key in ("trials", "max_new_tokens", "beam_size", "ensemble", "num_frames"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}.{key}={getattr(self, key)} must be >= 1")
        if self.num_queries < 0:
            raise ValueError(f"{where}.num_queries={self.num_queries} must be >= 0 (0 = all)")
        if self.ensemble > 1 and self.kind not in CLOSE_ENDED:
            raise ValueError(f"{where}.ensemble={self.ensemble}: prompt ensembling is for the "
                             f"close-ended kinds {CLOSE_ENDED}; set it to 1")
        if self.kind not in ("video_captioning", "video_qa") and self.num_frames != 1:
            raise ValueError(f"{where}.num_frames={self.num_frames}: image tasks take 1 frame")

    def num_trials(self, shots: int) -> int:
        return 1 if self.selection == "rices" and shots > 0 else self.trials


# ------------------------------------------------------------------------- prompts


@dataclasses.dataclass
class Row:
    """One model input: token ids (the prompt, then the scored continuation if any) and
    the media behind its `<image>` tokens, in order."""

    tokens: list[int]
    media: list[tuple[str, ...]]
    continuation_start: int  # = len(tokens) for generation


class PromptBuilder:
    """Token ids of few-shot prompts for one task (support example encodings cached)."""

    def __init__(self, vocab, kind: str, template: prompts.PromptTemplate,
                 class_names: Sequence[str] = (),
                 hateful_answers: Sequence[str] = prompts.HATEFUL_ANSWERS):
        self.vocab = vocab
        self.kind = kind
        self.template = template
        self.class_names = tuple(class_names)
        self.hateful_answers = tuple(hateful_answers)
        self._support_cache: dict[tuple[str, bool], list[int]] = {}

    def fields(self, example: datasets.EvalExample) -> dict[str, str]:
        return prompts.example_fields(self.kind, example, self.class_names, self.hateful_answers)

    def _support_ids(self, example: datasets.EvalExample, with_image: bool) -> list[int]:
        key = (example.id, with_image)
        if key not in self._support_cache:
            text = self.template.example(self.fields(example), with_image)
            self._support_cache[key] = list(self.vocab.encode(text))
        return self._support_cache[key]

    def prompt(self, supports: Sequence[datasets.EvalExample], query: datasets.EvalExample,
               with_images: bool = True) -> Row:
        """`<BOS>` + the support examples (text only when not with_images) + the query's
        example up to its target."""
        ids = [self.vocab.bos_id]
        for s in supports:
            ids.extend(self._support_ids(s, with_images))
        ids.extend(self.vocab.encode(self.template.query(self.fields(query))))
        media_list = ([s.media for s in supports] if with_images else []) + [query.media]
        return Row(ids, media_list, len(ids))

    def candidates(self) -> list[str]:
        """Target values ranked by a close-ended task."""
        if self.kind == "classification":
            return list(self.class_names)
        if self.kind == "hateful_memes":
            return list(self.hateful_answers)
        raise ValueError(f"kind {self.kind!r} is open-ended; it has no candidates")

    def with_continuation(self, row: Row, query: datasets.EvalExample, value: str) -> Row:
        """`row` (a prompt) followed by the tokens of the target `value` and what follows
        it in the template (`<EOC>`): the span whose log-likelihood ranks `value`."""
        query_text = self.template.query(self.fields(query))
        prefix = list(self.vocab.encode(query_text))
        full = list(self.vocab.encode(query_text + self.template.continuation(value)))
        if full[:len(prefix)] != prefix:
            raise ValueError(
                f"prompt template {self.template.template!r}: the text before "
                f"{{{self.template.target}}} does not tokenize to a prefix of the filled "
                f"example (candidate {value!r}); end it with a space or punctuation")
        return Row(row.tokens + full[len(prefix):], row.media, len(row.tokens))


# ------------------------------------------------------------------------- support selection


def subset_indices(num: int, num_queries: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of `num_queries` of `num` items (all if 0)."""
    if num_queries == 0 or num_queries >= num:
        return np.arange(num)
    return np.sort(np.random.default_rng([seed, 7]).permutation(num)[:num_queries])


def random_supports(query_positions: np.ndarray, num_support: int, k: int, *, seed: int,
                    trial: int, same_set: bool) -> np.ndarray:
    """[Q, k] random support indices. same_set: the queries are support examples
    `query_positions` themselves and never get their own example as support."""
    if not same_set:
        return rices.random_select(len(query_positions), num_support, k, seed=seed,
                                   trial=trial)
    table = rices.random_select(num_support, num_support, k, seed=seed, trial=trial,
                                exclude_self=True)
    return table[query_positions]


def rices_supports(query_features: np.ndarray, support_features: np.ndarray, k: int,
                   query_positions: np.ndarray, same_set: bool) -> np.ndarray:
    """[Q, k] nearest supports, most similar last; same_set drops each query itself."""
    if not same_set:
        return rices.rices_select(query_features, support_features, k)
    near = rices.rices_select(query_features, support_features, k + 1)  # [Q, k + 1]
    out = np.empty((len(near), k), near.dtype)
    for i, (row, own) in enumerate(zip(near, query_positions)):
        kept = [j for j in row if j != own]
        out[i] = kept[-k:] if k else []
    return out


# ------------------------------------------------------------------------- metrics


def video_qa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy with several annotators; exact match after the VQA answer
    normalization when there is a single answer (MSRVTT-QA, MSVD-QA)."""
    if len(answers) > 1:
        return vqa_lib.vqa_accuracy(prediction, answers)
    return float(vqa_lib.normalize_answer(prediction) == vqa_lib.normalize_answer(answers[0]))


def open_ended_metrics(kind: str, predictions: Sequence[str],
                       references: Sequence[Sequence[str]]) -> dict[str, float]:
    if kind in ("captioning", "video_captioning"):
        return {"cider": cider_lib.cider(predictions, references)[0]}
    if kind == "vqa":
        return {"vqa_accuracy": vqa_lib.mean_vqa_accuracy(predictions, references)[0]}
    if kind == "video_qa":
        return {"vqa_accuracy": float(np.mean([video_qa_accuracy(p, a)
                                               for p, a in zip(predictions, references)]))}
    raise ValueError(f"kind {kind!r} is not open-ended")


def close_ended_metrics(kind: str, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """scores [Q, C] mean log-likelihood of each candidate."""
    if kind == "classification":
        return {"top1": classification_metrics.top1_accuracy(scores, labels)}
    if kind == "hateful_memes":  # candidates (no, yes): rank by log p(yes) - log p(no)
        return {"roc_auc": classification_metrics.roc_auc(labels, scores[:, 1] - scores[:, 0])}
    raise ValueError(f"kind {kind!r} is not close-ended")


def rank_candidates(scores: np.ndarray) -> np.ndarray:
    """[Q] index of each query's best candidate (the first on ties), scores [Q, C]."""
    return np.argmax(scores, axis=-1)


# ------------------------------------------------------------------------- the harness


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class FewShotEvaluator:
    """Runs few-shot tasks with one model and parameters.

    model: flamingo_jax.models.flamingo.Flamingo with a vision encoder; params: its nested
    parameter dict (sharded or not). mesh/rules: the mesh and logical-axis rules the
    parameters live on (decoding runs inside them). feature_cache: a rices.FeatureCache
    for RICES features, or None to recompute them. generate_fn / score_fn replace
    decoding.generate / decoding.score_continuations (same signatures).
    """

    def __init__(self, model, params, vocab, *, image_size: int, batch_size: int,
                 max_length: int, length_bucket: int = 32, seed: int = 0, mesh=None, rules=(),
                 feature_cache: rices.FeatureCache | None = None, progress: bool = True,
                 hateful_answers: Sequence[str] = prompts.HATEFUL_ANSWERS,
                 generate_fn: Callable | None = None, score_fn: Callable | None = None):
        if model.vision is None:
            raise ValueError("few-shot evaluation reads images: config.model.vision.variant "
                             "must name a vision encoder (it is None)")
        self.model = model
        self.params = params
        self.vocab = vocab
        self.image_size = image_size
        self.batch_size = batch_size
        self.max_length = max_length
        if length_bucket < 1:
            raise ValueError(f"config.eval.length_bucket={length_bucket} must be >= 1")
        self.length_bucket = length_bucket
        self.seed = seed
        self.mesh = mesh
        self.rules = tuple(rules)
        self.feature_cache = feature_cache
        self.progress = progress
        self.hateful_answers = tuple(hateful_answers)
        self.generate_fn = generate_fn or decoding.generate
        self.score_fn = score_fn or decoding.score_continuations
        self._features_fn = None
        self._fingerprint = None

    # ---- running the model under the parameters' mesh -----------------------------------

    def _in_mesh(self, fn, *args, **kwargs):
        if self.mesh is None:
            return fn(*args, **kwargs)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return fn(*args, **kwargs)

    def vision_features(self, examples: Sequence[datasets.EvalExample],
                        num_frames: int) -> np.ndarray:
        """[n, D] mean-pooled (over positions and frames) vision-encoder features."""
        if self._features_fn is None:
            vision = self.model.vision

            def features(vision_params, images):  # [B, T, S, S, 3] -> [B, D]
                b, t = images.shape[:2]
                fmap = vision.apply({"params": vision_params},
                                    images.reshape((b * t,) + images.shape[2:]))
                return jnp.mean(fmap.astype(jnp.float32).reshape(b, -1, fmap.shape[-1]), axis=1)

            self._features_fn = jax.jit(features)
        out = []
        for start in range(0, len(examples), self.batch_size):
            chunk = list(examples[start:start + self.batch_size])
            chunk += [chunk[-1]] * (self.batch_size - len(chunk))
            images = np.stack([media.load_media(e.media, self.image_size, num_frames)
                               for e in chunk])
            feats = self._in_mesh(self._features_fn, self.params["vision"], images)
            out.append(np.asarray(jax.device_get(feats)))
        return np.concatenate(out)[:len(examples)]

    def _cached_features(self, task: TaskConfig, role: str,
                         examples: Sequence[datasets.EvalExample]) -> np.ndarray:
        compute = lambda: self.vision_features(examples, task.num_frames)  # noqa: E731
        if self.feature_cache is None:
            return compute()
        ids = hashlib.md5("\n".join(e.id for e in examples).encode()).hexdigest()[:8]
        name = f"{task.name}-{role}-{self._vision_fingerprint()}-{ids}"
        return self.feature_cache.get_or_compute(name, compute)

    def _vision_fingerprint(self) -> str:
        """A short hash of the vision encoder's parameter names, shapes, dtypes and
        per-parameter sums of |x|: cached features are only reused with the same encoder."""
        if self._fingerprint is None:
            leaves = sorted(jax.tree_util.tree_leaves_with_path(self.params["vision"]),
                            key=lambda kv: jax.tree_util.keystr(kv[0]))
            sums = jax.jit(lambda xs: jnp.stack([jnp.sum(jnp.abs(x.astype(jnp.float32)))
                                                 for x in xs]))
            values = self._in_mesh(sums, [x for _, x in leaves])
            digest = hashlib.md5(np.asarray(jax.device_get(values), np.float32).tobytes())
            for path, x in leaves:
                digest.update(f"{jax.tree_util.keystr(path)}{x.shape}{x.dtype}".encode())
            self._fingerprint = digest.hexdigest()[:10]
        return self._fingerprint

    # ---- batches --------------------------------------------------------------------------

    def _row_length(self, rows: Sequence[Row], extra: int) -> int:
        """One padded length for every row of a run: the longest rounded up to a multiple
        of length_bucket, capped so that `extra` generated tokens still fit the LM."""
        longest = max(len(r.tokens) for r in rows)
        if longest + extra > self.max_length:
            raise ValueError(
                f"a prompt of {longest} tokens plus {extra} new tokens exceeds "
                f"model.lm.max_length={self.max_length}; lower the shots or max_new_tokens, "
                "or raise model.lm.max_length")
        return min(_round_up(longest, self.length_bucket), self.max_length - extra)

    def _batches(self, rows: Sequence[Row], length: int, num_frames: int, desc: str):
        """Yields (number of real rows, arrays) with fixed shapes: tokens [B, L] int32,
        prompt_lengths [B] (where the continuation starts), continuation_mask [B, L],
        images [B, N, T, S, S, 3], media_mask [B, N]."""
        num_batches = -(-len(rows) // self.batch_size)
        bar = tqdm(total=num_batches, desc=desc, disable=not self.progress,
                   dynamic_ncols=True)
        for start in range(0, len(rows), self.batch_size):
            chunk = list(rows[start:start + self.batch_size])
            real = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - real)
            tokens = np.full((self.batch_size, length), self.vocab.pad_id, np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            for i, r in enumerate(chunk):
                tokens[i, :len(r.tokens)] = r.tokens
                mask[i, r.continuation_start:len(r.tokens)] = 1
            prompt_lengths = np.array([r.continuation_start for r in chunk], np.int32)
            images = np.stack([np.stack([media.load_media(m, self.image_size, num_frames)
                                         for m in r.media]) for r in chunk])
            media_mask = np.ones(images.shape[:2], np.int32)
            yield real, dict(tokens=tokens, prompt_lengths=prompt_lengths,
                             continuation_mask=mask, images=images, media_mask=media_mask)
            bar.update(1)
        bar.close()

    def _decode_text(self, ids: np.ndarray) -> str:
        out = []
        for i in ids.tolist():
            if i == self.vocab.eoc_id or i == self.vocab.pad_id:
                break
            out.append(i)
        return self.vocab.decode(out).strip()

    def generate(self, rows: Sequence[Row], task: TaskConfig, length: int | None = None,
                 desc: str = "") -> list[str]:
        """Decoded text (up to `<EOC>`) of each prompt row, padded to `length` (default:
        the rows' own)."""
        length = length or self._row_length(rows, task.max_new_tokens)
        texts = []
        for real, b in self._batches(rows, length, task.num_frames, desc):
            out, _ = self._in_mesh(
                self.generate_fn, self.model, self.params, b["tokens"], b["prompt_lengths"],
                images=b["images"], media_mask=b["media_mask"],
                max_new_tokens=task.max_new_tokens, eoc_id=self.vocab.eoc_id,
                pad_id=self.vocab.pad_id, beam_size=task.beam_size,
                length_penalty=task.length_penalty)
            out = np.asarray(jax.device_get(out))
            texts.extend(self._decode_text(out[i]) for i in range(real))
        return texts

    def score(self, rows: Sequence[Row], task: TaskConfig, length: int | None = None,
              desc: str = "") -> np.ndarray:
        """[len(rows)] summed log-probability of each row's continuation, padded to
        `length` (default: the rows' own)."""
        length = length or self._row_length(rows, 0)
        scores = []
        for real, b in self._batches(rows, length, task.num_frames, desc):
            s = self._in_mesh(self.score_fn, self.model, self.params, b["tokens"],
                              b["prompt_lengths"], b["continuation_mask"], images=b["images"],
                              media_mask=b["media_mask"])
            scores.extend(np.asarray(jax.device_get(s), np.float64)[:real])
        return np.array(scores)

    # ---- tasks ----------------------------------------------------------------------------

    def select_supports(self, task: TaskConfig, shots: int, trial: int,
                        support: datasets.EvalSet, queries: Sequence[datasets.EvalExample],
                        query_positions: np.ndarray, same_set: bool) -> np.ndarray:
        """[Q, k] support indices for each query, in prompt order (RICES: most similar last;
        zero-shot: ZERO_SHOT_EXAMPLES random ones, shown text only)."""
        k = shots if shots > 0 else ZERO_SHOT_EXAMPLES
        available = len(support) - (1 if same_set else 0)
        if k > available:
            raise ValueError(f"task {task.name}: {k} support examples per prompt but the "
                             f"support set has {available} usable; lower shots or enlarge it")
        if shots == 0 or task.selection == "random":
            return random_supports(query_positions, len(support), k, seed=self.seed,
                                   trial=trial, same_set=same_set)
        support_features = self._cached_features(task, "support", support.examples)
        query_features = self._cached_features(task, "query", queries)
        return rices_supports(query_features, support_features, k, query_positions, same_set)

    def evaluate_task(self, task: TaskConfig, template: prompts.PromptTemplate,
                      support: datasets.EvalSet, query: datasets.EvalSet
                      ) -> tuple[dict[str, dict[str, float]], list[dict]]:
        """({str(shots): {metric: value}}, prediction records) of one task."""
        positions = subset_indices(len(query), task.num_queries, self.seed)
        queries = [query.examples[i] for i in positions]
        if not queries:
            raise ValueError(f"task {task.name}: the query set is empty "
                             f"(skipped records: {query.skipped})")
        same_set = dict(task.support) == dict(task.query)
        class_names = query.class_names or support.class_names
        if task.kind == "classification" and support.class_names != query.class_names:
            raise ValueError(f"task {task.name}: support and query sets have different classes")
        builder = PromptBuilder(self.vocab, task.kind, template, class_names,
                                self.hateful_answers)
        results, records = {}, []
        for shots in task.shots:
            trials = [self.select_supports(task, shots, trial, support, queries, positions,
                                           same_set)
                      for trial in range(task.num_trials(shots))]
            rows = [self._rows(task, builder, shots, trial, chosen, support, queries)
                    for trial, chosen in enumerate(trials)]
            # One padded length for every trial: one compiled program per (task, shots).
            extra = task.max_new_tokens if task.kind in OPEN_ENDED else 0
            length = self._row_length([r for trial_rows in rows for r in trial_rows], extra)
            per_trial = []
            for trial, trial_rows in enumerate(rows):
                desc = f"{task.name} {shots}-shot" + (f" trial {trial}" if trial else "")
                metrics, trial_records = self._run(task, builder, trial_rows, length, queries,
                                                   desc)
                per_trial.append(metrics)
                records.extend(
                    {"task": task.name, "shots": shots, "trial": trial, **r,
                     "supports": [support.examples[j].id for j in chosen]}  # prompt order
                    for r, chosen in zip(trial_records, trials[trial]))
            summary = {m: float(np.mean([t[m] for t in per_trial])) for m in per_trial[0]}
            if len(per_trial) > 1:
                for m in per_trial[0]:
                    summary[f"{m}_std"] = float(np.std([t[m] for t in per_trial]))
                    summary.update({f"{m}/trial_{i}": t[m] for i, t in enumerate(per_trial)})
            results[str(shots)] = summary
        return results, records

    def _rows(self, task: TaskConfig, builder: PromptBuilder, shots: int, trial: int,
              chosen: np.ndarray, support: datasets.EvalSet,
              queries: Sequence[datasets.EvalExample]) -> list[Row]:
        """The model inputs of one trial: a prompt per query (open-ended), or per query,
        ensemble ordering and candidate, the prompt followed by the candidate."""
        with_images = shots > 0
        if task.kind in OPEN_ENDED:
            return [builder.prompt([support.examples[j] for j in idx], q, with_images)
                    for idx, q in zip(chosen, queries)]
        rng = np.random.default_rng([self.seed, trial, shots, 11])
        rows = []
        for idx, q in zip(chosen, queries):
            orders = [np.arange(len(idx))] + [rng.permutation(len(idx))
                                              for _ in range(task.ensemble - 1)]
            for order in orders:
                prompt = builder.prompt([support.examples[idx[o]] for o in order], q,
                                        with_images)
                rows.extend(builder.with_continuation(prompt, q, c)
                            for c in builder.candidates())
        return rows

    def _run(self, task: TaskConfig, builder: PromptBuilder, rows: Sequence[Row], length: int,
             queries: Sequence[datasets.EvalExample],
             desc: str) -> tuple[dict[str, float], list[dict]]:
        """(metrics, one record per query) of one trial's rows."""
        if task.kind in OPEN_ENDED:
            predictions = self.generate(rows, task, length, desc)
            references = [list(q.references) for q in queries]
            metrics = open_ended_metrics(task.kind, predictions, references)
            return metrics, [{"id": q.id, "prediction": p, "references": r}
                             for q, p, r in zip(queries, predictions, references)]
        candidates = builder.candidates()
        flat = self.score(rows, task, length, desc)
        scores = flat.reshape(len(queries), task.ensemble, len(candidates)).mean(axis=1)
        labels = np.array([q.label for q in queries])
        metrics = close_ended_metrics(task.kind, scores, labels)
        best = rank_candidates(scores)
        return metrics, [{"id": q.id, "scores": s.tolist(), "label": int(q.label),
                          "prediction": candidates[b]} for q, s, b in zip(queries, scores, best)]
