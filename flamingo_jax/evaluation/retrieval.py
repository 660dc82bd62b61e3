"""Evaluation of the contrastive vision-text model: image↔text retrieval recall@k and
zero-shot classification from class-name prompts (CLIP/ALIGN protocol).

Everything here works on unit-norm embeddings, so similarity = dot product:

    metrics = retrieval_metrics(image_emb, text_emb, text_to_image)     # recall@1/5/10
    classes = class_embeddings(prompt_emb)                              # [K, P, E] -> [K, E]
    acc = zero_shot_accuracy(image_emb, classes, labels)                # top-1/5

`embed_pairs` and `embed_prompts` run a ContrastiveModel over arrays in fixed-size batches;
`prompt_tokens` writes text the way the pair pipeline does (`<BOS><image>text<EOC><EOS>`,
SPEC §3.5) so prompts look like training captions to the text tower.
"""

from typing import Callable, Sequence

import jax
import numpy as np
from flax import traverse_util

RECALL_KS = (1, 5, 10)


def recall_at_k(
    similarity: np.ndarray,  # [Q, C] query × candidate scores
    relevant: np.ndarray,  # [Q, C] bool: candidate c is a correct answer to query q
    ks: Sequence[int] = RECALL_KS,
) -> dict[int, float]:
    """Fraction of queries with at least one relevant candidate among their k best. Ties are
    broken towards the lower candidate index (a stable sort)."""
    similarity, relevant = np.asarray(similarity), np.asarray(relevant, bool)
    if similarity.ndim != 2 or similarity.shape != relevant.shape:
        raise ValueError(f"similarity {similarity.shape} and relevant {relevant.shape} must be "
                         "the same [Q, C] shape")
    if not relevant.any(axis=1).all():
        bad = int(np.flatnonzero(~relevant.any(axis=1))[0])
        raise ValueError(f"query {bad} has no relevant candidate; recall is undefined for it")
    order = np.argsort(-similarity, axis=1, kind="stable")  # [Q, C] best first
    hits = np.take_along_axis(relevant, order, axis=1)  # [Q, C]
    first_hit = np.argmax(hits, axis=1)  # [Q] rank of the best-ranked relevant candidate
    return {k: float(np.mean(first_hit < k)) for k in ks}


def retrieval_metrics(
    image_emb: np.ndarray,  # [I, E] unit norm
    text_emb: np.ndarray,  # [T, E] unit norm
    text_to_image: np.ndarray | None = None,  # [T] int: the image each text describes
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """image→text (an image is found when any of its texts is in the top k) and text→image
    recall@k. `text_to_image` None means one text per image, text i for image i."""
    image_emb, text_emb = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
    if text_to_image is None:
        if len(image_emb) != len(text_emb):
            raise ValueError(f"{len(image_emb)} images but {len(text_emb)} texts: pass "
                             "text_to_image when images have several texts")
        text_to_image = np.arange(len(text_emb))
    text_to_image = np.asarray(text_to_image)
    if text_to_image.shape != (len(text_emb),):
        raise ValueError(f"text_to_image has shape {text_to_image.shape}; expected "
                         f"({len(text_emb)},), one image index per text")
    similarity = image_emb @ text_emb.T  # [I, T]
    relevant = text_to_image[None, :] == np.arange(len(image_emb))[:, None]  # [I, T]
    out = {}
    for k, r in recall_at_k(similarity, relevant, ks).items():
        out[f"image_to_text/recall@{k}"] = r
    for k, r in recall_at_k(similarity.T, relevant.T, ks).items():
        out[f"text_to_image/recall@{k}"] = r
    return out


def class_embeddings(prompt_emb: np.ndarray) -> np.ndarray:
    """[K, P, E] embeddings of P prompts per class -> [K, E]: the normalised mean (CLIP's
    prompt ensembling)."""
    prompt_emb = np.asarray(prompt_emb, np.float32)
    if prompt_emb.ndim != 3:
        raise ValueError(f"prompt embeddings must be [K, P, E], got {prompt_emb.shape}")
    mean = prompt_emb.mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def zero_shot_accuracy(
    image_emb: np.ndarray,  # [I, E]
    class_emb: np.ndarray,  # [K, E]
    labels: np.ndarray,  # [I] int in [0, K)
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy of classifying each image as its most similar class embedding."""
    labels = np.asarray(labels)
    num_classes = len(class_emb)
    if labels.shape != (len(image_emb),) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be [I={len(image_emb)}] ints in [0, {num_classes}), got "
                         f"shape {labels.shape} range [{labels.min()}, {labels.max()}]")
    similarity = np.asarray(image_emb, np.float32) @ np.asarray(class_emb, np.float32).T
    relevant = labels[:, None] == np.arange(num_classes)[None, :]
    ks = [k for k in ks if k <= num_classes]
    return {f"top{k}": r for k, r in recall_at_k(similarity, relevant, ks).items()}


def prompt_tokens(vocab, texts: Sequence[str], length: int) -> np.ndarray:
    """[len(texts), length] int32 rows `<BOS><image>text<EOC><EOS>`, right-padded with 0
    (the pair pipeline's `tokens` for a caption); too-long text is cut before `<EOC>`."""
    rows = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
        body = list(vocab.encode(text))[: max(length - 4, 0)]
        ids = [vocab.bos_id, vocab.image_id, *body, vocab.eoc_id, vocab.eos_id][:length]
        rows[i, : len(ids)] = ids
    return rows


def _batched(fn: Callable, array: np.ndarray, batch_size: int) -> np.ndarray:
    """fn over `array` in batches of `batch_size` (the last one zero-padded), concatenated."""
    out = []
    for start in range(0, len(array), batch_size):
        chunk = array[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(fn(chunk))[: batch_size - pad])
    return np.concatenate(out)


def embed_pairs(model, params, images: np.ndarray, tokens: np.ndarray,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(image_emb [I, E], text_emb [T, E]) from images [I, H, W, C] and tokens [T, L]."""
    encode_image = jax.jit(lambda x: model.apply({"params": params}, x,
                                                 method=model.encode_image))
    encode_text = jax.jit(lambda t: model.apply({"params": params}, t,
                                                method=model.encode_text))
    return (_batched(encode_image, np.asarray(images, np.float32), batch_size),
            _batched(encode_text, np.asarray(tokens, np.int32), batch_size))


def embed_prompts(model, params, tokens: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """tokens [K, P, L] (P prompts for each of K classes) -> [K, P, E] text embeddings."""
    k, p, length = tokens.shape
    encode_text = jax.jit(lambda t: model.apply({"params": params}, t,
                                                method=model.encode_text))
    flat = _batched(encode_text, np.asarray(tokens, np.int32).reshape(k * p, length),
                    batch_size)
    return flat.reshape(k, p, -1)


def zero_shot_classifier(model, params, vocab, class_names: Sequence[str],
                         templates: Sequence[str], length: int) -> np.ndarray:
    """[K, E] class embeddings from `templates` (each with one '{}') filled with every class
    name."""
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError(f"templates must each contain exactly one '{{}}', got {templates!r}")
    texts = [t.format(name) for name in class_names for t in templates]
    tokens = prompt_tokens(vocab, texts, length).reshape(len(class_names), len(templates), -1)
    return class_embeddings(embed_prompts(model, params, tokens))



def read_pairs(config, pairs_path: str, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(images [I, H, W, C], tokens [I, L]) of every WebDataset pair under `pairs_path`,
    through the training pipeline's preprocessing without augmentation, in file order; a
    caption that repeats an earlier one (the same token row) is dropped with its image, so
    that each text has exactly one correct image."""
    from data_pipelines import mixture_iterator, tasks, tokenizer

    vocab = tokenizer.load_vocabulary(config.data.tokenizer)
    task_config = tasks.TaskConfig(
        name="retrieval_eval_pairs", kind="pairs", source="webdataset",
        path=pairs_path, image_size=config.input.image_size,
        text_length=config.model.text.max_length, train=False)
    task = tasks.register_task(task_config, vocab)
    it = mixture_iterator.TaskBatchIterator(task, batch_size, shuffle=False, num_epochs=1)
    images, tokens = [], []
    try:
        for batch in it:
            real = batch["media_mask"][:, 0] == 1  # the last batch is padded
            images.append(batch["media"][real, 0, 0])
            tokens.append(batch["tokens"][real])
    finally:
        it.close()
    images, tokens = np.concatenate(images), np.concatenate(tokens)
    _, first = np.unique(tokens, axis=0, return_index=True)
    keep = np.sort(first)
    return images[keep], tokens[keep]


def evaluate_checkpoint(config, workdir: str, pairs_path: str,
                        step: int | None = None) -> dict[str, float]:
    """image→text / text→image recall@1/5/10 of a contrastive run's checkpoint (the latest
    unless `step`) on the held-out pairs under `pairs_path`, with `num_pairs` and the chance
    level of recall@1 (1 / num_pairs)."""
    from flamingo_jax.models.contrastive import build_contrastive, load_params

    model = build_contrastive(config.model)
    params = traverse_util.unflatten_dict(load_params(workdir, step), sep="/")
    images, tokens = read_pairs(config, pairs_path)
    image_emb, text_emb = embed_pairs(model, params, images, tokens)
    metrics = retrieval_metrics(image_emb, text_emb)
    metrics.update(num_pairs=float(len(images)), chance_recall_at_1=1.0 / len(images))
    return metrics
