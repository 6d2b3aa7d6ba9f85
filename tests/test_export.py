"""Exports: valid PNG/SVG/PDF bytes, deterministic names and bytes, metrics tables, arrays and provenance."""
from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest

from helpers import plain_net
from kcore import export, viz
from kcore.checkpoints import LoadedModel
from kcore.pipeline import compare


@pytest.fixture(scope="module")
def comparison(random_images):
    a = LoadedModel(plain_net(0, 5), "a.safetensors", "a" * 64, "safetensors", None, 10)
    b = LoadedModel(plain_net(1, 4), "b.safetensors", "b" * 64, "safetensors", None, 10)
    images = random_images(24, 12, "set/img {:03d}")  # ids with a space and a slash: export names them safely
    return compare(a, "2", b, "2", images, orders=1, epochs=2, both_directions=True, device="cpu")


def check_png(data: bytes) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def check_svg(data: bytes) -> None:
    root = ET.fromstring(data)
    assert root.tag.endswith("svg")
    assert b"<svg" in data
    # text stays editable: real <text> elements, not glyph outlines
    assert root.iter("{http://www.w3.org/2000/svg}text").__next__() is not None


def check_pdf(data: bytes) -> None:
    assert data.startswith(b"%PDF")
    assert re.search(rb"/Type\s*/Page\b", data)


CHECK = {"png": check_png, "svg": check_svg, "pdf": check_pdf}


def test_figure_bytes_are_valid_and_deterministic():
    def make():
        return viz.overlay_figure(None, np.outer(np.arange(4.0) - 1.5, np.ones(4)), title="t")

    for fmt, check in CHECK.items():
        first = export.figure_bytes(make(), fmt, dpi=100)
        check(first)
        assert export.figure_bytes(make(), fmt, dpi=100) == first, fmt


def test_png_compression_changes_the_size_never_the_pixels():
    from PIL import Image

    def make():
        return viz.overlay_figure(None, np.outer(np.sin(np.arange(16.0)), np.cos(np.arange(16.0))), title="t")

    fast, small = export.figure_bytes(make(), "png", 100, png_compression=1), export.figure_bytes(make(), "png", 100)
    check_png(fast)
    assert len(fast) > len(small)
    pixels = [np.asarray(Image.open(io.BytesIO(b))) for b in (fast, small)]
    np.testing.assert_array_equal(*pixels)
    for bad in (10, -1, 2.5, True):
        with pytest.raises(ValueError, match="png_compression must be an integer zlib level"):
            export.figure_bytes(make(), "png", 100, png_compression=bad)


def test_figure_stem_is_deterministic_and_file_safe():
    stem = export.figure_stem("overlay", "A_to_B", image_id="kshapes/test/00012", channel=7, what="x0+1", scale="image")
    assert stem == "overlay_A_to_B_img-kshapes-test-00012_ch007_x0+1_scale-image"
    assert export.slug("a b/c:d") == "a-b-c-d"
    with pytest.raises(ValueError, match="not file-name safe"):
        export.save_figure(viz.overlay_figure(None, np.ones((2, 2))), "/tmp", "bad name")


def test_tables(comparison):
    df = export.metrics_table(comparison)
    assert list(df["direction"]) == ["A_to_B", "B_to_A"]
    assert {"var_x0", "var_x1", "var_residual", "var_target", "instability", "baseline_cka"} <= set(df.columns)
    ch = export.channel_table(comparison.directions["A_to_B"].fit.heldout_report)
    assert list(ch.columns) == ["channel", "var_target", "share_x0", "share_x1", "share_residual", "dominant_order",
                                "var_ratio_x0", "var_ratio_x1", "var_ratio_residual"]
    assert len(ch) == 4  # B has 4 channels
    # additive shares add up per channel; the paper's Var ratios need not
    assert (ch[["share_x0", "share_x1", "share_residual"]].sum(axis=1) - 1).abs().max() < 1e-5
    assert {"share_x0", "share_x1", "share_residual"} <= set(df.columns)


def test_export_comparison_writes_valid_files_with_provenance(tmp_path, comparison):
    dec = comparison.decompose("A_to_B")
    ids = comparison.image_ids()
    spec = viz.MapSpec("component", (1,))
    fig = viz.component_overlay(dec, spec, 0, 1, None, caption=export.caption(comparison, "A_to_B"))
    stem = export.figure_stem("overlay", "A_to_B", image_id=ids[0], channel=1, what=spec.slug, scale="map")
    item = export.FigureItem(stem, fig, {"direction": "A_to_B", "image_id": ids[0], "channel": 1})
    res = export.export_comparison(comparison, tmp_path / "exp", figures=[item], arrays={"components_A_to_B": (dec, ids)},
                                   dpi=120)
    files = set(res.files)
    for fmt in ("png", "svg", "pdf"):
        name = f"figures/{stem}.{fmt}"
        assert name in files
        CHECK[fmt]((res.folder / name).read_bytes())
    assert {"provenance.json", "manifest.json", "metrics.csv", "metrics.json", "channels_A_to_B.csv",
            "channels_B_to_A.csv", "arrays/components_A_to_B.npz", f"figures/{stem}.json"} <= files
    prov = json.loads((res.folder / "provenance.json").read_text())
    assert prov["checkpoint_a"]["sha256"] == "a" * 64 and prov["layers"] == {"A": "2", "B": "2"}
    assert prov["directions"]["A_to_B"]["orders_K"] == 1 and "torch" in prov["versions"]
    side = json.loads((res.folder / f"figures/{stem}.json").read_text())
    assert side["channel"] == 1 and side["provenance"]["checkpoint_b"]["name"] == "b.safetensors"
    with np.load(res.folder / "arrays/components_A_to_B.npz") as z:
        assert z["components"].shape == (2, *dec.target.shape)
        np.testing.assert_allclose(z["output"] + z["residual"], z["target"], atol=1e-5)
        assert list(z["image_ids"]) == ids
    manifest = json.loads((res.folder / "manifest.json").read_text())
    assert set(manifest["files"]) == files - {"manifest.json"}
    # the zip holds the same files, and is deterministic
    data = res.zip_bytes()
    assert set(zipfile.ZipFile(io.BytesIO(data)).namelist()) == files
    assert res.zip_bytes() == data


def test_bad_options_are_refused(tmp_path, comparison):
    with pytest.raises(ValueError, match="formats must be"):
        export.export_comparison(comparison, tmp_path, formats=("jpg",))
    with pytest.raises(ValueError, match="dpi must be"):
        export.figure_bytes(viz.overlay_figure(None, np.ones((2, 2))), "png", dpi=5)
    with pytest.raises(ValueError, match="direction must be one of"):
        export.provenance(comparison, "C_to_D")
