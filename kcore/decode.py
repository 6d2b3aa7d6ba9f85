"""Image bytes to pixels: decode under the pixel caps, resize without stretching, scale to [0, 1].

Pure functions on bytes and arrays, shared by every loader of :mod:`kcore.data` and :mod:`kcore.imagesets`.
"""
from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from kcore import synthetic
from kcore.limits import Limits
from kcore.limits import limits as current_limits

ResizeMode = Literal["stretch", "center_crop"]
RESIZE_MODES: dict[str, str] = {
    "stretch": "resize to the input size, ignoring the aspect ratio",
    "center_crop": "scale the shorter side to fit, then crop the centre",
}
"""Valid resize modes and what each does."""

# What PIL raises on bad input: unidentified (OSError), truncated (OSError), broken PNG
# chunks (SyntaxError), bad headers (ValueError, struct.error, EOFError, zlib.error) and
# decompression bombs (its own error class).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 RGB ``(H, W, 3)`` or ``(N, H, W, 3)`` → float32 ``(3, H, W)`` / ``(N, 3, H, W)`` in [0, 1]."""
    return synthetic.normalize(images, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def resize_image(image: np.ndarray, size: tuple[int, int],
                 mode: ResizeMode = "center_crop") -> np.ndarray:
    """Resize a uint8 ``(H, W, 3)`` image to ``size = (h, w)`` (bilinear, PIL).

    ``"center_crop"`` (the default) scales the shorter side to fit and crops the centre, so a non-square photo is
    never stretched; for an image of the target's aspect ratio it gives the same pixels as ``"stretch"``.
    """
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    pil = Image.fromarray(image)
    if mode == "center_crop":
        pil = ImageOps.fit(pil, (w, h), Image.Resampling.BILINEAR)
    else:
        pil = pil.resize((w, h), Image.Resampling.BILINEAR)
    return np.array(pil, dtype=np.uint8)


def decode_image(data: bytes, *, limits: Limits | None = None) -> np.ndarray:
    """Decode image bytes to uint8 ``(H, W, 3)`` RGB (EXIF orientation applied, alpha dropped).

    The size is read from the header first: an image of more than ``max_image_pixels`` pixels is refused before
    any pixel is decoded (a 21 kB 1-bit PNG can hold 13 300² pixels).

    Args:
        data: the file's bytes.
        limits: the caps (default: :func:`kcore.limits.limits`, i.e. the server's environment).

    Raises:
        LimitExceeded: the image has more pixels than ``limits.max_image_pixels`` (a ``ValueError``).
        OSError, ValueError, SyntaxError, ...: the bytes are not a readable image (see
            ``_DECODE_ERRORS``).
    """
    return _decode(data, limits if limits is not None else current_limits(), None)


def _decode(data: bytes, lim: Limits, before_decoding: Callable[[int], None] | None) -> np.ndarray:
    """:func:`decode_image`, calling ``before_decoding(pixels)`` once the header is read (a per-request budget)."""
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own limit (2 × its MAX_IMAGE_PIXELS) hit in the header
        found = re.search(r"\((\d+) pixels\)", str(exc))
        asked = int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1
        lim.check("max_image_pixels", asked, what="the image's size (from its header: PIL's DecompressionBombError)",
                  shown=f"{asked:,} pixels", fix="downscale the image before using it (the model sees it at its "
                  "input size, e.g. 224×224, anyway)")
        raise  # the operator raised our cap above PIL's: PIL's bomb limit stays on
    with opened as img:
        w, h = img.size
        lim.check("max_image_pixels", w * h, shown=f"{w}×{h} = {w * h:,} pixels (mode {img.mode})",
                  what="the image's size (from its header, before decoding)",
                  fix="downscale the image before using it (the model sees it at its input size, e.g. 224×224, "
                      "anyway)")
        if before_decoding is not None:
            before_decoding(w * h)
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16") or img.mode == "I":
            # 16-bit grey (PNG, TIFF): PIL's convert("RGB") clips at 255 (a white image); scale to 8 bits instead
            # in place, in 32 bits (65535 * 255 + 32767 fits): one temporary of 4 bytes a pixel, not 16
            wide = np.asarray(img).astype(np.int32)
            np.clip(wide, 0, 65535, out=wide)
            wide *= 255
            wide += 32767
            wide //= 65535
            return np.repeat(wide.astype(np.uint8)[:, :, None], 3, axis=2)
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
