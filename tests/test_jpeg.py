"""The GPU path's JPEG header check by marker scan answers exactly as PIL's header parse did:
the same verdict for every file, the same error type and wording for every refusal."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from worker.decode import JPEG_MAGIC, DecodePolicy, is_gpu_decodable, open_checked
from worker.jpeg import plain_jpeg_header

POLICY = DecodePolicy(max_pixels=10**6, resize_size=(256,), max_resized_pixels=16_000_000)


def pil_verdict(data: bytes, policy: DecodePolicy) -> bool:
    """The check as it was, through PIL alone: the reference the scan must match."""
    image = open_checked(data, policy)
    return data.startswith(JPEG_MAGIC) and image.format == "JPEG" and image.mode in ("RGB", "L")


def outcome(check: object, data: bytes, policy: DecodePolicy) -> tuple[str, str]:
    try:
        return "ok", str(check(data, policy))  # type: ignore[operator]
    except Exception as e:
        return type(e).__name__, str(e)


def jpeg(mode: str = "RGB", size: tuple[int, int] = (40, 30), **options: object) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, "white" if mode != "CMYK" else (10, 20, 30, 40)).save(
        out, format="JPEG", **options
    )
    return out.getvalue()


def exif() -> bytes:
    data = Image.Exif()
    data[0x010F] = "camera"
    return data.tobytes()


SAMPLES = {
    "rgb": jpeg(),
    "grey": jpeg("L"),
    "cmyk": jpeg("CMYK"),
    "progressive": jpeg(progressive=True),
    "optimized-444": jpeg(optimize=True, subsampling=0, quality=95),
    "comment": jpeg(comment=b"hello"),
    "exif": jpeg(exif=exif()),
    "icc": jpeg(icc_profile=b"\0" * 300),
    "restart-markers": jpeg(restart_marker_blocks=1),
    "one-pixel": jpeg(size=(1, 1)),
    "thin": jpeg(size=(1, 2000)),
    "over-the-pixel-limit": jpeg(size=(1200, 1000)),
    "png": (lambda out: (Image.new("RGB", (4, 4)).save(out, format="PNG"), out.getvalue())[1])(
        io.BytesIO()
    ),
}


def _header_end(data: bytes) -> int:
    """Where the first scan's data starts: what the header check reads."""
    sos = data.find(b"\xff\xda")
    return len(data) if sos < 0 else sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_gets_pils_verdict(name: str) -> None:
    data = SAMPLES[name]
    assert outcome(is_gpu_decodable, data, POLICY) == outcome(pil_verdict, data, POLICY)


def test_the_scan_reads_plain_headers_and_leaves_the_rest_to_pil() -> None:
    plain = {n for n, data in SAMPLES.items() if plain_jpeg_header(data) is not None}
    assert {"rgb", "grey", "progressive", "optimized-444", "comment", "restart-markers"} <= plain
    assert not plain & {"cmyk", "exif", "icc", "png"}
    assert plain_jpeg_header(SAMPLES["grey"]) == (40, 30, "L")


@pytest.mark.parametrize("name", ["rgb", "grey", "progressive", "comment", "restart-markers"])
def test_a_header_cut_anywhere_gets_pils_verdict(name: str) -> None:
    data = SAMPLES[name]
    for cut in range(_header_end(data) + 2):
        short = data[:cut]
        assert outcome(is_gpu_decodable, short, POLICY) == outcome(pil_verdict, short, POLICY), cut


@pytest.mark.parametrize("name", ["rgb", "grey", "progressive"])
def test_a_header_with_any_byte_changed_gets_pils_verdict(name: str) -> None:
    data = SAMPLES[name]
    for at in range(_header_end(data)):
        for value in {0x00, 0x01, 0x03, 0x08, 0xC0, 0xC2, 0xDA, 0xFF, data[at] ^ 0x10}:
            bad = data[:at] + bytes([value]) + data[at + 1 :]
            assert outcome(is_gpu_decodable, bad, POLICY) == outcome(pil_verdict, bad, POLICY), (
                at,
                value,
            )


@pytest.mark.parametrize("max_pixels", [1, 1199, 1200, 10**9])
def test_the_pixel_limits_are_pils_at_their_edges(
    max_pixels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", min(max_pixels * 3, 10**8))
    policy = DecodePolicy(max_pixels=max_pixels, resize_size=(16,), max_resized_pixels=10**6)
    for data in (jpeg(size=(40, 30)), jpeg(size=(30, 40)), jpeg(size=(1, 5000))):
        assert outcome(is_gpu_decodable, data, policy) == outcome(pil_verdict, data, policy)
