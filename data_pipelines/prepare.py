"""flamingo-prepare: raw datasets -> sharded TFRecords that the seqio Tasks read.

    python -m data_pipelines.prepare --source mmc4 --input data/mmc4 \
        --output_dir data/prepared/mmc4 --num_shards 8

Sources: mmc4 (jsonl + images), webdataset (tar shards), video (index jsonl + frames or
arrays), tfds_coco (TFDS coco_captions; --input is an optional TFDS data_dir). Records
are validated by the same readers the raw Tasks use (images fully decoded); bad ones
are left out and counted per reason. Writes `<split>-0000k-of-0000n.tfrecord` and
`<split>.stats.json` ({"examples", "bad_input", "shards"}). Files are written under a
temporary name and renamed when complete, so a crash never leaves a half shard that
looks finished. Images keep their original encoding (no re-compression).
"""

import argparse
import json
import multiprocessing
import os
import sys
from typing import Iterator, Optional, Sequence

import tensorflow as tf

from data_pipelines import bad_input
from data_pipelines import coco_tfds
from data_pipelines import mmc4
from data_pipelines import record_schema
from data_pipelines import video
from data_pipelines import webdataset

_READERS = {  # source -> (kind, module with list_shards/read_shard)
    "mmc4": (record_schema.INTERLEAVED, mmc4),
    "webdataset": (record_schema.PAIRS, webdataset),
    "video": (record_schema.VIDEO, video),
}
SOURCES = tuple(_READERS) + ("tfds_coco",)


def _read_file(args: tuple[str, str]) -> list[tuple[str, Optional[bytes]]]:
    """Worker: one input shard -> [(bad reason or "", serialized tf.Example or None)]."""
    source, path = args
    kind, reader = _READERS[source]
    out = []
    for record in reader.read_shard(path):
        if record["bad"]:
            out.append((record["bad"], None))
        else:
            out.append(("", record_schema.to_tf_example(kind, record)))
    return out


def _tfds_records(data_dir: Optional[str], split: str) -> Iterator[tuple[str, Optional[bytes]]]:
    source = coco_tfds.CocoCaptionsSource(tfds_data_dir=data_dir, splits={split: split})
    for ex in source.get_dataset(split=split, shuffle=False).as_numpy_iterator():
        captions = []
        reason = None
        for c in ex["captions"]:
            text, reason = bad_input.decode_text(c)
            if not reason:
                captions.append(text)
        if not captions:
            yield reason or bad_input.EMPTY_TEXT, None
            continue
        reason = bad_input.check_image_bytes(ex["image"])
        if reason:
            yield reason, None
            continue
        record = {"key": ex["key"], "captions": captions, "image": ex["image"], "bad": ""}
        yield "", record_schema.to_tf_example(record_schema.PAIRS, record)


def prepare(source: str, input_path: str, output_dir: str, split: str = "train",
            num_shards: int = 4, num_workers: int = 1) -> dict:
    """Converts one raw dataset split; returns the stats also written to json."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}.")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
    tf.io.gfile.makedirs(output_dir)
    paths = [os.path.join(output_dir, f"{split}-{k:05d}-of-{num_shards:05d}.tfrecord")
             for k in range(num_shards)]
    writers = [tf.io.TFRecordWriter(p + ".tmp") for p in paths]
    counter = bad_input.BadInputCounter()
    per_shard = [0] * num_shards
    if source == "tfds_coco":
        inputs = [input_path or "tfds"]
        results: Iterator = iter([list(_tfds_records(input_path or None, split))])
    else:
        inputs = _READERS[source][1].list_shards(input_path)
        jobs = [(source, p) for p in inputs]
        if num_workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(num_workers)
            results = pool.imap(_read_file, jobs)
        else:
            pool = None
            results = map(_read_file, jobs)
    n = 0
    try:
        for records in results:
            for reason, serialized in records:
                if reason:
                    counter.add(reason)
                    continue
                writers[n % num_shards].write(serialized)
                per_shard[n % num_shards] += 1
                n += 1
    finally:
        for w in writers:
            w.close()
        if source != "tfds_coco" and pool is not None:
            pool.close()
    for p in paths:
        tf.io.gfile.rename(p + ".tmp", p, overwrite=True)
    stats = {"source": source, "split": split, "inputs": list(inputs), "examples": n,
             "bad_input": counter.as_dict(),
             "shards": [{"path": p, "examples": c} for p, c in zip(paths, per_shard)]}
    with tf.io.gfile.GFile(os.path.join(output_dir, f"{split}.stats.json"), "w") as f:
        f.write(json.dumps(stats, indent=1))
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert raw datasets to sharded TFRecords.")
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--input", default="",
                        help="Raw data directory or glob (TFDS data_dir for tfds_coco).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_shards", type=int, default=4)
    parser.add_argument("--num_workers", type=int, default=1,
                        help="Processes reading input shards.")
    args = parser.parse_args(argv)
    stats = prepare(args.source, args.input, args.output_dir, args.split, args.num_shards,
                    args.num_workers)
    bad = {k: v for k, v in stats["bad_input"].items() if v}
    print(f"wrote {stats['examples']} examples to {args.output_dir} "
          f"({len(stats['shards'])} shards); skipped: {bad or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
