"""What every session starts on: the embedded default pair and images, loaded once per server."""
from __future__ import annotations

from dashboard.state._startup import default_error, ensure_defaults, freeze_startup_objects

__all__ = ["default_error", "ensure_defaults", "freeze_startup_objects"]
