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
max_jobs               KCORE_MAX_JOBS               2               dashboard jobs (fits and studies) running at
                                                                    once on the server; more wait in one FIFO queue
max_session_jobs       KCORE_MAX_SESSION_JOBS       1               jobs one browser session may have waiting or
                                                                    running
job_orphan_seconds     KCORE_JOB_ORPHAN_SECONDS     120             a job is cancelled when its browser session has
                                                                    been gone (tab closed) this long
max_fit_epochs         KCORE_MAX_FIT_EPOCHS         1000            epochs of one fit of g_θ (the authors' preset
                                                                    runs 1000); also a study's ``--fit-epochs``
max_fit_work           KCORE_MAX_FIT_WORK           20 000 000      a dashboard fit's image-epochs: epochs × images
                                                                    × directions × (1 + chance baselines): 5000
                                                                    images, 1000 epochs, one direction, baselines
max_orders             KCORE_MAX_ORDERS             6               K, the highest order of g_θ
max_seed               KCORE_MAX_SEED               2 147 483 647   a seed (torch and numpy take 32-bit seeds)
max_coefficient        KCORE_MAX_COEFFICIENT        100             λ, and a study's ``--lam``, ``--lambd``,
                                                                    ``--tau``, ``--weight-decay``
max_study_lr           KCORE_MAX_STUDY_LR           10              a study's learning rates
max_study_images       KCORE_MAX_STUDY_IMAGES       10 000          a study's ``--n-train``, ``--n-test``,
                                                                    ``--n-images``
max_study_image_size   KCORE_MAX_STUDY_IMAGE_SIZE   224             a study's ``--image-size`` (px)
max_study_epochs       KCORE_MAX_STUDY_EPOCHS       200             a study's training epochs (``--epochs``,
                                                                    ``--teacher-epochs``, ``--finetune-epochs``)
max_study_repeats      KCORE_MAX_STUDY_REPEATS      20              a study's ``--repeats``, ``--generations``,
                                                                    ``--n-maps``
max_study_batch        KCORE_MAX_STUDY_BATCH        1024            a study's ``--batch-size``
=====================  ===========================  ==============  ================================================

The Studies page's typed options are capped through :data:`kcore.study_options.STUDY_CAPS` (option name → field
above), the Fit page's K, λ, epochs, seed and cost by ``dashboard.jobs.check_fit_request``.

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
        max_jobs, max_session_jobs, job_orphan_seconds: the dashboard's job queue (``dashboard.jobs.JobRegistry``).
        max_fit_epochs, max_fit_work, max_orders, max_seed, max_coefficient: a fit's options and its cost.
        max_study_lr, max_study_images, max_study_image_size, max_study_epochs, max_study_repeats,
            max_study_batch: a study's typed options (:data:`kcore.study_options.STUDY_CAPS`).
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
    # the dashboard's jobs (dashboard/jobs.py) and the typed options of the Fit and Studies pages
    max_jobs: int = field(default=2, metadata=_cap(
        "KCORE_MAX_JOBS", "jobs (fits and studies) running at once"))
    max_session_jobs: int = field(default=1, metadata=_cap(
        "KCORE_MAX_SESSION_JOBS", "jobs waiting or running per browser session"))
    job_orphan_seconds: int = field(default=120, metadata=_cap(
        "KCORE_JOB_ORPHAN_SECONDS", "seconds a job outlives its closed browser session"))
    max_fit_epochs: int = field(default=1000, metadata=_cap(
        "KCORE_MAX_FIT_EPOCHS", "epochs per fit of g_θ"))
    max_fit_work: int = field(default=20_000_000, metadata=_cap(
        "KCORE_MAX_FIT_WORK", "image-epochs per fit request (epochs × images × directions × (1 + baselines))"))
    max_orders: int = field(default=6, metadata=_cap(
        "KCORE_MAX_ORDERS", "for K, the highest order of g_θ"))
    max_seed: int = field(default=2**31 - 1, metadata=_cap(
        "KCORE_MAX_SEED", "for a seed"))
    max_coefficient: int = field(default=100, metadata=_cap(
        "KCORE_MAX_COEFFICIENT", "for a penalty, weight or temperature (λ, weight decay, τ)"))
    max_study_lr: int = field(default=10, metadata=_cap(
        "KCORE_MAX_STUDY_LR", "for a study's learning rate"))
    max_study_images: int = field(default=10_000, metadata=_cap(
        "KCORE_MAX_STUDY_IMAGES", "images per study split"))
    max_study_image_size: int = field(default=224, metadata=_cap(
        "KCORE_MAX_STUDY_IMAGE_SIZE", "pixels for a study's image size"))
    max_study_epochs: int = field(default=200, metadata=_cap(
        "KCORE_MAX_STUDY_EPOCHS", "training epochs per study network"))
    max_study_repeats: int = field(default=20, metadata=_cap(
        "KCORE_MAX_STUDY_REPEATS", "repeats, generations or maps per study"))
    max_study_batch: int = field(default=1024, metadata=_cap(
        "KCORE_MAX_STUDY_BATCH", "images per study batch"))

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
