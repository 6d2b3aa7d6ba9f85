"""Background fits of this session: the typed request, starting and cancelling a fit, adopting finished ones."""
from __future__ import annotations

from dashboard.state._jobs import (
    FitRequest,
    adopt_finished_jobs,
    baseline_job,
    cancel_job,
    current_job,
    is_adopted,
    job_running,
    registry,
    session_jobs,
    session_key,
    start_fit,
)

__all__ = ["FitRequest", "adopt_finished_jobs", "baseline_job", "cancel_job", "current_job", "is_adopted", "job_running", "registry",
           "session_jobs", "session_key", "start_fit"]
