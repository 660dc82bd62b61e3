"""Reader of WebDataset tar shards of image-text pairs (LAION/ALIGN-like).

A sample is the run of consecutive tar members sharing a key (the member name up to the
first dot of its base name): `000123.jpg` + `000123.txt` and/or `000123.json` (whose
"caption" or "text" field is used when there is no .txt). Faults are flagged, not raised
(see `bad_input`): an image that does not decode, a sample without image, empty or
non-UTF-8 text, and a tar cut short (inside a member, or missing its end-of-archive
blocks); a truncated tar yields the samples before the cut and one `truncated_file` flag.
"""

import json
import os
import tarfile
from typing import Iterator

from data_pipelines import bad_input
from data_pipelines import record_schema

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


def list_shards(pattern_or_dir: str) -> list[str]:
    """Sorted WebDataset tar shards: a directory (all *.tar in it) or a glob pattern."""
    return record_schema.list_raw_shards(pattern_or_dir, "tar", "WebDataset tar shards")


def _split_name(name: str) -> tuple[str, str]:
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def _iter_members(path: str) -> Iterator[tuple[str | None, str | None, bytes | None]]:
    """Yields (key, extension, data) per member; (key or None, None, None) once if the tar
    is cut short, with the key of the member being read when the cut was hit (None when
    the cut fell between members or in a header)."""
    key = None
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                key = None
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    yield key, None, None
                    return
                yield key, ext, data
                key = None
    except (tarfile.ReadError, EOFError, OSError):
        yield key, None, None
        return
    if not _has_end_of_archive(path):
        yield None, None, None


def _has_end_of_archive(path: str) -> bool:
    """A complete tar ends with two zero 512-byte blocks (plus record padding)."""
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def read_shard(path: str) -> Iterator[dict]:
    """Yields pair records (record_schema.PAIRS) for one tar shard."""
    name = os.path.basename(path)
    group_key, group = None, {}
    for key, ext, data in _iter_members(path):
        if data is None:  # cut short
            if group_key is not None and key is not None and key != group_key:
                yield _sample(f"{name}:{group_key}", group)  # complete: the next sample had begun
            # The sample being read (or, when unknown, the last one) is lost with the cut.
            yield record_schema.placeholder(record_schema.PAIRS, f"{name}:{key or group_key}",
                                            bad_input.TRUNCATED_FILE)
            return
        if key != group_key and group_key is not None:
            yield _sample(f"{name}:{group_key}", group)
            group = {}
        group_key = key
        group[ext] = data
    if group_key is not None:
        yield _sample(f"{name}:{group_key}", group)


def _sample(key: str, members: dict[str, bytes]) -> dict:
    def flag(reason):
        return record_schema.placeholder(record_schema.PAIRS, key, reason)

    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    if image is None:
        return flag(bad_input.MISSING_FILE)
    if "txt" in members:
        raw = members["txt"]
    elif "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
            raw = meta.get("caption") or meta.get("text") or ""
        except UnicodeDecodeError:
            return flag(bad_input.NON_UTF8_TEXT)
        except ValueError:
            return flag(bad_input.MALFORMED_RECORD)
    else:
        return flag(bad_input.EMPTY_TEXT)
    text, reason = bad_input.decode_text(raw)
    if reason:
        return flag(reason)
    reason = bad_input.check_image_bytes(image)
    if reason:
        return flag(reason)
    return {"key": key, "captions": [text], "image": image, "bad": ""}
