"""kcore: knowledge consistency between neural networks (Liang et al., ICLR 2020).

The workflow, from two checkpoints to the decomposition::

    import kcore
    a = kcore.load_model("sample_models/kshapes_tinynet_s0.safetensors")     # weights + model card
    b = kcore.load_model("sample_models/kshapes_resnet_s0.safetensors")
    kcore.list_layers(b.model, (3, 64, 64), spatial_only=True)              # candidate layers
    cmp = kcore.compare(a, "block2", b, "layer2", kcore.data.sample_images(300))   # extract + fit, A → B
    kcore.write_run(cmp, "runs/ab"); cmp = kcore.read_run("runs/ab")

or, on features already extracted (:func:`extract_features`)::

    res = kcore.fit(x_src, x_tgt, orders=2)     # g_θ reconstructs B's features x* from A's x
    dec = res.decompose(x_src, x_tgt)            # x^(0) … x^(K) and x^Δ, exactly (Eq. 3–4)
    rep = dec.report()                           # a VarianceReport: Var per order, instability, shares

Each name below has an ``Examples::`` section in its docstring. Everything else is imported from its module
(``kcore.gtheta``, ``kcore.metrics``, ``kcore.conventions``, ``kcore.data``, ``kcore.viz``, ...); names that
need torchvision or the pipeline are loaded on first use, so ``import kcore`` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

from kcore._version import __version__ as __version__
from kcore.decompose import Decomposition
from kcore.fit import PRESETS, FitCancelled, FitConfig, FitResult, fit
from kcore.metrics import VarianceReport

load_result = FitResult.load

_LAZY = {
    "load_model": "kcore.checkpoints",
    "LoadedModel": "kcore.checkpoints",
    "list_layers": "kcore.features",
    "extract_features": "kcore.features",
    "compare": "kcore.pipeline",
    "Comparison": "kcore.pipeline",
    "write_run": "kcore.pipeline",
    "read_run": "kcore.pipeline",
}

__all__ = [
    # the workflow
    "load_model", "list_layers", "extract_features", "fit", "compare", "write_run", "read_run", "load_result",
    # the result types
    "LoadedModel", "FitResult", "Decomposition", "VarianceReport", "Comparison",
    # fit's options and its cancellation
    "FitConfig", "PRESETS", "FitCancelled",
]


def __getattr__(name: str) -> Any:
    """The workflow names that live in heavier modules, and kcore's submodules, imported on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"kcore.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"kcore.{name}":
            raise
    raise AttributeError(f"module 'kcore' has no attribute {name!r}. Fix: import it from its module "
                         f"(e.g. kcore.metrics, kcore.gtheta); kcore itself offers {__all__}.")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
