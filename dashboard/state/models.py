"""Networks A and B: loading (once per server), their slots, layers and preprocessing overrides."""
from __future__ import annotations

from dashboard.state._models import (
    DEFAULT_PAIR,
    ROLES,
    ModelSlot,
    architectures,
    card_text,
    chosen_layer,
    clear_slot,
    forget_layer,
    keep_layer,
    layer_key,
    load_bytes,
    load_path,
    load_server_path,
    make_slot,
    preprocessing_override,
    sample_models,
    set_preprocessing_override,
    set_slot,
    slot,
    with_override,
)

__all__ = ["DEFAULT_PAIR", "ROLES", "ModelSlot", "architectures", "card_text", "chosen_layer", "clear_slot", "forget_layer",
           "keep_layer", "layer_key", "load_bytes", "load_path", "load_server_path", "make_slot",
           "preprocessing_override", "sample_models", "set_preprocessing_override", "set_slot", "slot", "with_override"]
