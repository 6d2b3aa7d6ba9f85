"""This session's finished comparisons, the one the result pages show, and run folders re-opened."""
from __future__ import annotations

from dashboard.state._runs import (
    ACTIVE_RUN_KEY,
    DIRECTION_HELP,
    DIRECTION_TITLES,
    RunEntry,
    active_run,
    add_run,
    apply_active_request,
    counters,
    open_run_folder,
    run_folders,
    runs,
)

__all__ = ["ACTIVE_RUN_KEY", "DIRECTION_HELP", "DIRECTION_TITLES", "RunEntry", "active_run", "add_run",
           "apply_active_request", "counters", "open_run_folder", "run_folders", "runs"]
