"""What the dashboard remembers, by concern; the pages call these public functions, never session keys.

- models (:mod:`._models`): networks A and B, loaded once per server (keyed by SHA-256, or path and mtime),
  their layer listings, and the layer chosen for each;
- images (:mod:`._images`): the image set to compare on;
- runs (:mod:`._runs`): this session's finished comparisons and the one the result pages show;
- jobs (:mod:`._jobs`): background fits (the process-wide :class:`~dashboard.jobs.JobRegistry`) and adopting
  their results;
- views (:mod:`._views`): each run's held-out decomposition, computed once per run and direction so that
  changing the image, channel or order never refits or re-extracts, and the choices pages hand each other;
- studies (:mod:`._studies`): ``kcore <study>`` processes started from the Studies page, their progress and
  Cancel;
- startup (:mod:`._startup`): the embedded default every session starts on;
- paths (:mod:`._paths`): where run folders, exports and study folders are written.

Process-wide objects live in ``st.cache_resource``; per-session ones in ``st.session_state``. What the UI needs
from run folders (the held-out input images, a subset of a decomposition) lives in :mod:`kcore`.
"""
from __future__ import annotations

from dashboard.state._images import (DEFAULT_N_IMAGES, ImageChoice, bundled_images, folder_images, image_size,
                                     images, set_images, upload_token, uploaded_images, working_image_size)
from dashboard.state._jobs import (FitRequest, adopt_finished_jobs, current_job, is_adopted, job_running, registry, session_jobs,
                                   start_fit)
from dashboard.state._jobs import cancel_job, session_key
from dashboard.state._models import (DEFAULT_PAIR, ROLES, ModelSlot, card_text, chosen_layer, clear_slot, forget_layer,
                                     layer_key, load_bytes, load_path, load_server_path, make_slot,
                                     preprocessing_override, sample_models,
                                     set_preprocessing_override, set_slot, slot, with_override)
from dashboard.state._paths import ROOT, allowed_folder, export_folder, exports_dir, runs_dir, studies_dir
from dashboard.state._runs import (ACTIVE_RUN_KEY, DIRECTION_HELP, DIRECTION_TITLES, RunEntry, active_run, add_run,
                                   apply_active_request, counters, open_run_folder, run_folders, runs)
from dashboard.state._startup import default_error, ensure_defaults, freeze_startup_objects
from dashboard.state._studies import (QUICK, SCALES, StudyJob, StudyProgress, cancel_study, start_study, study_jobs,
                                      study_running)
from dashboard.state._studies import progress as study_progress
from dashboard.state._views import (FOOTER_KEY, MAX_DECOMPOSE_BYTES, DecompositionView, decomposition,
                                    explorer_choice, feature_maps, figure1_choice, footer, set_explorer_choice,
                                    set_figure1_choice, show_in_explorer, working_positions)

__all__ = [
    "ACTIVE_RUN_KEY", "FOOTER_KEY", "QUICK", "SCALES", "StudyJob", "StudyProgress", "cancel_study", "start_study", "study_jobs",
    "study_progress", "study_running", "clear_slot", "upload_token", "feature_maps", "footer", "DEFAULT_N_IMAGES", "DEFAULT_PAIR", "DIRECTION_HELP", "DIRECTION_TITLES", "MAX_DECOMPOSE_BYTES",
    "ROLES", "ROOT", "DecompositionView", "ImageChoice", "ModelSlot", "RunEntry", "active_run", "add_run",
    "adopt_finished_jobs", "apply_active_request", "bundled_images", "chosen_layer", "counters", "current_job",
    "decomposition", "default_error", "ensure_defaults", "explorer_choice", "exports_dir", "figure1_choice",
    "folder_images", "forget_layer", "freeze_startup_objects", "image_size", "images", "is_adopted", "job_running",
    "layer_key", "load_bytes", "load_path", "load_server_path", "make_slot", "allowed_folder", "export_folder", "open_run_folder", "registry", "run_folders", "runs",
    "runs_dir", "sample_models", "session_jobs", "set_explorer_choice", "set_figure1_choice", "set_images",
    "set_slot", "show_in_explorer", "slot", "start_fit", "studies_dir", "uploaded_images", "working_image_size",
    "working_positions", "card_text", "preprocessing_override", "set_preprocessing_override",
    "with_override", "cancel_job", "session_key", "FitRequest",
]
