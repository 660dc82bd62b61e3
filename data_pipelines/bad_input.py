"""Bad input: the reasons an example is skipped, their counters and the checks.

A bad record never crashes the pipeline and never changes a batch's shape. Readers and
in-graph checks do not drop it themselves: they *flag* it (the record's `bad` field holds
a reason from `REASONS`, its payload is replaced by a harmless placeholder) and it flows
on to the batch assembler, which drops it and counts it. Counting at the one place where
examples are consumed makes the counts exact at every step (not "whatever the prefetch
buffers read ahead"), lets them be saved with the input position, and covers errors that
only show when decoding (`undecodable_image`, detected as a gap in the example indices).
"""

import collections
import io
import threading
from typing import Mapping, Optional

from PIL import Image

UNDECODABLE_IMAGE = "undecodable_image"  # corrupt or truncated image bytes
TRUNCATED_FILE = "truncated_file"        # tar / jsonl / TFRecord file cut short
MALFORMED_RECORD = "malformed_record"    # a jsonl line or record that does not parse
EMPTY_TEXT = "empty_text"                # no text left after stripping whitespace
NON_UTF8_TEXT = "non_utf8_text"
MISSING_FILE = "missing_file"            # an image / frame / array file that is absent
WRONG_DTYPE = "wrong_dtype"              # e.g. a float video array where uint8 is expected
NO_MEDIA = "no_media"                    # an example left without any image or frame

# Order fixes the int codes used in-graph: code = REASONS.index(reason) + 1, 0 = good.
REASONS = (
    UNDECODABLE_IMAGE,
    TRUNCATED_FILE,
    MALFORMED_RECORD,
    EMPTY_TEXT,
    NON_UTF8_TEXT,
    MISSING_FILE,
    WRONG_DTYPE,
    NO_MEDIA,
)
# Marks the end of a finite stream so the assembler can count trailing gaps; never counted.
END_OF_STREAM = "end_of_stream"
# Strings allowed in a record's `bad` field ("" = good), in code order.
FLAG_VALUES = ("",) + REASONS + (END_OF_STREAM,)
END_CODE = len(FLAG_VALUES) - 1


def reason_code(reason: str) -> int:
    if reason not in FLAG_VALUES:
        raise ValueError(f"Unknown bad-input reason {reason!r}; expected one of {REASONS}.")
    return FLAG_VALUES.index(reason)


class BadInputCounter:
    """Thread-safe counts of skipped examples per reason (all reasons always present)."""

    def __init__(self, counts: Optional[Mapping[str, int]] = None):
        self._lock = threading.Lock()
        self._counts = collections.Counter({r: 0 for r in REASONS})
        for reason, n in (counts or {}).items():
            self.add(reason, n)

    def add(self, reason: str, n: int = 1) -> None:
        if reason not in REASONS:
            raise ValueError(f"Unknown bad-input reason {reason!r}; expected one of {REASONS}.")
        with self._lock:
            self._counts[reason] += int(n)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {r: self._counts[r] for r in REASONS}

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def __repr__(self) -> str:
        nonzero = {k: v for k, v in self.as_dict().items() if v}
        return f"BadInputCounter({nonzero})"


def check_image_bytes(data: bytes) -> Optional[str]:
    """Fully decodes `data`; returns None if it is a usable image, else the reason."""
    if not data:
        return MISSING_FILE
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                return UNDECODABLE_IMAGE
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
        return UNDECODABLE_IMAGE
    return None


def decode_text(data: bytes | str) -> tuple[str, Optional[str]]:
    """Returns (text, None) for non-empty UTF-8 text, else ("", reason)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            return "", NON_UTF8_TEXT
    text = data.strip()
    if not text:
        return "", EMPTY_TEXT
    return text, None
