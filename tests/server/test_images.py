"""Untrusted image bytes: allowed formats decode; text, truncated files, other formats,
too many bytes and decompression bombs are refused with a clear 4xx before costing much."""

from __future__ import annotations

import base64
import time

import pytest

from surge.http.errors import APIError
from surge.server.images import ImageLimits, decode_base64_image, decode_image
from tests.server._images import declared_only_png, encoded, png_bomb

LIMITS = ImageLimits(max_image_bytes=1 << 20, max_image_pixels=4_000_000)


def _refusal(data: bytes, limits: ImageLimits = LIMITS) -> APIError:
    with pytest.raises(APIError) as info:
        decode_image(data, "image", limits)
    return info.value


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_allowed_formats_decode(fmt: str) -> None:
    image = decode_image(encoded(fmt), "image", LIMITS)
    assert image.size == (64, 48)


def test_a_text_file_is_refused_naming_the_allowed_formats() -> None:
    error = _refusal(b"hello, this is not an image at all\n")
    assert error.status == 415
    assert "JPEG, PNG, WebP, GIF, BMP" in error.message


def test_an_unsupported_format_is_named() -> None:
    error = _refusal(encoded("TIFF"))
    assert error.status == 415
    assert "TIFF" in error.message and "allowed formats are" in error.message


def test_a_truncated_png_is_a_400() -> None:
    data = encoded("PNG", (256, 256))
    error = _refusal(data[: len(data) // 2])
    assert error.status == 400 and error.code == "invalid_image"
    assert "truncated or corrupt" in error.message


def test_too_many_bytes_is_a_413_naming_the_flag() -> None:
    error = _refusal(encoded("BMP", (1024, 512)))  # 1.5 MiB of BMP
    assert error.status == 413 and "--max-image-bytes" in error.message


def test_a_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = png_bomb(8000, 8000)  # 64 megapixels of zeros
    assert len(bomb) < 200_000
    started = time.perf_counter()
    error = _refusal(bomb, ImageLimits(max_image_pixels=40_000_000))
    assert time.perf_counter() - started < 0.5  # decoding it would take far longer
    assert error.status == 413
    assert "8000x8000 = 64000000 pixels" in error.message
    assert "--max-image-pixels" in error.message


def test_a_header_declaring_gigapixels_is_refused() -> None:
    error = _refusal(declared_only_png(100_000, 100_000))
    assert error.status == 413 and error.code == "image_too_large"


def test_base64_and_data_urls_decode_and_bad_base64_is_a_400() -> None:
    raw = encoded("PNG")
    text = base64.b64encode(raw).decode()
    assert decode_base64_image(text, "image", LIMITS) == raw
    assert decode_base64_image(f"data:image/png;base64,{text}", "image", LIMITS) == raw
    with pytest.raises(APIError, match="not valid base64") as info:
        decode_base64_image("not base64 at all!", "image", LIMITS)
    assert info.value.status == 400
    with pytest.raises(APIError, match="does not fetch images"):
        decode_base64_image("https://example.com/cat.png", "image", LIMITS)


def test_a_huge_base64_string_is_refused_before_decoding() -> None:
    with pytest.raises(APIError) as info:
        decode_base64_image("A" * (2 << 20), "image", LIMITS)
    assert info.value.status == 413
