"""Draw the dashboard's app icon, assets/icon.png (64 × 64 PNG), from code: no icon or font is fetched.

Two overlapping discs, network A (blue) and network B (red) of the diverging colour map, their overlap in the
map's neutral middle: what two networks know in common.

    python tools/make_icon.py            # rewrites assets/icon.png (deterministic: same bytes every run)
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "assets" / "icon.png"
SIZE = 64


def icon(size: int = SIZE) -> np.ndarray:
    """The icon as an (size, size, 4) uint8 RGBA array (anti-aliased by 4× supersampling)."""
    s = 4 * size
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    r = 0.30 * s
    in_a = (xx - 0.38 * s) ** 2 + (yy - 0.5 * s) ** 2 <= r**2
    in_b = (xx - 0.62 * s) ** 2 + (yy - 0.5 * s) ** 2 <= r**2
    rgba = np.zeros((s, s, 4), np.float64)
    blue, red, mid = np.array([33, 102, 172, 255]), np.array([178, 24, 43, 255]), np.array([247, 247, 247, 255])
    rgba[in_a & ~in_b] = blue
    rgba[in_b & ~in_a] = red
    rgba[in_a & in_b] = mid
    ring = (np.abs(np.hypot(xx - 0.38 * s, yy - 0.5 * s) - r) < 0.035 * s) | \
           (np.abs(np.hypot(xx - 0.62 * s, yy - 0.5 * s) - r) < 0.035 * s)
    rgba[ring] = np.array([31, 78, 121, 255])  # the theme's primary colour
    small = rgba.reshape(size, 4, size, 4, 4).mean(axis=(1, 3))
    return np.round(small).astype(np.uint8)


def png_bytes(size: int = SIZE) -> bytes:
    """The icon as PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(icon(size), "RGBA").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(png_bytes())
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")
