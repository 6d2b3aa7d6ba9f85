"""kcore: knowledge consistency between neural networks (Liang et al., ICLR 2020).

    import kcore
    res = kcore.fit(x_src, x_tgt, orders=2)     # g_θ reconstructs B's features x* from A's x
    dec = res.decompose(x_src, x_tgt)            # x^(0) … x^(K) and x^Δ, exactly (Eq. 3–4)
    rep = dec.report()                           # Var per order, Var(x^Δ), Var(x*), instability, per channel
"""
from kcore.conventions import CONVENTIONS, Normalization
from kcore.decompose import Decomposition, components
from kcore.fit import PRESETS, FitCancelled, FitConfig, FitProgress, FitResult, fit, make_config
from kcore.gtheta import GTheta, GThetaSpec, gtheta_loss
from kcore.metrics import linear_baseline, linear_cka, variance_report

load_result = FitResult.load

__all__ = [
    "CONVENTIONS", "PRESETS", "Decomposition", "FitCancelled", "FitConfig", "FitProgress", "FitResult",
    "GTheta", "GThetaSpec", "Normalization", "components", "fit", "gtheta_loss", "linear_baseline",
    "linear_cka", "load_result", "make_config", "variance_report",
]
__version__ = "0.1.0"
