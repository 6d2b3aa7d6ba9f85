"""Where the dashboard writes (runs, exports, studies) and which typed folders it accepts."""
from __future__ import annotations

from dashboard.state._paths import ROOT, allowed_folder, export_folder, exports_dir, runs_dir, studies_dir

__all__ = ["ROOT", "allowed_folder", "export_folder", "exports_dir", "runs_dir", "studies_dir"]
