"""The Models page with a torchvision checkpoint without a card: its standard preprocessing and inferred class count
are shown, the user's input size / mean / std override them, and the model card it saves round-trips."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streamlit.testing.v1 import AppTest  # noqa: E402

from kcore.cards import card_path_for  # noqa: E402
from kcore.checkpoints import file_sha256, load_model  # noqa: E402
from kcore.preprocessing import IMAGENET_MEAN, preprocessing_of  # noqa: E402

APP = str(ROOT / "dashboard" / "app.py")


@pytest.fixture()
def server_checkpoint(tmp_path, monkeypatch) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "mnet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=12).state_dict(), path)
    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(tmp_path))
    for name, sub in (("KCORE_RUNS_DIR", "runs"), ("KCORE_EXPORTS_DIR", "exports")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(name, str(tmp_path / sub))
    return path


def test_models_page_shows_edits_and_saves_preprocessing(server_checkpoint: Path) -> None:
    at = AppTest.from_file(APP, default_timeout=90).run()
    assert not at.exception, [e.value for e in at.exception]
    at.segmented_control(key="kc_src_A").set_value("path").run()
    at.text_input(key="kc_path_A").set_value(str(server_checkpoint))
    at.selectbox(key="kc_arch_A").set_value("mobilenet_v3_small").run()
    at.button(key="kc_loadpath_A").click().run()
    assert not at.exception and not [e.value for e in at.error], [e.value for e in at.error]
    slot = at.session_state["kc_slot_A"]
    assert slot.loaded.num_classes == 12 and slot.input_size == (3, 224, 224)
    captions = " ".join(c.value for c in at.caption)
    assert "12 classes (inferred from the weights)" in captions
    assert "224×224 (shorter side 256, centre crop)" in captions and "torchvision's standard" in captions

    key = f"kc_prep_A_{file_sha256(server_checkpoint)[:12]}"
    at.number_input(key=f"{key}_h").set_value(160)
    at.number_input(key=f"{key}_w").set_value(192)
    at.number_input(key=f"{key}_m0").set_value(0.5)
    at.button(key=f"{key}_apply").click().run()
    assert not at.exception, [e.value for e in at.exception]
    slot = at.session_state["kc_slot_A"]
    prep = preprocessing_of(slot.loaded)
    assert slot.input_size == (3, 160, 192) and prep.input_size == (160, 192)
    assert prep.mean == (0.5, IMAGENET_MEAN[1], IMAGENET_MEAN[2]) and "set on the Models page" in prep.source
    at.run()  # the override survives a rerun
    assert at.session_state["kc_slot_A"].input_size == (3, 160, 192)

    # the card is offered as a download only (the dashboard never writes beside a server checkpoint); the user
    # keeps the downloaded card beside the file
    assert not [b for b in at.button if b.key == f"{key}_save"]
    from dashboard.state import card_text

    card_file = card_path_for(server_checkpoint)
    card_file.write_text(card_text(at.session_state["kc_slot_A"]))
    again = load_model(server_checkpoint)  # no arch, no class count: the saved card says both
    back = preprocessing_of(again)
    assert (again.architecture, again.num_classes) == ("mobilenet_v3_small", 12)
    assert (back.input_size, back.resize_size, back.mean, back.std) == (
        prep.input_size, prep.resize_size, prep.mean, prep.std)
    assert os.path.getsize(card_file) > 0
