"""``kcore <study>`` processes started from the Studies page: starting, progress and Cancel."""
from __future__ import annotations

from dashboard.state._studies import (
    QUICK,
    SCALES,
    StudyJob,
    StudyProgress,
    cancel_study,
    expected_time,
    finished_studies,
    needs_page_rerun,
    open_chosen_study,
    progress,
    start_study,
    study_jobs,
    study_running,
)

__all__ = ["QUICK", "SCALES", "StudyJob", "StudyProgress", "cancel_study", "expected_time", "finished_studies",
           "needs_page_rerun", "open_chosen_study", "progress", "start_study",
           "study_jobs", "study_running"]
