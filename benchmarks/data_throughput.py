"""Input throughput: examples/s (and per CPU core) per task, resolution and storage.

    python benchmarks/data_throughput.py --sizes 64 320 --json_out throughput.json

For each image size it writes synthetic raw data (MMC4 jsonl + PNG, WebDataset tar of
JPEG, video frame folders / arrays), prepares TFRecords from it, and times the training
pipeline (random windows, augmentation, feature conversion, batching) of each task read
from the raw files and from the TFRecords. Numbers are host-side only: nothing is
transferred to an accelerator. Throughput is measured after a warm-up, over at least
--min_seconds; "per core" divides by the CPU cores this process may use.
"""

import argparse
import json
import os
import sys
import tempfile
import time

from data_pipelines import mixture_iterator
from data_pipelines import prepare
from data_pipelines import synthetic
from data_pipelines import tasks as tasks_lib
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines import train_tokenizer

_TASKS = (  # (name, kind, raw source, raw subdir, prepared subdir)
    ("interleaved", "interleaved", "mmc4", "mmc4", "m3w"),
    ("pairs", "pairs", "webdataset", "webdataset", "pairs"),
    ("video", "video", "video", "video", "vtp"),
)


def _write_data(root: str, size: int, args) -> tuple[dict, dict]:
    raw = os.path.join(root, f"raw_{size}")
    paths = synthetic.write_all(raw, seed=0, image_size=size, num_docs=args.num_docs,
                                num_pairs=args.num_pairs, num_clips=args.num_clips, num_eval=1,
                                num_shards=4)
    prepared = {}
    for _, _, source, raw_dir, out in _TASKS:
        prepared[out] = os.path.join(root, f"prepared_{size}", out)
        prepare.prepare(source, paths[raw_dir], prepared[out], num_shards=4, num_workers=1)
    return paths, prepared


def _measure(task, batch_size: int, min_seconds: float) -> dict:
    it = mixture_iterator.TaskBatchIterator(task, batch_size, seed=0)
    for _ in range(2):  # warm-up: graph building, buffers
        next(it)
    start, cpu_start, examples = time.perf_counter(), time.process_time(), 0
    while True:
        next(it)
        examples += batch_size
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and examples >= 3 * batch_size:
            break
    cpu = time.process_time() - cpu_start
    it.close()
    return {"examples_per_s": examples / elapsed, "cpu_seconds_per_example": cpu / examples,
            "examples": examples, "seconds": elapsed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 320])
    parser.add_argument("--work_dir", default="", help="Default: a fresh temporary directory.")
    parser.add_argument("--num_docs", type=int, default=48)
    parser.add_argument("--num_pairs", type=int, default=256)
    parser.add_argument("--num_clips", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--min_seconds", type=float, default=10.0)
    parser.add_argument("--json_out", default="")
    args = parser.parse_args(argv)
    root = args.work_dir or tempfile.mkdtemp(prefix="flamingo_data_bench_")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    results = []
    vocab = None
    for size in args.sizes:
        paths, prepared = _write_data(root, size, args)
        if vocab is None:
            model = train_tokenizer.train_sentencepiece(
                [paths["corpus"]], os.path.join(root, "spm"), vocab_size=1000)
            vocab = tokenizer_lib.load_vocabulary(model)
        for name, kind, source, raw_dir, out in _TASKS:
            for storage, src, path in (("raw", source, paths[raw_dir]),
                                       ("tfrecord", "tfrecord", prepared[out])):
                config = tasks_lib.TaskConfig(f"bench_{name}_{storage}_{size}", kind, src, path,
                                              image_size=size)
                task = tasks_lib.register_task(config, vocab)
                row = {"task": name, "storage": storage, "image_size": size,
                       **_measure(task, args.batch_size, args.min_seconds)}
                row["examples_per_s_per_core"] = row["examples_per_s"] / cores
                results.append(row)
                print(f"{name:12s} {storage:9s} {size:4d}px  {row['examples_per_s']:8.1f} ex/s  "
                      f"{row['examples_per_s_per_core']:8.1f} ex/s/core  "
                      f"{1000 * row['cpu_seconds_per_example']:7.2f} CPU-ms/ex", flush=True)
    summary = {"cpu_cores": cores, "batch_size": args.batch_size, "results": results}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
