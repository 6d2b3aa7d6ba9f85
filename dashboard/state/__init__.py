"""What the dashboard remembers, by concern; pages import the concern they need and never touch session keys.

- :mod:`.models`: networks A and B, loaded once per server (keyed by SHA-256, or path and mtime), their layer
  listings, and the layer chosen for each;
- :mod:`.images`: the image set to compare on;
- :mod:`.runs`: this session's finished comparisons and the one the result pages show;
- :mod:`.jobs`: background fits (the process-wide :class:`~dashboard.jobs.JobRegistry`), their typed request, and
  adopting their results;
- :mod:`.views`: each run's held-out decomposition, computed once per run and direction so that changing the
  image, channel or order never refits or re-extracts, the choices pages hand each other, and widget values;
- :mod:`.studies`: ``kcore <study>`` processes started from the Studies page, their progress and Cancel;
- :mod:`.startup`: the embedded default every session starts on;
- :mod:`.paths`: where run folders, exports and study folders are written.

Each concern module is a face over its implementation (``_models.py`` …). Process-wide objects live in
``st.cache_resource``; per-session ones in ``st.session_state``. What the UI needs from run folders (the held-out
input images, a subset of a decomposition) lives in :mod:`kcore`. This package itself re-exports only the few names
that the figures module and the tests read.
"""
from __future__ import annotations

from dashboard.state import images, jobs, models, paths, runs, startup, studies, views
from dashboard.state.jobs import registry
from dashboard.state.models import DEFAULT_PAIR, card_text, sample_models
from dashboard.state.paths import export_folder, exports_dir, runs_dir
from dashboard.state.runs import DIRECTION_TITLES, RunEntry
from dashboard.state.studies import StudyJob
from dashboard.state.views import DecompositionView, decomposition, feature_maps

__all__ = [
    "images", "jobs", "models", "paths", "runs", "startup", "studies", "views",
    "DEFAULT_PAIR", "DIRECTION_TITLES", "DecompositionView", "RunEntry", "StudyJob", "card_text", "decomposition",
    "export_folder", "exports_dir", "feature_maps", "registry", "runs_dir", "sample_models",
]
