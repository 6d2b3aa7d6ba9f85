"""What the result pages show: each run's held-out decomposition (once per run and direction), the choices pages
hand each other, and the page widgets' remembered values."""
from __future__ import annotations

from dashboard.state._views import (
    FOOTER_KEY,
    MAX_DECOMPOSE_BYTES,
    DecompositionView,
    decomposition,
    explorer_choice,
    export_result,
    feature_maps,
    figure1_choice,
    footer,
    keep_valid,
    set_explorer_choice,
    set_export_result,
    set_figure1_choice,
    set_widget_value,
    show_in_explorer,
    widget_value,
    working_positions,
)

__all__ = ["FOOTER_KEY", "MAX_DECOMPOSE_BYTES", "DecompositionView", "decomposition", "explorer_choice",
           "export_result", "feature_maps", "figure1_choice", "footer", "keep_valid", "set_explorer_choice",
           "set_export_result", "set_figure1_choice", "set_widget_value", "show_in_explorer", "widget_value",
           "working_positions"]
