"""Shared test fixtures: threads, the ``needs_cuda`` skip, the tiny kshapes data and models the study tests share, and
a headless Debian Chromium for the browser tests.

Plain helper functions and classes (tiny networks, :class:`LoadedModel` wrappers) live in ``tests/helpers.py``.
"""
from __future__ import annotations

import json

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test marked ``needs_cuda`` where torch sees no CUDA device (the marker alone is enough)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("needs_cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: the machine is shared, and results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Every test leaves torch's thread count as it found it (a CLI test may pass --threads)."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_fit():
    """g_θ settings of the study tests: K = 2, one epoch (seconds, not a converged fit)."""
    from kcore.experiments._fits import FitSettings

    return FitSettings(orders=2, lam=0.1, epochs=1, seed=0)


@pytest.fixture(scope="session")
def tiny_kshapes():
    """kshapes at 32 px (40 train, 20 test, 30 fit images) and a kc_resnet trained for one epoch on one thread."""
    from kcore.experiments._study import torch_threads
    from kcore.imagesets import study_data
    from kcore.training import train_classifier

    with torch_threads(1):
        data = study_data("kshapes", image_size=32, n_train=40, n_test=20, n_images=30)
        model = train_classifier("kc_resnet", data.train, None, epochs=1, seed=0).model
    return data, model


@pytest.fixture(scope="session")
def kshapes_train_test():
    """32 training and 16 test kshapes images at 32 px, in [0, 1] (each model's card normalises them)."""
    from kcore.data import labelled_images

    return labelled_images("kshapes", "train", 32, 32), labelled_images("kshapes", "test", 16, 32)


@pytest.fixture(scope="session")
def without_timings():
    """A study result's ``as_dict()`` as JSON values without wall times (to compare two runs exactly)."""
    def numbers(d: dict) -> dict:
        d = json.loads(json.dumps(d))
        d.pop("seconds", None)
        for arm in d.get("arms", ()):
            arm.pop("seconds", None)
        return d

    return numbers


class RandomImages(torch.utils.data.Dataset):
    """``n`` seeded random images (3, size, size) in [0, 1] with labels ``i % 3``, ``ids`` and ``raw(i)``."""

    def __init__(self, n: int = 40, size: int = 16, id_format: str = "img{:03d}") -> None:
        self.x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
        self.ids = [id_format.format(i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i % 3

    def raw(self, i: int):
        return (self.x[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="session")
def random_images():
    """:class:`RandomImages` (the class: call it with n, size, id_format)."""
    return RandomImages


@pytest.fixture(scope="module")
def browser():
    """A headless Debian Chromium driven by Playwright (skips without either; never ``playwright install``)."""
    from dashboard.serve import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS))
        yield b
        b.close()
