"""Variance metrics of Sec. 4.2, per-channel profiles, and the 0-order baselines.

Var(·) follows the paper's definition (Sec. 4.2): the mean squared deviation of every element (over images
and all units c, h, w) from the mean over all images and units,

    Var(x) = E_{I,i} [ (x_{I,i} − E_{I',i'} x_{I',i'})^2 ]          (population variance, one global mean)

The authors' ``Variance.py`` instead centres each channel on its own mean; that variant is reported too,
under ``*_channel_centred``. Both come from one streaming pass of per-channel moments (Chan et al.'s
parallel update in float64), so memory does not grow with the number of images.

Instability (Sec. 4.2) = Var(x^Δ) / Var(x*).

Shares. The paper's Var(x⁽ᵏ⁾)/Var(x*) do not add up (the components are correlated, so a ratio can exceed 1).
The additive share of a part p ∈ {x⁽⁰⁾, …, x⁽ᴷ⁾, x^Δ} is s(p) = Cov(p, x*)/Var(x*), with the same single
global mean; since Σₖ x⁽ᵏ⁾ + x^Δ = x*, the shares sum to exactly 1 (a share can be negative when a part
points against x*). Results are the frozen :class:`VarianceReport` and :class:`ChannelProfile`.

This package is the face; each concept lives in its module:

- :mod:`kcore.metrics.moments`: streaming per-channel moments (:class:`ChannelMoments`, :class:`CrossMoments`)
  and the direct whole-tensor references :func:`paper_var`, :func:`paper_cov`;
- :mod:`kcore.metrics.report`: the results (:class:`VarianceReport`, :class:`ChannelProfile`,
  :class:`ConfidenceIntervals`), their JSON form and text summary;
- :mod:`kcore.metrics.variance`: the streaming pass that builds a report (:class:`VarianceAccumulator`,
  :func:`variance_report`) and its bootstrap over images;
- :mod:`kcore.metrics.linear`: the 0-order baselines (least-squares convolution, R², linear CKA).
"""
from __future__ import annotations

from kcore.metrics.linear import (
    GRAM_DTYPE,
    GRAM_ROWS,
    MAX_LSTSQ_FEATURES,
    Baseline,
    LinearMap,
    effective_kernel,
    fit_linear_map,
    linear_baseline,
    linear_cka,
    r2_score,
)
from kcore.metrics.moments import ChannelMoments, CrossMoments, paper_cov, paper_var
from kcore.metrics.report import (
    CI_BOOTSTRAPS,
    CI_LEVEL,
    CI_MIN_IMAGES,
    CI_SEED,
    CI_WARN_WIDTH,
    REPORT_DEFINITION,
    REPORT_FORMAT,
    ChannelProfile,
    ConfidenceIntervals,
    VarianceReport,
    plus_minus,
    summary_lines,
)
from kcore.metrics.variance import MAX_IMAGE_MOMENTS, ImageMoments, VarianceAccumulator, variance_report

__all__ = [
    "CI_BOOTSTRAPS", "CI_LEVEL", "CI_MIN_IMAGES", "CI_SEED", "CI_WARN_WIDTH", "GRAM_DTYPE", "GRAM_ROWS",
    "MAX_IMAGE_MOMENTS", "MAX_LSTSQ_FEATURES", "REPORT_DEFINITION", "REPORT_FORMAT", "Baseline", "ChannelMoments",
    "ChannelProfile", "ConfidenceIntervals", "CrossMoments", "ImageMoments", "LinearMap", "VarianceAccumulator",
    "VarianceReport", "effective_kernel", "fit_linear_map", "linear_baseline", "linear_cka", "paper_cov",
    "paper_var", "plus_minus", "r2_score", "summary_lines", "variance_report",
]
