"""Helpers several test modules share: tiny seeded networks and their :class:`kcore.checkpoints.LoadedModel`,
and the drawn-text checks of figures (overlapping texts, texts past the figure's edge).

Import them as ``from helpers import tiny_net, loaded`` (pytest puts ``tests/`` on ``sys.path``); fixtures
live in ``tests/conftest.py``. A test module never imports another test module.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from torch import nn

from kcore.checkpoints import LoadedModel

SAMPLE_MODELS = Path(__file__).resolve().parents[1] / "sample_models"


def tiny_net(seed: int, width: int = 6) -> nn.Module:
    """A seeded conv → ReLU → conv → ReLU → pool → linear classifier of 3 classes, in eval mode.

    Args:
        seed: torch's global seed for the initial weights (the same seed gives the same network).
        width: channels of both convolutions; module ``"2"`` is the second convolution.

    Returns:
        The network, with in-place ReLUs (to check that captured features are cloned).
    """
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3)).eval()


def plain_net(seed: int, width: int) -> nn.Module:
    """Conv-ReLU-conv-ReLU-pool-linear with plain (not in-place) ReLUs, seeded, in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3)).eval()


def loaded(model: nn.Module, name: str) -> LoadedModel:
    """``model`` as a state-dict checkpoint called ``name``, with a sha256 made from the name (no file).

    Args:
        model: the network.
        name: the checkpoint's file name.

    Returns:
        A :class:`LoadedModel` without a card; two names give two different hashes.
    """
    return LoadedModel(model, name, hashlib.sha256(name.encode()).hexdigest(), "state_dict", None,
                       sum(p.numel() for p in model.parameters()))


def copy_sample(name: str, folder: Path) -> Path:
    """The bundled sample checkpoint ``name`` (e.g. ``"kshapes_tinynet_s0"``) and its model card, copied into
    ``folder`` (made if missing); returns the checkpoint's new path."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".card.json"):
        shutil.copy(SAMPLE_MODELS / f"{name}{suffix}", folder / f"{name}{suffix}")
    return folder / f"{name}.safetensors"


def drawn_texts(fig: Figure) -> list[tuple[Text, object]]:
    """(text, its box in display pixels) of every drawn, non-empty text, after one draw (tick labels of ticks
    outside their axis' view are kept by matplotlib but not drawn: left out)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    r = canvas.get_renderer()
    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - 1e-9 * (hi - lo) <= tick.get_loc() <= hi + 1e-9 * (hi - lo):
                    hidden |= {id(tick.label1), id(tick.label2)}
    return [(t, t.get_window_extent(r)) for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and t.get_figure() is not None and id(t) not in hidden
            and (t.axes is None or t.axes.get_visible())]


def overlapping_texts(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of texts whose boxes overlap by more than a pixel each way."""
    boxes = drawn_texts(fig)
    out = []
    for i, (a, ba) in enumerate(boxes):
        for b, bb in boxes[i + 1:]:
            w = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)
            h = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
            if w > 1 and h > 1:
                out.append((a.get_text(), b.get_text()))
    return out


def texts_outside(fig: Figure) -> list[str]:
    """Texts that reach past the figure's edge (an export would cut them)."""
    W, H = fig.bbox.width, fig.bbox.height
    return [t.get_text() for t, b in drawn_texts(fig) if b.x0 < -0.5 or b.y0 < -0.5 or b.x1 > W + 0.5 or b.y1 > H + 0.5]


def open_run_folder(at, folder: Path | str, page: str | None = None):
    """Open a run (or sweep) folder in a dashboard AppTest the way a user does (the Fit page's *Open a run
    folder* box), then, with ``page`` (e.g. ``"overview"``), switch to ``dashboard/app_pages/<page>.py``."""
    at.switch_page("app_pages/fit.py").run()
    at.text_input(key="kc_open_path").input(str(folder)).run()
    at.button(key="kc_open_go").click().run()
    if page is not None:
        at.switch_page(f"app_pages/{page}.py").run()
    return at


def run_job(args: list[str], out: Path) -> dict:
    """Run a job script (a plain process or ``python -m torch.distributed.run ...``) from the repository root, with
    one thread per process and none of an outer torchrun's variables, and return the JSON it wrote to ``out``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    root = Path(__file__).resolve().parents[1]
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(root), KCORE_DIST_TIMEOUT="120")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=400, env=env, cwd=root)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(out.read_text())


def planted_relu_pair(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, 4, 4, 4) and x* = W(x + 2 ReLU(Cx)) + noise, which a g_θ with orders up to 1 (1×1 kernels) expresses
    exactly: the planted order-1 target of the nested-fit tests (W's rows centred, C orthogonal)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    ca, cb = 4, 3
    w = torch.randn(cb, ca, 1, 1, generator=g)
    w = w - w.mean(1, keepdim=True)
    c = torch.linalg.qr(torch.randn(ca, ca, generator=g))[0].view(ca, ca, 1, 1)
    x = torch.randn(n, ca, 4, 4, generator=g)
    return x, F.conv2d(x + 2.0 * F.relu(F.conv2d(x, c)), w) + 0.3 * torch.randn(n, cb, 4, 4, generator=g)
