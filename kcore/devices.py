"""Devices: the one place that turns a user's device preference into a torch.device, and what the CPU can do."""
from __future__ import annotations

import torch

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def resolve_device(pref: str | torch.device | None = "auto") -> torch.device:
    """Turn a device preference into a ``torch.device``.

    Args:
        pref: ``"auto"`` or ``None`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or a ``torch.device``.

    Returns:
        The resolved device.

    Raises:
        ValueError: for an unknown name, or CUDA asked for on a machine without it.
    """
    if pref is None or (isinstance(pref, str) and pref.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(pref.strip().lower() if isinstance(pref, str) else pref)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be one of {DEVICE_CHOICES} (or 'cuda:N'); got {pref!r}. "
            "Fix: pass device='auto' to use CUDA when present and the CPU otherwise."
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={pref!r} asks for CUDA, but torch.cuda.is_available() is False on this machine. "
            "Fix: pass device='auto' or device='cpu'."
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of {DEVICE_CHOICES}; got {pref!r}.")
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo).

    Returns:
        True when one of the two flags is listed; False otherwise, and where /proc/cpuinfo cannot be read.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
