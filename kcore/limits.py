"""One budget for work: every cap on what a single request may ask of the server, in one place.

kcore is meant to be hosted on a shared server, where one browser tab must not be able to hold the machine's
memory or CPU for hours. Each cap below is independent of what a model card or an upload says, and the server's
operator can change it with an environment variable (read at every call of :func:`limits`, so a test can set it
with ``monkeypatch.setenv``). Values are integers; ``8_000``, ``6e10`` and ``8589934592`` are all accepted.

=====================  ===========================  ==============  ================================================
field                  environment variable         default         what it bounds
=====================  ===========================  ==============  ================================================
max_input_side         KCORE_MAX_INPUT_SIDE         2048            longest side (px) of a model input, of a card's
                                                                    ``input_size`` and ``extra.resize_size``, and of
                                                                    the size images are loaded at
max_image_pixels       KCORE_MAX_IMAGE_PIXELS       40 000 000      decoded pixels of one image (width × height, read
                                                                    from the header before decoding): a 6000 × 6000
                                                                    photo passes
max_images             KCORE_MAX_IMAGES             20 000          images in one image set (a zip, an upload, a
                                                                    folder)
max_request_pixels     KCORE_MAX_REQUEST_PIXELS     60 000 000 000  decoded pixels summed over one image set: 5000
                                                                    photos of 12 MP
max_input_bytes        KCORE_MAX_INPUT_BYTES        8 GiB           the model-input tensor of one image set, images
                                                                    × 3 × H × W × 4 bytes (float32): 5000 images at
                                                                    224 px take 2.8 GiB
max_classes            KCORE_MAX_CLASSES            100 000         classifier outputs (``num_classes``) of a model
                                                                    built from a card, the API, the CLI or the
                                                                    dashboard's Classes field
=====================  ===========================  ==============  ================================================

Why these defaults. Images are decoded one at a time and shrunk to the load size at once, so memory is bounded by
one image (``max_image_pixels``: about 120 MB of RGB at 40 MP) plus the image set itself (``max_input_bytes``
float32 when the model sees it, a quarter of that as the stored uint8 pixels). ``max_request_pixels`` therefore
bounds time, not memory: 6e10 pixels are 5000 twelve-megapixel phone photos, roughly ten minutes of one core at
PIL's ~100 MP/s JPEG decoding, the most a 2-core server should give one request; a zip of 100 000 tiny PNGs that a
card asks to upsample to 2048 px stops at ``max_input_bytes`` (about 170 images at 2048², 14 000 at 224²) instead of
heading for terabytes.

Adding a cap: add a field to :class:`Limits` with ``field(default=..., metadata=_cap("KCORE_...", "what it
bounds"))``; :func:`limits`, :data:`ENV_VARS` and the error messages pick it up, and the table above documents it.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


def _cap(env: str, what: str, unit: str = "") -> dict[str, str]:
    """The metadata of one cap: its environment variable, what it bounds (the words after "at most N" in
    messages) and its unit (``"bytes"`` is shown in GiB)."""
    return {"env": env, "what": what, "unit": unit}


class LimitExceeded(ValueError):
    """A request asks for more work than a cap of :class:`Limits` allows.

    Attributes:
        cap_name: the :class:`Limits` field that was hit (e.g. ``"max_classes"``).
        env: the environment variable that sets it (e.g. ``"KCORE_MAX_CLASSES"``).
        asked: what the request asked for.
        cap: the cap in force.
    """

    def __init__(self, message: str, *, cap_name: str, env: str, asked: float, cap: float) -> None:
        super().__init__(message)
        self.cap_name = cap_name
        self.env = env
        self.asked = asked
        self.cap = cap


@dataclass(frozen=True)
class Limits:
    """The caps in force (see the module's table for each field's environment variable and meaning).

    Build the current one with :func:`limits`; build one by hand (``Limits(max_classes=10)``) to test a caller.

    Attributes:
        max_input_side: longest side in pixels of a model input, a card's ``input_size`` / ``resize_size``, and
            the size images are loaded at.
        max_image_pixels: decoded pixels (width × height) of one image.
        max_images: images in one image set.
        max_request_pixels: decoded pixels summed over one image set.
        max_input_bytes: bytes of one image set's float32 model-input tensor (images × 3 × H × W × 4).
        max_classes: classifier outputs of a model kcore builds.
    """

    max_input_side: int = field(default=2048, metadata=_cap(
        "KCORE_MAX_INPUT_SIDE", "pixels on the longest side of a model input"))
    max_image_pixels: int = field(default=40_000_000, metadata=_cap(
        "KCORE_MAX_IMAGE_PIXELS", "decoded pixels (width × height) in one image"))
    max_images: int = field(default=20_000, metadata=_cap(
        "KCORE_MAX_IMAGES", "images in one image set"))
    max_request_pixels: int = field(default=60_000_000_000, metadata=_cap(
        "KCORE_MAX_REQUEST_PIXELS", "decoded pixels summed over the images of one image set"))
    max_input_bytes: int = field(default=8 * 2**30, metadata=_cap(
        "KCORE_MAX_INPUT_BYTES", "of float32 model input per image set (images × 3 × H × W × 4 bytes)", "bytes"))
    max_classes: int = field(default=100_000, metadata=_cap(
        "KCORE_MAX_CLASSES", "classifier outputs (num_classes) per model"))

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{f.name} must be a positive integer; got {value!r}. "
                                 f"Fix: set {f.metadata['env']} to a whole number >= 1 (e.g. {f.default}).")

    def check(self, cap_name: str, asked: float, *, what: str, fix: str, shown: str | None = None) -> None:
        """Raise :class:`LimitExceeded` when ``asked`` is more than the cap ``cap_name``.

        Args:
            cap_name: a field of this class, e.g. ``"max_classes"``.
            asked: what the request asks for, in the cap's unit.
            what: what was asked, in words, with where it came from (e.g. ``"model card 'm.card.json':
                'num_classes'"``); the message starts with it.
            fix: what the user can do instead (a sentence without the final full stop).
            shown: how to show ``asked`` (default: the number, or GiB for bytes), e.g. ``"at least 20,001"``.

        Raises:
            LimitExceeded: ``asked`` is over the cap. The message names what was asked, the cap, the environment
                variable that raises it, and the fix.
            KeyError: ``cap_name`` is not a field.
        """
        cap = getattr(self, cap_name)
        if asked <= cap:
            return
        env = ENV_VARS[cap_name]
        raise LimitExceeded(
            f"{what} is {shown or _show(cap_name, asked)}; this server allows at most {_show(cap_name, cap)} "
            f"{_WHAT[cap_name]} ({env}). Fix: {fix}; or, for the server's operator, raise the cap with {env}=<n> in "
            "the server's environment.",
            cap_name=cap_name, env=env, asked=asked, cap=cap)


ENV_VARS: Mapping[str, str] = {f.name: f.metadata["env"] for f in fields(Limits)}
"""The environment variable of each cap, by :class:`Limits` field name."""

_WHAT: Mapping[str, str] = {f.name: f.metadata["what"] for f in fields(Limits)}
_UNIT: Mapping[str, str] = {f.name: f.metadata.get("unit", "") for f in fields(Limits)}


def limits(environ: Mapping[str, str] | None = None) -> Limits:
    """The caps in force: each :class:`Limits` default, replaced by its environment variable where that is set.

    The environment is read at every call (cheap), so a changed variable takes effect at the next request.

    Args:
        environ: where to read the variables; default ``os.environ``.

    Returns:
        The :class:`Limits`.

    Raises:
        ValueError: a variable is set to something other than a whole number >= 1; the message names it.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Limits):
        raw = env.get(f.metadata["env"])
        if raw is None or not raw.strip():
            continue
        values[f.name] = _parse_int(f.metadata["env"], raw, f.default)
    return Limits(**values)


def input_tensor_bytes(n_images: int, size: tuple[int, int], channels: int = 3, itemsize: int = 4) -> int:
    """Bytes of the model-input tensor ``(n_images, channels, H, W)`` (float32 by default)."""
    return int(n_images) * int(channels) * int(size[0]) * int(size[1]) * int(itemsize)


def _parse_int(name: str, raw: str, example: object) -> int:
    text = raw.strip().replace("_", "")
    try:
        value = int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            as_float = math.nan
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ValueError(f"environment variable {name} must be a whole number >= 1 (e.g. {example}); got "
                             f"{raw!r}. Fix: set it to a whole number, or unset it for the default.") from None
        value = int(as_float)
    if value < 1:
        raise ValueError(f"environment variable {name} must be a whole number >= 1 (e.g. {example}); got {raw!r}. "
                         "Fix: set it to a positive number, or unset it for the default.")
    return value


def _show(cap_name: str, v: float) -> str:
    """A value of cap ``cap_name`` for people: bytes in GiB (and exactly), other values with thousands commas."""
    if _UNIT.get(cap_name) == "bytes":
        return f"{v / 2**30:.2f} GiB ({_number(v)} bytes)"
    return _number(v)


def _number(v: float) -> str:
    """``40000000`` -> ``'40,000,000'``; non-integers as given."""
    if isinstance(v, float) and not v.is_integer():
        return f"{v:g}"
    try:
        return f"{int(v):,}"
    except (OverflowError, ValueError):
        return repr(v)
