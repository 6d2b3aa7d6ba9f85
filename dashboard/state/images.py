"""The image set to compare on: bundled, a server folder or an upload, and the size it is loaded at."""
from __future__ import annotations

from dashboard.state._images import (
    DEFAULT_N_IMAGES,
    GROUPINGS,
    ImageChoice,
    bundled_images,
    folder_images,
    group_images,
    image_size,
    images,
    set_images,
    upload_token,
    uploaded_images,
    working_image_size,
)

__all__ = ["DEFAULT_N_IMAGES", "GROUPINGS", "ImageChoice", "bundled_images", "folder_images", "group_images",
           "image_size", "images", "set_images", "upload_token", "uploaded_images", "working_image_size"]
