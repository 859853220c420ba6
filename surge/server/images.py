"""Untrusted image bytes -> a decoded PIL image, or a clear 4xx.

Checked in order of cost, so that a hostile upload is refused before it costs much:
1. the byte size (413 over ``max_image_bytes``);
2. the format, from the header only, against an allow-list (JPEG, PNG, WebP, GIF, BMP): only
   those decoders ever see the bytes (415 otherwise, naming the allowed formats);
3. the pixel count declared in the header (413 over ``max_image_pixels``), BEFORE decoding,
   so a decompression bomb (a few KB of PNG declaring gigapixels) is refused without
   inflating it; PIL's own ``DecompressionBombError`` stays as a backstop;
4. the decode itself (400 for a truncated or corrupt file).

Decoding is CPU work: the server calls ``decode_image`` on a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from surge.http.errors import APIError

__all__ = ["ALLOWED_FORMATS", "ImageLimits", "decode_base64_image", "decode_image"]

# PIL format name -> what users call it.
ALLOWED_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP"}
_ALLOWED_TEXT = ", ".join(ALLOWED_FORMATS.values())
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*?;base64,", re.IGNORECASE)
# Signatures of common image formats we do not decode, to name them in the refusal.
_KNOWN_OTHERS = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"),
                 (b"%PDF", "PDF"), (b"8BPS", "PSD"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"))


@dataclass(frozen=True)
class ImageLimits:
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: allowed is an integer >= 1")


def decode_base64_image(text: str, param: str, limits: ImageLimits) -> bytes:
    """Bytes of a base64 string or ``data:image/...;base64,`` URL (400 if neither)."""
    match = _DATA_URL.match(text)
    if match is None and text.startswith(("http://", "https://")):
        raise APIError(400, f"'{param}' is a URL: this server does not fetch images; send the "
                       "image as base64 or a data:image/...;base64, URL", param=param,
                       code="invalid_image")
    payload = text[match.end():] if match else text
    # 4 base64 characters carry 3 bytes: refuse a huge string before decoding it.
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise _too_many_bytes(len(payload) * 3 // 4, param, limits)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"'{param}' is not valid base64: send the image file's bytes as "
                       "base64, or a data:image/png;base64,... URL", param=param,
                       code="invalid_image") from None


def decode_image(data: bytes, param: str, limits: ImageLimits) -> Image.Image:
    """A fully decoded image (first frame of an animation); raises APIError 400/413/415."""
    if len(data) > limits.max_image_bytes:
        raise _too_many_bytes(len(data), param, limits)
    if not data:
        raise APIError(400, f"'{param}' is empty: send an image file", param=param,
                       code="invalid_image")
    image = _open(data, param)
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise APIError(413, f"'{param}' is {width}x{height} = {width * height} pixels: allowed "
                       f"is at most {limits.max_image_pixels} (--max-image-pixels)",
                       param=param, code="image_too_large")
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise APIError(413, f"'{param}' was refused as a decompression bomb: {exc}",
                       param=param, code="image_too_large") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise APIError(400, f"'{param}' is a {image.format} file that cannot be decoded "
                       f"(truncated or corrupt): {exc}", param=param,
                       code="invalid_image") from exc
    return image


def _open(data: bytes, param: str) -> Image.Image:
    """Parse the header only, with the allowed decoders only."""
    try:
        with warnings.catch_warnings():
            # Sizes past PIL's warning threshold are ours to judge (next check), not a warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except Image.DecompressionBombError as exc:
        raise APIError(413, f"'{param}' was refused as a decompression bomb: {exc}",
                       param=param, code="image_too_large") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise APIError(415, f"'{param}' is {_describe(data)}: allowed formats are "
                       f"{_ALLOWED_TEXT}", param=param, code="unsupported_image_format"
                       ) from exc


def _describe(data: bytes) -> str:
    for signature, name in _KNOWN_OTHERS:
        if data.startswith(signature):
            return f"a {name} file, a format this server does not decode"
    if data.lstrip()[:5].lower() in (b"<?xml", b"<svg "):
        return "an SVG (vector) file, which is not decoded"
    return "not an image in a supported format"


def _too_many_bytes(size: int, param: str, limits: ImageLimits) -> APIError:
    return APIError(413, f"'{param}' has {size} bytes: allowed is at most "
                    f"{limits.max_image_bytes} (--max-image-bytes)", param=param,
                    code="image_too_large")
