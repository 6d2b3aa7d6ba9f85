"""Dashboard pages under AppTest: the default opens ready, uploads, a background fit, the views, export.

The fit runs in the dashboard's worker thread; the tests poll ``at.run()`` until the session adopts the
result. Counting wrappers around the pipeline's ``extract_features`` and ``fit`` show that changing the
image, channel or order afterwards neither re-extracts nor refits.
"""
from __future__ import annotations

import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch  # imported here so the first AppTest run does not pay for it

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streamlit.testing.v1 import AppTest  # noqa: E402

import kcore.pipeline  # noqa: E402
from dashboard import state  # noqa: E402
from helpers import open_run_folder  # noqa: E402

APP = str(ROOT / "dashboard" / "app.py")
PAGES = ["setup", "fit", "overview", "explorer", "filters", "figure1", "export"]
FIT_TIMEOUT = 600.0  # a guard against a hang, not a speed target (the fit takes ~20 s idle, minutes under load)


def _samples() -> dict[str, Path]:
    found = state.sample_models()
    if not all(name in found for name in state.DEFAULT_PAIR):
        pytest.fail(f"the sample models {state.DEFAULT_PAIR} are missing from sample_models/ (found {sorted(found)})")
    return found


def _new_app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=60)


def _clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def _wait_for_run(at: AppTest, n_runs: int, timeout: float = FIT_TIMEOUT) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        time.sleep(0.5)
        at.run()
        job = state.registry().get(at.session_state["kc_jobs"][-1])
        # the fit's own result is adopted before its chance baselines end: wait for the job itself
        if len(at.session_state["kc_runs"]) >= n_runs and (job is None or not job.running):
            at.run()  # adopt the final result (with the baselines)
            return
        if job is not None and job.state in ("failed", "cancelled"):
            pytest.fail(f"the fit ended {job.state}: {job.error}")
    pytest.fail(f"the fit did not finish within {timeout} s")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    runs, exports = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("exports")
    names = ("KCORE_RUNS_DIR", "KCORE_EXPORTS_DIR")
    old = {n: os.environ.get(n) for n in names}
    os.environ.update(dict(zip(names, (str(runs), str(exports)))))
    assert (state.runs_dir(), state.exports_dir()) == (runs, exports)
    yield runs, exports
    for n, v in old.items():
        if v is None:
            os.environ.pop(n, None)
        else:
            os.environ[n] = v


@pytest.fixture(scope="module")
def calls():
    """Count the pipeline's feature extractions and fits (the worker thread calls them)."""
    counts = {"extract": 0, "fit": 0}
    orig_extract, orig_fit = kcore.pipeline.extract_features, kcore.pipeline.fit

    def extract(*a, **k):
        counts["extract"] += 1
        return orig_extract(*a, **k)

    def fit(*a, **k):
        counts["fit"] += 1
        return orig_fit(*a, **k)

    kcore.pipeline.extract_features, kcore.pipeline.fit = extract, fit
    yield counts
    kcore.pipeline.extract_features, kcore.pipeline.fit = orig_extract, orig_fit


@pytest.fixture(scope="module")
def fitted(dirs, calls):
    """One session that ran the default comparison (60 bundled images, 2 epochs) to the end."""
    _samples()
    at = _new_app().run()
    _clean(at)
    at.slider(key="kc_img_n").set_value(60).run()
    at.switch_page("app_pages/fit.py").run()
    at.number_input(key="kc_fit_epochs").set_value(2).run()
    at.radio(key="kc_fit_dirs").set_value("both").run()
    t0 = time.perf_counter()
    at.button(key="kc_fit_start").click().run()
    _clean(at)
    assert at.session_state["kc_counters"]["fits_started"] == 1
    _wait_for_run(at, 1)
    at.run()
    print(f"background fit finished in {time.perf_counter() - t0:.1f} s")
    return at


def test_opens_ready_on_the_embedded_default(dirs):
    _samples()
    at = _new_app().run()
    _clean(at)
    assert not _errors(at)
    assert at.title[0].value == "Models & images"
    a, b = at.session_state["kc_slot_A"], at.session_state["kc_slot_B"]
    assert (a.loaded.name, b.loaded.name) == tuple(f"{n}.safetensors" for n in state.DEFAULT_PAIR)
    assert at.selectbox(key="kc_layer_A").value == a.loaded.card.default_layer
    assert at.selectbox(key="kc_layer_B").value == b.loaded.card.default_layer
    assert at.session_state["kc_images"].kind == "bundled"
    text = " ".join(m.value for m in at.markdown)
    assert a.loaded.short_hash in text and b.loaded.short_hash in text  # provenance of both checkpoints
    assert any("no resampling" in s.value or "resampled bilinearly" in s.value for s in [*at.success, *at.info])


@pytest.mark.parametrize("page", PAGES[1:])
def test_every_page_renders_before_any_fit(dirs, page):
    at = _new_app().run()
    at.switch_page(f"app_pages/{page}.py").run()
    _clean(at)
    assert not _errors(at)
    if page != "fit":
        assert any("No result yet" in i.value for i in at.info)


def _slot(at: AppTest, role: str):
    key = f"kc_slot_{role}"
    return at.session_state[key] if key in at.session_state else None


@pytest.mark.skipif(not hasattr(AppTest, "file_uploader"), reason="this Streamlit's AppTest cannot upload files")
def test_upload_a_sample_checkpoint_and_refuse_a_bad_one(dirs):
    samples = _samples()
    path = samples[state.DEFAULT_PAIR[0]]
    card = path.with_name(path.stem + ".card.json")
    at = _new_app().run()
    sample_sha = _slot(at, "A").loaded.sha256
    # a new source empties the slot at once: no model, card or layer of the sample is left to fit by mistake
    at.segmented_control(key="kc_src_A").set_value("upload").run()
    _clean(at)
    assert _slot(at, "A") is None and "kc_layer_A" not in at.session_state
    assert any("No network A yet" in i.value for i in at.info)
    # weights only, no card, no architecture: the message names the control to use, and A stays empty
    at.file_uploader(key="kc_upload_A").upload(path.name, path.read_bytes()).run()
    _clean(at)
    (err,) = [e for e in _errors(at) if "Could not use this checkpoint" in e]
    assert "**Architecture** box" in err and "available_architectures" not in err and "arch=" not in err
    assert _slot(at, "A") is None
    # the architecture picker resolves it
    at.selectbox(key="kc_arch_A").set_value(_slot(at, "B").loaded.card.architecture.replace(
        "resnet", "tinynet")).run()
    _clean(at)
    assert not _errors(at)
    slot_a = _slot(at, "A")
    assert slot_a.source == "upload" and slot_a.loaded.sha256 == sample_sha
    # with its model card uploaded too, the card's facts appear
    at.selectbox(key="kc_arch_A").set_value("(from the model card)")
    at.file_uploader(key="kc_cardup_A").upload(card.name, card.read_bytes(), "application/json").run()
    _clean(at)
    assert not _errors(at) and _slot(at, "A").loaded.card is not None
    # garbage: a readable error, and the slot is empty (not the previous model)
    at.file_uploader(key="kc_upload_A").upload("broken.pt", b"not a checkpoint").run()
    _clean(at)
    assert any("Could not use this checkpoint" in e for e in _errors(at))
    assert _slot(at, "A") is None
    at.switch_page("app_pages/fit.py").run()
    assert any("Choose two networks" in w.value for w in at.warning)  # nothing to fit by mistake


def _zip_of_images(n: int) -> bytes:
    import io
    import zipfile

    from PIL import Image

    from kcore.data import sample_images

    imgs = sample_images(n, split="train")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(imgs.raw(i)).save(png, format="PNG")
            zf.writestr(f"photos/img_{i:03d}.png", png.getvalue())
    return buf.getvalue()


@pytest.mark.skipif(not hasattr(AppTest, "file_uploader"), reason="this Streamlit's AppTest cannot upload files")
def test_uploaded_zip_is_used_at_once_and_by_the_fit(dirs):
    at = _new_app().run()
    at.segmented_control(key="kc_img_src").set_value("upload").run()
    _clean(at)
    assert at.session_state["kc_images"].kind == "bundled"
    assert any("No images uploaded yet" in i.value for i in at.info)  # says what a fit would use meanwhile
    at.file_uploader(key="kc_img_upload").upload("photos.zip", _zip_of_images(50), "application/zip").run()
    _clean(at)
    assert not _errors(at)
    chosen = at.session_state["kc_images"]
    assert chosen.kind == "upload" and chosen.n == 50  # no extra button: in use as soon as uploaded
    assert any("Using **50 uploaded images**" in c.value for c in at.caption)
    assert any(c.value.startswith("Features of 50 images") for c in at.caption)  # the estimate follows
    at.switch_page("app_pages/fit.py").run()
    assert any("50 uploaded images" in m.value for m in at.markdown)
    at.number_input(key="kc_fit_epochs").set_value(2).run()
    at.button(key="kc_fit_start").click().run()
    _wait_for_run(at, 1)
    run = next(iter(at.session_state["kc_runs"].values()))
    prov = run.comparison.provenance["images"]
    assert prov["n"] == 50 and prov["source"] == "50 uploaded images"
    assert run.comparison.image_ids() and all("img_" in i for i in run.comparison.image_ids())


def test_default_fit_runs_in_the_background(fitted, calls):
    at = fitted
    _clean(at)
    runs = at.session_state["kc_runs"]
    assert len(runs) == 1
    run = next(iter(runs.values()))
    assert set(run.comparison.directions) == {"A_to_B", "B_to_A"}
    assert run.run_dir is not None and (run.run_dir / "provenance.json").is_file()
    assert calls == {"extract": 1, "fit": 2}
    assert any("Finished in" in s.value for s in at.success)


@pytest.mark.parametrize("page", PAGES[2:])
def test_result_pages_render_with_provenance(fitted, page):
    at = fitted
    at.switch_page(f"app_pages/{page}.py").run()
    _clean(at)
    assert not _errors(at)
    run = next(iter(at.session_state["kc_runs"].values()))
    text = " ".join(m.value for m in at.markdown)
    assert run.comparison.a.sha256[:12] in text and run.comparison.b.sha256[:12] in text
    if page == "explorer":
        assert len(at.get("plotly_chart")) == 2  # the interactive map and blind-spot views
    elif page != "export":
        assert len(at.image) >= 1  # st.image elements (the figures)


def test_changing_image_channel_and_order_does_not_refit(fitted, calls):
    at = fitted
    at.switch_page("app_pages/explorer.py").run()
    run = next(iter(at.session_state["kc_runs"].values()))
    fits = {k: id(d.fit) for k, d in run.comparison.directions.items()}
    before = dict(calls), at.session_state["kc_counters"]["decompositions"]
    at.selectbox(key="kc_ex_image").set_value(3).run()
    at.number_input(key="kc_ex_channel").set_value(5).run()
    at.segmented_control(key="kc_ex_order").set_value(1).run()
    at.radio(key="kc_ex_kind").set_value("residual").run()
    at.radio(key="kc_ex_scale").set_value("shared").run()
    at.slider(key="kc_ex_alpha").set_value(0.3).run()
    _clean(at)
    assert not _errors(at)
    choice = at.session_state["kc_ex_choice"]
    assert (choice.image, choice.channel, choice.spec.kind, choice.scale) == (3, 5, "residual", "shared")
    after = dict(calls), at.session_state["kc_counters"]["decompositions"]
    assert after == before  # no extraction, no fit, no new decomposition
    run2 = next(iter(at.session_state["kc_runs"].values()))
    assert run2 is run and {k: id(d.fit) for k, d in run2.comparison.directions.items()} == fits
    assert len(at.get("plotly_chart")) == 2  # the overlay and the blind-spot map


def test_side_by_side_view_shows_x_and_x_star_of_the_same_image(fitted, calls):
    at = fitted
    at.switch_page("app_pages/explorer.py").run()
    at.selectbox(key="kc_ex_image").set_value(2).run()
    at.number_input(key="kc_ex_channel").set_value(1).run()
    at.radio(key="kc_ex_view").set_value("a_vs_b").run()
    at.selectbox(key="kc_ex_cmap").set_value("PuOr_r").run()
    _clean(at)
    assert not _errors(at)
    run = next(iter(at.session_state["kc_runs"].values()))
    direction = at.session_state["kc_ex_choice"].direction
    x, x_star = at.get("plotly_chart")
    src, tgt = ("A", "B") if direction == "A_to_B" else ("B", "A")
    pos = run.comparison.heldout_positions[2]
    feats = {"A": run.comparison.features.x_a, "B": run.comparison.features.x_b}
    for chart, net in ((x, src), (x_star, tgt)):
        spec = __import__("json").loads(chart.proto.spec)
        heat = spec["data"][-1]
        want = feats[net][pos, 1].float().abs().max().item()  # channel 1 of each network, raw activations
        assert heat["zmax"] == pytest.approx(want, rel=1e-5) and heat["zmin"] == pytest.approx(-want, rel=1e-5)
        assert f"{net}'s" in spec["layout"]["title"]["text"]
    assert {b.proto.label for b in at.get("download_button")} >= {"PNG", "SVG", "PDF"}
    assert calls["fit"] == 2
    at.radio(key="kc_ex_view").set_value("map").run()
    at.selectbox(key="kc_ex_cmap").set_value("RdBu_r").run()


def test_filters_and_figure1_choices(fitted, calls):
    at = fitted
    at.switch_page("app_pages/filters.py").run()
    at.radio(key="kc_fl_sort").set_value("residual").run()
    at.selectbox(key="kc_fl_channel").set_value(2).run()
    _clean(at)
    assert any("Channel 2" in h.value for h in at.subheader)
    at.switch_page("app_pages/figure1.py").run()
    at.multiselect(key="kc_f1_channels").set_value([0, 2]).run()
    at.radio(key="kc_f1_scale").set_value("map").run()
    _clean(at)
    assert not _errors(at)
    assert at.session_state["kc_f1_choice"][2] == (0, 2)
    assert calls["fit"] == 2


def test_export_writes_valid_files(fitted, dirs):
    at = fitted
    at.switch_page("app_pages/export.py").run()
    at.number_input(key="kc_exp_dpi").set_value(100).run()
    at.button(key="kc_exp_go").click().run()
    _clean(at)
    assert not _errors(at)
    run_id, result = at.session_state["kc_exp_result"]
    folder = Path(result.folder)
    assert folder.parent == dirs[1]
    figs = sorted((folder / "figures").iterdir())
    pngs = [p for p in figs if p.suffix == ".png"]
    assert len(pngs) >= 5  # variance, loss, overlay, blind spot, shares ×2, figure 1
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        svg = p.with_suffix(".svg").read_bytes()
        assert ET.fromstring(svg).tag.endswith("svg") and b"<svg" in svg
        assert b"<text" in svg  # editable text, not glyph outlines
        pdf = p.with_suffix(".pdf").read_bytes()
        assert pdf.startswith(b"%PDF") and re.search(rb"/Type\s*/Page\b", pdf)
        assert p.with_suffix(".json").is_file()
    assert (folder / "metrics.csv").is_file() and (folder / "provenance.json").is_file()
    assert {p.name for p in (folder / "arrays").iterdir()} == {"components_A_to_B.npz", "components_B_to_A.npz"}
    assert at.get("download_button")


def test_reopen_the_run_folder(fitted):
    at = fitted
    run = next(iter(at.session_state["kc_runs"].values()))
    open_run_folder(at, run.run_dir)
    _clean(at)
    runs = at.session_state["kc_runs"]
    assert len(runs) == 2
    reopened = runs[at.session_state["kc_active_run"]]
    assert reopened.origin == "folder" and reopened.raw_images  # images kept for the overlays
    at.switch_page("app_pages/explorer.py").run()
    _clean(at)
    assert len(at.get("plotly_chart")) == 2


def test_overview_warns_when_compared_runs_used_different_presets(fitted):
    """A run of another preset re-opened beside the session's fit: the comparison says its shares differ."""
    import dataclasses

    from kcore.pipeline import write_run

    at = fitted
    run = next(iter(at.session_state["kc_runs"].values()))
    other = dataclasses.replace(run.comparison, provenance={**run.comparison.provenance, "preset": "authors"})
    folder = write_run(other, state.runs_dir() / "authors_preset_run")
    open_run_folder(at, folder)
    _clean(at)
    at.switch_page("app_pages/overview.py").run()
    _clean(at)
    warnings = [w.value for w in at.warning]
    assert any("different fit presets (authors, fast)" in w for w in warnings), warnings
    at.session_state["kc_active_request"] = run.id  # the session's own fit is shown again (later tests read it)
    at.run()
    assert at.session_state["kc_active_run"] == run.id


def test_cancel_keeps_the_finished_results(fitted):
    at = fitted
    n_before = len(at.session_state["kc_runs"])
    at.switch_page("app_pages/fit.py").run()
    at.number_input(key="kc_fit_epochs").set_value(500).run()
    at.button(key="kc_fit_start").click().run()
    assert at.button(key="kc_fit_start").disabled  # no second fit while one runs
    at.button(key="kc_fit_cancel").click().run()
    job = state.registry().wait(at.session_state["kc_jobs"][-1], timeout=110)  # under the orphan limit (120 s)
    assert job.state == "cancelled"
    at.run()
    _clean(at)
    assert any("cancelled" in w.value for w in at.warning)
    assert len(at.session_state["kc_runs"]) == n_before


def test_core_errors_are_shown_as_messages(dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(tmp_path))
    at = _new_app().run()
    at.segmented_control(key="kc_src_B").set_value("path").run()
    at.text_input(key="kc_path_B").input(str(tmp_path / "model.pth")).run()
    at.button(key="kc_loadpath_B").click().run()
    _clean(at)
    assert any("no such file on the server" in e for e in _errors(at)), _errors(at)


@pytest.mark.skipif(not hasattr(AppTest, "file_uploader"), reason="this Streamlit's AppTest cannot upload files")
def test_a_bad_upload_never_loses_a_finished_fit(fitted):
    at = fitted
    runs_before = dict(at.session_state["kc_runs"])
    at.switch_page("app_pages/setup.py").run()
    at.segmented_control(key="kc_src_B").set_value("upload").run()
    at.file_uploader(key="kc_upload_B").upload("model.pt", b"this is not a checkpoint").run()
    _clean(at)
    assert any("Could not use this checkpoint" in e for e in _errors(at))
    assert dict(at.session_state["kc_runs"]) == runs_before
    at.segmented_control(key="kc_src_B").set_value("sample").run()
    at.switch_page("app_pages/overview.py").run()
    _clean(at)
    assert len(at.image) >= 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to provoke the error")
def test_an_error_inside_the_fit_is_shown_as_a_message(dirs):
    at = _new_app().run()
    at.switch_page("app_pages/fit.py").run()
    at.selectbox(key="kc_fit_device").set_value("cuda").run()
    at.button(key="kc_fit_start").click().run()
    job = state.registry().wait(at.session_state["kc_jobs"][-1], timeout=110)  # under the orphan limit (120 s)
    assert job.state == "failed"
    at.run()
    _clean(at)
    assert any("The fit stopped" in e and "CUDA" in e for e in _errors(at))


def test_no_share_above_100_percent_and_intervals_and_baselines_shown(fitted):
    import re

    at = fitted
    run = next(iter(at.session_state["kc_runs"].values()))
    assert set(run.comparison.baselines) == {"random_b", "shuffled"}  # on by default for a fit this small
    for page in ("overview", "filters", "explorer"):
        at.switch_page(f"app_pages/{page}.py").run()
        _clean(at)
        assert not _errors(at)
        texts = [m.value for m in [*at.markdown, *at.caption, *at.warning]] + [m.value for m in at.metric]
        shares = [float(v) for t in texts if "share" in t.lower() or "Share" in t
                  for v in re.findall(r"(-?\d+(?:\.\d+)?) ?%", t)]
        assert all(v <= 100.0 + 1e-9 for v in shares), shares
        if page == "overview":
            assert shares, "the Overview shows the additive shares"
            assert any("±" in str(m.value) for m in at.metric)  # instability with its interval
            assert any("Chance baseline" in c.value for c in at.caption)
            assert any("preset fast" in c.value for c in at.caption)
