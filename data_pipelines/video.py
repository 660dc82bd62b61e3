"""Reader of video-text pairs stored as frame files or as arrays, one example a line.

An index jsonl (one or more per dataset) lists the clips; paths are relative to it:

    {"key": "clip0", "caption": "a red circle moving up.", "frames_dir": "clips/clip0"}
    {"key": "clip1", "caption": "...", "frames": ["clips/clip1/000.png", ...]}
    {"key": "clip2", "caption": "...", "array": "clips/clip2.npy"}   # uint8 [T, H, W, 3]

`frames_dir` takes every image file in it in name order. Arrays are encoded to PNG
frames, so every source hands the preprocessors the same encoded-frame record. Faults
are flagged (see `bad_input`): missing files, undecodable frames, a non-uint8 or
mis-shaped array (`wrong_dtype`), empty or non-UTF-8 captions, malformed lines.
"""

import io
import json
import os
from typing import Iterator

import numpy as np
from PIL import Image

from data_pipelines import bad_input
from data_pipelines import record_schema

_FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_shards(pattern_or_dir: str) -> list[str]:
    """Sorted video index jsonl files: a directory (all *.jsonl in it) or a glob pattern."""
    return record_schema.list_raw_shards(pattern_or_dir, "jsonl", "video index jsonl files")


def encode_png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def read_shard(path: str) -> Iterator[dict]:
    """Yields video records (record_schema.VIDEO) for one index jsonl."""
    root = os.path.dirname(path)
    name = os.path.basename(path)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for line_no, line in enumerate(lines):
        if not line.strip():
            continue
        key = f"{name}:{line_no}"
        try:
            entry = json.loads(line.decode("utf-8"))
            key = f"{name}:{entry.get('key', line_no)}"
        except UnicodeDecodeError:
            yield _flag(key, bad_input.NON_UTF8_TEXT)
            continue
        except ValueError:
            is_last = line_no == len(lines) - 1  # a well-formed file ends with "\n"
            yield _flag(key, bad_input.TRUNCATED_FILE if is_last else bad_input.MALFORMED_RECORD)
            continue
        yield _clip(key, entry, root)


def _clip(key: str, entry: dict, root: str) -> dict:
    captions = entry.get("captions") or [entry.get("caption", "")]
    texts = []
    for c in captions:
        text, reason = bad_input.decode_text(c if isinstance(c, str) else str(c))
        if not reason:
            texts.append(text)
    if not texts:
        return _flag(key, bad_input.EMPTY_TEXT)
    if "array" in entry:
        frames, reason = _frames_from_array(os.path.join(root, entry["array"]))
    elif "frames" in entry or "frames_dir" in entry:
        frames, reason = _frames_from_files(entry, root)
    else:
        return _flag(key, bad_input.MALFORMED_RECORD)
    if reason:
        return _flag(key, reason)
    return {"key": key, "captions": texts, "frames": frames, "bad": ""}


def _frames_from_files(entry: dict, root: str) -> tuple[list[bytes], str | None]:
    if "frames" in entry:
        paths = [os.path.join(root, p) for p in entry["frames"]]
    else:
        directory = os.path.join(root, entry["frames_dir"])
        if not os.path.isdir(directory):
            return [], bad_input.MISSING_FILE
        paths = sorted(
            os.path.join(directory, p) for p in os.listdir(directory)
            if p.lower().endswith(_FRAME_EXTENSIONS)
        )
    if not paths:
        return [], bad_input.NO_MEDIA
    frames = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError:
            return [], bad_input.MISSING_FILE
        reason = bad_input.check_image_bytes(data)
        if reason:
            return [], reason
        frames.append(data)
    return frames, None


def _frames_from_array(path: str) -> tuple[list[bytes], str | None]:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return [], bad_input.MISSING_FILE
    except (OSError, ValueError):
        return [], bad_input.TRUNCATED_FILE
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        return [], bad_input.WRONG_DTYPE
    if array.shape[0] == 0:
        return [], bad_input.NO_MEDIA
    return [encode_png(frame) for frame in array], None


def _flag(key: str, reason: str) -> dict:
    return record_schema.placeholder(record_schema.VIDEO, key, reason)
