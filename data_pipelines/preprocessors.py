"""seqio preprocessors that turn raw records into Flamingo examples (SPEC §3.5, §4).

Task output of every kind (before the feature converter):

    targets     [<= L] int32   the text after <BOS>, ending in <EOS> when the document
                               ends inside the window (the converter prepends <BOS>)
    media       [n <= N, T, H, W, 3] float32, normalized, one entry per <image> token
    assoc_next  []  int32      1: text attends to the NEXT image (p = 1/2 per document)
    _index      []  int64      position of the record in this host's stream
    _bad        []  int32      0, or the bad-input code (see bad_input.FLAG_VALUES)
    _key        []  string     record identity (file:line, tar key, ...)

Randomness is stateless, drawn from `_seed` (derived from the run seed and `_index`), so
an example is a pure function of (seed, index): skipping to an index restores the exact
stream. Sequence lengths come from seqio's `sequence_length`:
{"targets": L, "media": N}.
"""

import io

import numpy as np
from PIL import Image
import tensorflow as tf

from data_pipelines import bad_input
from data_pipelines import image_ops
from data_pipelines import record_schema
from data_pipelines import tokenizer as tokenizer_lib

AUTOTUNE = tf.data.AUTOTUNE
_SPECIAL_TOKEN_RE = "|".join(tokenizer_lib.SPECIAL_TOKENS)
# Salts for the independent random draws of one example.
_SALT_WINDOW, _SALT_ASSOC, _SALT_CAPTION, _SALT_MEDIA = 1, 2, 3, 1000


def _tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


_PLACEHOLDER_IMAGE = _tiny_png()


def map_examples(ds: tf.data.Dataset, fn) -> tf.data.Dataset:
    """Parallel, order-keeping map without autograph (the functions use tf ops only;
    skipping the conversion makes building a pipeline faster)."""
    return ds.map(tf.autograph.experimental.do_not_convert(fn), num_parallel_calls=AUTOTUNE,
                  deterministic=True)


def derive_seed(seed: tf.Tensor, salt) -> tf.Tensor:
    """[2] seed for one random draw of an example."""
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(salt, tf.int64))


# --------------------------------------------------------------------- index and seed


def add_index_and_seed(ds: tf.data.Dataset, seed: int = 0) -> tf.data.Dataset:
    """Numbers records and gives each a seed; a no-op when the pipeline already did."""
    if "_index" in ds.element_spec:
        return ds

    def add(index, ex):
        ex = dict(ex)
        ex["_index"] = index
        ex["_seed"] = example_seed(seed, index)
        return ex

    return map_examples(ds.enumerate(), add)


def example_seed(seed: int, index: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(
        tf.constant([seed, 0x5EED], tf.int64), tf.cast(index, tf.int64))


# ------------------------------------------------------------------------ bad input


def _valid_utf8(strings: tf.Tensor) -> tf.Tensor:
    """[...] bool: each string is valid UTF-8 (transcoding with replacement is a no-op)."""
    fixed = tf.strings.unicode_transcode(strings, "UTF-8", "UTF-8", errors="replace",
                                         replacement_char=0xFFFD)
    return tf.equal(fixed, strings)


def clean_text(texts: tf.Tensor) -> tf.Tensor:
    """Removes literal '<image>'/'<EOC>' from raw text (they would fake special tokens)."""
    return tf.strings.strip(tf.strings.regex_replace(texts, _SPECIAL_TOKEN_RE, " "))


def _first_reason(checks) -> tf.Tensor:
    """checks: [(bool tensor 'is bad', reason)] in priority order -> int32 code or 0."""
    code = tf.constant(0, tf.int32)
    for is_bad, reason in reversed(checks):
        code = tf.where(is_bad, bad_input.reason_code(reason), code)
    return code


def flag_bad_input(ds: tf.data.Dataset, kind: str) -> tf.data.Dataset:
    """Sets `_bad` (int32 code) from the record's `bad` field and in-graph checks.

    A flagged record keeps flowing (so the batch assembler can count it where it is
    consumed) but its payload is swapped for a tiny placeholder that always decodes.
    """
    record_schema.check_kind(kind)
    text_key = "texts" if kind == record_schema.INTERLEAVED else "captions"
    media_key = {"interleaved": "images", "pairs": "image", "video": "frames"}[kind]
    flag_table = tf.constant(bad_input.FLAG_VALUES)

    def fn(ex):
        ex = dict(ex)
        texts = tf.reshape(ex[text_key], [-1])
        media = tf.reshape(ex[media_key], [-1])
        utf8 = _valid_utf8(texts)
        clean = tf.where(utf8, clean_text(texts), "")
        known = tf.reduce_any(tf.equal(flag_table, ex["bad"]))
        recorded = tf.where(known, tf.argmax(tf.cast(tf.equal(flag_table, ex["bad"]), tf.int32),
                                             output_type=tf.int32),
                            bad_input.reason_code(bad_input.MALFORMED_RECORD))
        checks = [
            (tf.logical_or(tf.size(media) == 0, tf.reduce_any(tf.equal(media, ""))),
             bad_input.NO_MEDIA),
            (tf.logical_not(tf.reduce_all(image_ops.looks_like_image(media))),
             bad_input.UNDECODABLE_IMAGE),
            (tf.logical_and(tf.size(texts) > 0, tf.logical_not(tf.reduce_any(utf8))),
             bad_input.NON_UTF8_TEXT),
            (tf.reduce_all(tf.equal(clean, "")), bad_input.EMPTY_TEXT),
        ]
        code = tf.where(recorded > 0, recorded, _first_reason(checks))
        bad = code > 0
        if kind == record_schema.INTERLEAVED:
            ex["texts"] = tf.cond(bad, lambda: tf.constant(["."]), lambda: clean)
            ex["images"] = tf.cond(bad, lambda: tf.constant([_PLACEHOLDER_IMAGE]),
                                   lambda: ex["images"])
            ex["image_text_index"] = tf.cond(bad, lambda: tf.zeros([1], tf.int64),
                                             lambda: ex["image_text_index"])
        else:
            # Keep only the usable captions of a good record.
            good_captions = tf.boolean_mask(clean, tf.not_equal(clean, ""))
            ex["captions"] = tf.cond(bad, lambda: tf.constant(["."]), lambda: good_captions)
            if kind == record_schema.PAIRS:
                ex["image"] = tf.where(bad, tf.constant(_PLACEHOLDER_IMAGE), ex["image"])
            else:
                ex["frames"] = tf.cond(bad, lambda: tf.constant([_PLACEHOLDER_IMAGE]),
                                       lambda: ex["frames"])
        ex["_bad"] = code
        ex["_key"] = ex.pop("key")
        del ex["bad"]
        return ex

    return map_examples(ds, fn)


# ---------------------------------------------------------------- text and windows


def interleaved_tokens(texts: tf.Tensor, image_text_index: tf.Tensor,
                       vocab: tokenizer_lib.FlamingoVocabulary) -> tf.Tensor:
    """Document body [n] int32 (no <BOS>, ends with <EOS>), SPEC §3.5 format.

    texts [C] strings; image_text_index [M] (image i sits before texts[index[i]], as in
    MMC4; must be sorted). Text between two images is one chunk; a non-empty chunk ends
    with <EOC>, an <image> starts every chunk after the first:
        chunk0 <EOC> <image> chunk1 <EOC> <image> chunk2 <EOC> <EOS>
    """
    num_images = tf.size(image_text_index)
    chunk_of_text = tf.searchsorted(image_text_index, tf.range(tf.size(texts), dtype=tf.int64),
                                    side="right")  # [C] images at or before each text
    chunks = tf.strings.unsorted_segment_join(texts, chunk_of_text, num_images + 1, separator=" ")
    chunks = tf.strings.strip(chunks)
    tokens = vocab.encode_text_tf(chunks)  # ragged [M + 1, None]
    nonempty = tf.cast(tokens.row_lengths() > 0, tf.int64)
    image_col = tf.RaggedTensor.from_row_lengths(
        tf.fill([num_images], vocab.image_id),
        tf.concat([[0], tf.ones([num_images], tf.int64)], axis=0))
    eoc_col = tf.RaggedTensor.from_row_lengths(
        tf.fill([tf.reduce_sum(nonempty)], vocab.eoc_id), nonempty)
    body = tf.concat([image_col, tf.cast(tokens, tf.int32), eoc_col], axis=1).flat_values
    return tf.concat([body, [vocab.eos_id]], axis=0)


def tokenize_interleaved(ds: tf.data.Dataset, vocab: tokenizer_lib.FlamingoVocabulary) -> tf.Tensor:
    """Adds `_tokens` [n] (document body) and sorts `images` by text position."""

    def fn(ex):
        ex = dict(ex)
        order = tf.argsort(ex["image_text_index"], stable=True)
        index = tf.maximum(tf.gather(ex.pop("image_text_index"), order), 0)
        ex["images"] = tf.gather(ex["images"], order)
        ex["_tokens"] = interleaved_tokens(ex.pop("texts"), index, vocab)
        return ex

    return map_examples(ds, fn)


def window_interleaved(ds: tf.data.Dataset, sequence_length, image_id: int,
                       random_window: bool) -> tf.data.Dataset:
    """Random L-token window with up to the first N of its images (SPEC §4).

    `targets` = body[start : start + L] with <image> tokens beyond the N-th removed, and a
    trailing <image> removed (nothing after it would be conditioned on it); `_media_bytes`
    [n <= N] are the images of the kept <image> tokens, in order.
    """
    length, max_media = sequence_length["targets"], sequence_length["media"]

    def fn(ex):
        ex = dict(ex)
        body = ex.pop("_tokens")
        n = tf.size(body)
        max_start = tf.maximum(n - length, 0)
        if random_window:
            start = tf.random.stateless_uniform([], derive_seed(ex["_seed"], _SALT_WINDOW),
                                                minval=0, maxval=max_start + 1, dtype=tf.int32)
        else:
            start = tf.constant(0)
        window = body[start:start + length]
        offset = tf.reduce_sum(tf.cast(tf.equal(body[:start], image_id), tf.int32))
        is_image = tf.equal(window, image_id)
        rank = tf.cumsum(tf.cast(is_image, tf.int32))
        last = tf.equal(tf.range(tf.size(window)), tf.size(window) - 1)
        keep = tf.logical_not(is_image) | ((rank <= max_media) & tf.logical_not(last))
        window = tf.boolean_mask(window, keep)
        count = tf.reduce_sum(tf.cast(tf.equal(window, image_id), tf.int32))
        ex["targets"] = window
        kept = tf.gather(ex.pop("images"), offset + tf.range(count))  # [n]
        ex["_media_bytes"] = kept[:, None]  # [n, T=1]
        return ex

    return map_examples(ds, fn)


def tokenize_captioned(ds: tf.data.Dataset, sequence_length,
                       vocab: tokenizer_lib.FlamingoVocabulary,
                       random_caption: bool) -> tf.data.Dataset:
    """Pairs and videos: `targets` = <image> caption <EOC> <EOS>, caption cut to fit L."""
    length = sequence_length["targets"]
    if length < 4:
        raise ValueError(f"sequence_length['targets'] must be >= 4 for pairs, got {length}.")

    def fn(ex):
        ex = dict(ex)
        captions = ex.pop("captions")
        if random_caption:
            pick = tf.random.stateless_uniform([], derive_seed(ex["_seed"], _SALT_CAPTION), 0,
                                               tf.size(captions), dtype=tf.int32)
        else:
            pick = 0
        text = vocab.encode_text_tf(captions[pick])[:length - 3]
        ex["targets"] = tf.concat([[vocab.image_id], text, [vocab.eoc_id, vocab.eos_id]], axis=0)
        return ex

    return map_examples(ds, fn)


# ----------------------------------------------------------------------------- media


def pair_media(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`_media_bytes` [1, 1] from the pair's image."""

    def fn(ex):
        ex = dict(ex)
        ex["_media_bytes"] = tf.reshape(ex.pop("image"), [1, 1])  # static: decoded without a loop
        return ex

    return map_examples(ds, fn)


def frame_indices(num_available: tf.Tensor, num_frames: int) -> tf.Tensor:
    """[num_frames] evenly spread indices into num_available frames (repeats if fewer)."""
    t = tf.cast(tf.range(num_frames), tf.float32) + 0.5
    idx = tf.cast(tf.floor(t * tf.cast(num_available, tf.float32) / num_frames), tf.int32)
    return tf.minimum(idx, num_available - 1)


def select_frames(ds: tf.data.Dataset, num_frames: int) -> tf.data.Dataset:
    """`_media_bytes` [1, T]: T frames spread evenly over the clip."""

    def fn(ex):
        ex = dict(ex)
        frames = ex.pop("frames")
        ex["_media_bytes"] = tf.gather(frames, frame_indices(tf.size(frames), num_frames))[None]
        return ex

    return map_examples(ds, fn)


def decode_media(ds: tf.data.Dataset, image_size: int, num_frames: int, flip: bool,
                 colour: bool) -> tf.data.Dataset:
    """`_media_bytes` [n, T] encoded -> `media` [n, T, S, S, 3] float32.

    Each media item draws its own augmentation (from `_seed`); its frames share it.
    """

    def fn(ex):
        ex = dict(ex)
        encoded = tf.ensure_shape(ex.pop("_media_bytes"), [None, num_frames])
        seeds = tf.random.stateless_uniform([tf.shape(encoded)[0], 2],
                                            derive_seed(ex["_seed"], _SALT_MEDIA),
                                            minval=None, maxval=None, dtype=tf.int64)
        ex["media"] = image_ops.preprocess_encoded(encoded, image_size, seeds, flip, colour)
        return ex

    return map_examples(ds, fn)


def add_assoc_next(ds: tf.data.Dataset, p_next: float) -> tf.data.Dataset:
    """`assoc_next` []: 1 with probability p_next per document (text -> next image)."""

    def fn(ex):
        ex = dict(ex)
        if p_next > 0:
            draw = tf.random.stateless_uniform([], derive_seed(ex["_seed"], _SALT_ASSOC))
            ex["assoc_next"] = tf.cast(draw < p_next, tf.int32)
        else:
            ex["assoc_next"] = tf.constant(0, tf.int32)
        return ex

    return map_examples(ds, fn)


TASK_OUTPUT_KEYS = ("targets", "media", "assoc_next", "_index", "_bad", "_key")


def select_task_output(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Keeps the task output features (module docstring) and drops the rest."""
    return map_examples(ds, lambda ex: {k: ex[k] for k in TASK_OUTPUT_KEYS})


def drop_bad_examples(ds: tf.data.Dataset) -> tf.data.Dataset:
    """For plain `seqio` consumers (`task.get_dataset`): removes flagged examples.

    The iterators of `mixture_iterator` do not use this: they drop and count them.
    """
    return ds.filter(lambda ex: tf.equal(ex["_bad"], 0))
