"""seqio Tasks (one per dataset) and the Mixture over them with rates λ_m (SPEC §4).

A `TaskConfig` says what a dataset is (kind), where it lives (source + path) and how to
cut it (text length L, media N, frames T, image size); `register_task` turns it into a
registered `FlamingoTask` (a seqio.Task that keeps its config), `register_mixture` adds
the seqio.Mixture. Defaults per kind follow the paper:

    kind         L    N  T   p_next   e.g.
    interleaved  256  5  1   0.5      M3W-like, MMC4 jsonl or prepared TFRecords
    pairs        32   1  1   0        ALIGN/LTIP-like, WebDataset tar, TFDS coco_captions
    video        32   1  8   0        VTP-like, frame files / arrays
    text         256  0  1   0        text-only LM pretraining, text files (text_documents)

Sources: "tfrecord" (prepared by flamingo-prepare; `path` is the directory, files
`<split>-*.tfrecord`), "mmc4", "webdataset", "video", "text" (raw files under `path`),
"tfds_coco" (TFDS coco_captions; `path` is an optional TFDS data_dir).
"""

import dataclasses
import functools
import os
from typing import Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from data_pipelines import coco_tfds
from data_pipelines import mmc4
from data_pipelines import preprocessors as prep
from data_pipelines import record_schema
from data_pipelines import sources
from data_pipelines import text_documents
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines import video
from data_pipelines import webdataset

SOURCES = ("tfrecord", "mmc4", "webdataset", "video", "tfds_coco", "text")
_SOURCE_KIND = {"mmc4": "interleaved", "webdataset": "pairs", "video": "video",
                "tfds_coco": "pairs", "text": "text"}
_DEFAULTS = {  # kind -> (text_length, max_media, num_frames, p_next)
    "interleaved": (256, 5, 1, 0.5),
    "pairs": (32, 1, 1, 0.0),
    "video": (32, 1, 8, 0.0),
    "text": (256, 0, 1, 0.0),
}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """One dataset of the mixture. None fields take the per-kind defaults above."""

    name: str
    kind: str
    source: str
    path: str = ""
    rate: float = 1.0
    image_size: int = 320
    text_length: Optional[int] = None
    max_media: Optional[int] = None
    num_frames: Optional[int] = None
    p_next: Optional[float] = None
    train: bool = True           # random windows/captions and augmentation
    random_flip: bool = True     # only when train; off for data whose text says left/right
    colour_jitter: bool = True   # only when train
    shuffle_buffer_size: int = 256  # raw records (still encoded) buffered for shuffling
    splits: tuple[str, ...] = ("train",)

    def __post_init__(self):
        record_schema.check_kind(self.kind)
        if self.source not in SOURCES:
            raise ValueError(f"Task {self.name!r}: source must be one of {SOURCES}, "
                             f"got {self.source!r}.")
        if self.source in _SOURCE_KIND and _SOURCE_KIND[self.source] != self.kind:
            raise ValueError(f"Task {self.name!r}: source {self.source!r} holds "
                             f"{_SOURCE_KIND[self.source]!r} data, not {self.kind!r}.")
        defaults = dict(zip(("text_length", "max_media", "num_frames", "p_next"),
                            _DEFAULTS[self.kind]))
        for field, value in defaults.items():
            if getattr(self, field) is None:
                object.__setattr__(self, field, value)
        if self.kind == "text" and self.max_media != 0:
            raise ValueError(f"Task {self.name!r}: text examples have no media, max_media "
                             f"must be 0, got {self.max_media}.")
        if self.kind in ("pairs", "video") and self.max_media != 1:
            raise ValueError(f"Task {self.name!r}: {self.kind} examples have one media item, "
                             f"max_media must be 1, got {self.max_media}.")
        if self.rate < 0:
            raise ValueError(f"Task {self.name!r}: rate must be >= 0, got {self.rate}.")
        if self.image_size < 1 or self.num_frames < 1 or self.text_length < 4:
            raise ValueError(f"Task {self.name!r}: need image_size >= 1, num_frames >= 1, "
                             f"text_length >= 4; got {self.image_size}, {self.num_frames}, "
                             f"{self.text_length}.")

    @property
    def sequence_length(self) -> dict[str, int]:
        return {"targets": self.text_length, "media": self.max_media}


class FlamingoTask(seqio.Task):
    """A seqio.Task that remembers its TaskConfig and vocabulary."""

    def __init__(self, config: TaskConfig, vocab: tokenizer_lib.FlamingoVocabulary, **kwargs):
        super().__init__(name=config.name, **kwargs)
        self.config = config
        self.vocab = vocab


def make_source(config: TaskConfig) -> seqio.DataSource:
    path = os.path.expanduser(config.path)
    if config.source == "tfrecord":
        return sources.RecordFileSource(
            config.kind, {s: os.path.join(path, f"{s}-*.tfrecord*") for s in config.splits})
    if config.source == "tfds_coco":
        return coco_tfds.CocoCaptionsSource(tfds_data_dir=path or None)
    reader = {"mmc4": mmc4, "webdataset": webdataset, "video": video,
              "text": text_documents}[config.source]
    # Raw directories hold one split; a config with several splits uses <path>/<split>/.
    if config.splits == ("train",):
        shards = {"train": functools.partial(reader.list_shards, path)}
    else:
        shards = {s: functools.partial(reader.list_shards, os.path.join(path, s))
                  for s in config.splits}
    return sources.ReaderSource(config.kind, shards, reader.read_shard)


def make_preprocessors(config: TaskConfig, vocab: tokenizer_lib.FlamingoVocabulary) -> list:
    if config.kind == "text":
        return text_documents.make_preprocessors(config, vocab)
    train = config.train
    flip, colour = train and config.random_flip, train and config.colour_jitter
    steps = [prep.add_index_and_seed, functools.partial(prep.flag_bad_input, kind=config.kind)]
    if config.kind == "interleaved":
        steps += [
            functools.partial(prep.tokenize_interleaved, vocab=vocab),
            functools.partial(prep.window_interleaved, image_id=vocab.image_id,
                              random_window=train),
        ]
    else:
        steps.append(functools.partial(prep.tokenize_captioned, vocab=vocab, random_caption=train))
        if config.kind == "pairs":
            steps.append(prep.pair_media)
        else:
            steps.append(functools.partial(prep.select_frames, num_frames=config.num_frames))
    steps += [
        functools.partial(prep.decode_media, image_size=config.image_size,
                          num_frames=config.num_frames, flip=flip, colour=colour),
        functools.partial(prep.add_assoc_next, p_next=config.p_next if train else 0.0),
        prep.select_task_output,
    ]
    return steps


def make_task(config: TaskConfig, vocab: tokenizer_lib.FlamingoVocabulary) -> FlamingoTask:
    return FlamingoTask(
        config,
        vocab,
        source=make_source(config),
        output_features={
            "targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
            "media": seqio.ContinuousFeature(dtype=tf.float32, rank=5),
            "assoc_next": seqio.ContinuousFeature(dtype=tf.int32, rank=0),
        },
        preprocessors=make_preprocessors(config, vocab),
        shuffle_buffer_size=config.shuffle_buffer_size,
    )


def register_task(config: TaskConfig, vocab: tokenizer_lib.FlamingoVocabulary) -> FlamingoTask:
    """Registers (or re-registers, replacing) the task named `config.name`."""
    if config.name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(config.name)
    task = make_task(config, vocab)
    seqio.TaskRegistry.add_provider(config.name, task)
    return task


def register_mixture(name: str, configs: Sequence[TaskConfig],
                     vocab: tokenizer_lib.FlamingoVocabulary) -> seqio.Mixture:
    """Registers every task and a seqio.Mixture over them with rates `config.rate`."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"Mixture {name!r}: task names must be unique, got {names}.")
    if not configs or sum(c.rate for c in configs) <= 0:
        raise ValueError(f"Mixture {name!r}: needs at least one task with a positive rate.")
    for config in configs:
        register_task(config, vocab)
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, [(c.name, c.rate) for c in configs])


def mixture_tasks(mixture: seqio.Mixture | str) -> list[FlamingoTask]:
    """The FlamingoTasks of a mixture (by object or registered name), in mixture order."""
    if isinstance(mixture, str):
        mixture = seqio.get_mixture_or_task(mixture)
    tasks = mixture.tasks if isinstance(mixture, seqio.Mixture) else [mixture]
    for task in tasks:
        if not isinstance(task, FlamingoTask):
            raise TypeError(f"Task {task.name!r} is not a FlamingoTask; build it with "
                            "tasks.register_task.")
    return list(tasks)


def configs_from_dict(tasks: Mapping[str, Mapping], **shared) -> list[TaskConfig]:
    """TaskConfigs from {name: {field: value}} (e.g. an ml_collections ConfigDict).

    `shared` gives defaults for every task (e.g. image_size=64); per-task fields win.
    Unknown fields fail here, with the allowed names.
    """
    allowed = {f.name for f in dataclasses.fields(TaskConfig)} - {"name"}
    out = []
    for task_name, fields in tasks.items():
        fields = dict(fields)
        fields.pop("batch_size", None)  # belongs to the iterator, not the task
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"Task {task_name!r}: unknown fields {sorted(unknown)}; "
                             f"allowed: {sorted(allowed)}.")
        merged = {k: v for k, v in shared.items() if k in allowed}
        merged.update(fields)
        if "splits" in merged:
            merged["splits"] = tuple(merged["splits"])
        out.append(TaskConfig(name=task_name, **merged))
    return out
