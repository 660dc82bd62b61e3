"""Reader of MMC4-style interleaved documents: jsonl shards plus image files.

One JSON object per line, as released by MMC4 (Zhu et al., 2023):

    {"url": ..., "text_list": ["sentence", ...],
     "image_info": [{"image_name": "abc.jpg", "matched_text_index": 2, "raw_url": ...,
                     "matched_sim": 0.31}, ...]}

Image files are looked up as `images_dir/image_name` (default `images_dir`: an `images/`
folder beside the shard). Faults are flagged, not raised (see `bad_input`): a line that
is not UTF-8 or not JSON, a file cut inside its last line, an image that is missing or
does not decode (each dropped image yields its own flagged record, and the document keeps
its other images), a document with no text or no image left.
"""

import json
import os
from typing import Iterator, Optional

from data_pipelines import bad_input
from data_pipelines import record_schema


def list_shards(pattern_or_dir: str) -> list[str]:
    """Sorted MMC4 jsonl shards: a directory (all *.jsonl in it) or a glob pattern."""
    return record_schema.list_raw_shards(pattern_or_dir, "jsonl", "MMC4 jsonl shards")


def read_shard(path: str, images_dir: Optional[str] = None) -> Iterator[dict]:
    """Yields interleaved records (record_schema.INTERLEAVED) for one jsonl shard."""
    images_dir = images_dir or os.path.join(os.path.dirname(path), "images")
    name = os.path.basename(path)
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    if complete:
        lines = lines[:-1]
    for line_no, line in enumerate(lines):
        key = f"{name}:{line_no}"
        if not line.strip():
            continue
        last_and_cut = not complete and line_no == len(lines) - 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield _flag(key, bad_input.NON_UTF8_TEXT)
            continue
        try:
            doc = json.loads(text)
            texts = [str(t) for t in doc["text_list"]]
            infos = list(doc.get("image_info") or [])
        except (ValueError, KeyError, TypeError):
            reason = bad_input.TRUNCATED_FILE if last_and_cut else bad_input.MALFORMED_RECORD
            yield _flag(key, reason)
            continue
        yield from _document(key, texts, infos, images_dir)


def _document(key: str, texts: list[str], infos: list, images_dir: str) -> Iterator[dict]:
    images, index = [], []
    for i, info in enumerate(infos):
        try:
            image_path = os.path.join(images_dir, info["image_name"])
            text_index = int(info["matched_text_index"])
        except (KeyError, TypeError, ValueError):
            yield _flag(f"{key}/image{i}", bad_input.MALFORMED_RECORD)
            continue
        try:
            with open(image_path, "rb") as f:
                image = f.read()
        except OSError:
            yield _flag(f"{key}/image{i}", bad_input.MISSING_FILE)
            continue
        reason = bad_input.check_image_bytes(image)
        if reason:
            yield _flag(f"{key}/image{i}", reason)
            continue
        images.append(image)
        index.append(text_index)
    if not any(t.strip() for t in texts):
        yield _flag(key, bad_input.EMPTY_TEXT)
    elif not images:
        yield _flag(key, bad_input.NO_MEDIA)
    else:
        yield {"key": key, "texts": texts, "images": images, "image_text_index": index, "bad": ""}


def _flag(key: str, reason: str) -> dict:
    return record_schema.placeholder(record_schema.INTERLEAVED, key, reason)
