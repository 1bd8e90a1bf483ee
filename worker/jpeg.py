"""A JPEG's size from its markers, in a few microseconds, for the GPU path's header check.

PIL's header parse costs 30-60 µs a file, more than the rest of the host's work per job on the
GPU path. This scan reads only a plain marker sequence, the kind cameras and encoders write:
SOI, then APP0, DQT, DHT, DRI and COM segments around one 8-bit baseline, extended or
progressive frame header of 1 or 3 components, up to the first scan. Anything else (other APP
segments, fill bytes, other frame types, a truncated or inconsistent segment, a second frame)
is left to PIL, so a refusal is always PIL's, in its wording. For what it accepts it answers
as PIL would: a JPEG of that size, mode L or RGB (tests/test_jpeg.py compares the two).
"""

from __future__ import annotations

# Marker bytes (after 0xFF).
SOI, SOS, DQT = 0xD8, 0xDA, 0xDB
# Frame headers accepted: baseline, extended sequential and progressive DCT, Huffman-coded.
FRAMES = frozenset({0xC0, 0xC1, 0xC2})
# Other segments a plain header may hold: APP0 (JFIF), DQT, DHT, DRI and COM.
PLAIN = frozenset({0xE0, DQT, 0xC4, 0xDD, 0xFE})
# Components of the frame -> PIL's mode for it.
MODES = {1: "L", 3: "RGB"}


def plain_jpeg_header(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, mode) of a JPEG whose header is a plain marker sequence, else None."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, frame = 2, None
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end < pos + 4 or end > len(data):
            return None
        segment = data[pos + 4 : end]
        if marker == SOS:
            return frame
        if marker in FRAMES and frame is None:
            frame = _frame(segment)
            if frame is None:
                return None
        elif marker not in PLAIN or (marker == DQT and not _whole_tables(segment)):
            return None
        pos = end
    return None


def _frame(segment: bytes) -> tuple[int, int, str] | None:
    """(width, height, mode) from a frame header of 8-bit samples and 1 or 3 components."""
    if len(segment) < 6 or segment[0] != 8 or segment[5] not in MODES:
        return None
    layers = segment[5]
    height = int.from_bytes(segment[1:3], "big")
    width = int.from_bytes(segment[3:5], "big")
    if len(segment) != 6 + 3 * layers or not width or not height:
        return None
    return width, height, MODES[layers]


def _whole_tables(segment: bytes) -> bool:
    """A DQT segment made of whole tables (PIL refuses one cut short)."""
    pos = 0
    while pos < len(segment):
        pos += 1 + 64 * (1 if segment[pos] >> 4 == 0 else 2)
    return pos == len(segment)
