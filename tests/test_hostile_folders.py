"""Study and run folders are read like uploads: every payload is built at test time.

A study folder with symlinks out, a ``/dev/zero`` "csv" and a FIFO; a run folder's ``heldout_images.npz`` that
would inflate past its cap; run folders with edited types or NaN features; a fit kernel larger than the map.
Each case ends in a clear error (or the file left out with a note), nothing outside the folder is read, memory
stays bounded (measured) and nothing hangs.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import kcore

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fit kernel
@pytest.mark.parametrize(("size", "kernel", "largest"), [((1, 1), 5, 3), ((2, 5), 7, 5), ((3, 3), 9, 7)])
def test_a_kernel_larger_than_the_map_is_a_clear_error_before_training(size, kernel, largest, one_thread):
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(12, 4, *size, generator=g), torch.randn(12, 3, *size, generator=g)
    calls = []
    with pytest.raises(ValueError) as e:
        kcore.fit(xs, xt, kernel_size=kernel, epochs=1, device="cpu", progress=calls.append)
    msg = str(e.value)
    assert f"kernel_size={kernel}" in msg and f"H×W = {size[0]}×{size[1]}" in msg
    assert f"at most 2·min(H, W)+1 = {largest}" in msg and f"Fix: pass kernel_size={largest} or smaller" in msg
    assert calls == []  # refused before the fit reported its first phase
    # the largest kernel the message allows does fit
    res = kcore.fit(xs, xt, kernel_size=largest, epochs=1, device="cpu")
    assert res.model.spec.kernel_size == largest and math.isfinite(res.heldout_error)
