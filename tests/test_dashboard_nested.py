"""Nested fits in the dashboard and in exports: the Filters page shows each channel's gains with their intervals,
the Explorer overlays the nested components (which sum to g_K(x)), exports hold the gains and the nested figures
and verify, and a plain run shows none of it.

The run: a real small nested fit (K = 2, 40 random images) of x* = ReLU(x), x a centred random convolution of the
image, so that order 1 has something to add (its guard keeps g₁), written as a run folder.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from helpers import plain_net

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kcore import export, viz  # noqa: E402
from kcore.checkpoints import LoadedModel  # noqa: E402
from kcore.decompose import decompose_comparison  # noqa: E402
from kcore.pipeline import compare  # noqa: E402


def _relu_net() -> nn.Module:
    """conv → ReLU, the convolution's output centred on images in [0, 1] (so the ReLU cuts about half)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.bias.copy_(-0.5 * conv.weight.sum((1, 2, 3)))
    return nn.Sequential(conv, nn.ReLU()).eval()


@pytest.fixture(scope="module")
def nested_comparison(random_images):
    torch.set_num_threads(1)
    a = LoadedModel(_relu_net(), "a.safetensors", "a" * 64, "safetensors", None, 10)
    b = LoadedModel(_relu_net(), "b.safetensors", "b" * 64, "safetensors", None, 10)
    comp = compare(a, "0", b, "1", random_images(40, 12), orders=2, epochs=40, nested=True, gate="linear",
                   device="cpu", lr=3e-2)
    assert comp.directions["A_to_B"].fit.nested.stages[1].accepted  # g₁ adds something: x⁽¹⁾ₙ is not 0
    return comp


@pytest.fixture(scope="module")
def plain_comparison(random_images):
    a = LoadedModel(plain_net(0, 5), "a.safetensors", "a" * 64, "safetensors", None, 10)
    b = LoadedModel(plain_net(1, 4), "b.safetensors", "b" * 64, "safetensors", None, 10)
    return compare(a, "2", b, "2", random_images(24, 12), orders=1, epochs=2, device="cpu")


# ------------------------------------------------------------------------------------------- kcore: components
def _prepared(comp, direction="A_to_B"):
    fit = comp.directions[direction].fit
    x_src, x_tgt = comp.pair(direction)
    return fit, fit.norm.source(x_src), fit.norm.target(x_tgt)


def test_nested_components_of_a_comparison_sum_to_g_K_and_equal_a_direct_computation(nested_comparison) -> None:
    dec = decompose_comparison(nested_comparison, "A_to_B", parts="nested")
    fit, xs, xt = _prepared(nested_comparison)
    assert viz.is_nested(dec) and dec.orders == 2
    with torch.no_grad():
        outs = [m.eval()(xs) for m in fit.nested.models]  # g_0(x), g_1(x), g_2(x), computed here, one by one
        g_K = fit.model(xs)
    torch.testing.assert_close(outs[-1], g_K, rtol=0, atol=0)  # the fit's model is g_K
    # the components sum to g_K(x) to float precision, and x* = Σ x_n^(k) + x^Δ
    torch.testing.assert_close(dec.output, g_K, rtol=0, atol=1e-5)
    torch.testing.assert_close(dec.output + dec.residual, xt, rtol=0, atol=1e-5)
    direct = [outs[0]] + [outs[k] - outs[k - 1] for k in (1, 2)]
    assert float(direct[1].abs().max()) > 1e-2  # g₁ was kept: its component is not trivially 0
    for k in range(3):
        torch.testing.assert_close(dec.components[k], direct[k], rtol=0, atol=1e-6)
    # the same x* and x^Δ as the Eq. 3–4 split of g_K; other components
    split = decompose_comparison(nested_comparison, "A_to_B")
    assert not viz.is_nested(split)
    torch.testing.assert_close(split.target, dec.target, rtol=0, atol=0)
    torch.testing.assert_close(split.residual, dec.residual, rtol=0, atol=1e-5)


def test_the_explorer_overlay_of_a_nested_component_is_its_upsampled_map(nested_comparison) -> None:
    dec = decompose_comparison(nested_comparison, "A_to_B", parts="nested")
    fit, xs, _ = _prepared(nested_comparison)
    i, c = 3, 2
    with torch.no_grad():
        g = [m(xs[i : i + 1])[0, c].double().numpy() for m in fit.nested.models]
    spec = viz.MapSpec("component", (1,), nested=True)
    np.testing.assert_allclose(viz.feature_map(dec, spec, i, c), g[1] - g[0], atol=1e-6)
    both = viz.MapSpec("component", (0, 1), nested=True)  # x_n^(0) + x_n^(1) = g_1(x)
    np.testing.assert_allclose(viz.feature_map(dec, both, i, c), g[1], atol=1e-6)
    raw = np.zeros((12, 12, 3), dtype=np.uint8)
    fig = viz.component_overlay_interactive(dec, spec, i, c, raw, scale="map")
    heat = [t for t in fig.data if t.type == "heatmap"][0]
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), viz.upsample(g[1] - g[0], (12, 12)), atol=1e-6)
    lim = max(abs(g[1] - g[0]).max(), 1e-12)  # the split's convention: ±max|map|, white at 0
    assert heat.zmin == pytest.approx(-lim, rel=1e-5) and heat.zmax == pytest.approx(lim, rel=1e-5)
    assert "x⁽¹⁾ₙ" in fig.layout.title.text
    # a spec of one kind refuses a decomposition of the other, naming the fix
    with pytest.raises(ValueError, match="nested=True, but the decomposition holds the Eq. 3–4 split.*Fix"):
        viz.feature_map(decompose_comparison(nested_comparison, "A_to_B"), spec, i, c)
    with pytest.raises(ValueError, match="nested=True applies to kind='component' only.*Fix"):
        viz.MapSpec("residual", nested=True)


def test_decompose_comparison_refuses_bad_parts_and_a_plain_fit(plain_comparison) -> None:
    with pytest.raises(ValueError, match="parts must be one of \\['nested', 'split'\\]; got 'gains'.*Fix"):
        decompose_comparison(plain_comparison, "A_to_B", parts="gains")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parts='nested' needs a nested fit.*Fix"):
        decompose_comparison(plain_comparison, "A_to_B", parts="nested")


# ------------------------------------------------------------------------------------------- kcore: gains tables
def test_gain_tables_hold_the_fit_s_per_channel_gains(nested_comparison) -> None:
    gains = nested_comparison.directions["A_to_B"].fit.nested.gains
    m = viz.gain_matrix(gains)
    C = len(gains.channel_instability)
    assert m.shape == (C, 4)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-9)  # Δ₀ + Δ₁ + Δ₂ + x^Δ = 1 per channel
    df = export.gain_table(gains)
    for k in range(3):
        np.testing.assert_array_equal(df[f"gain_x{k}"], np.asarray(gains.channel_gain_orders[k]))
        lo = np.asarray(gains.ci.channel_gain_orders[k])[:, 0]
        np.testing.assert_array_equal(df[f"gain_x{k}_ci_lo"], lo)
    text = viz.channel_gain_table(gains)
    assert list(text.columns) == ["channel", "Δ₀", "Δ₁", "Δ₂", "x^Δ", "main order"]
    cell = text.loc[1, "Δ₁"]
    v, hw = gains.channel_gain_orders[1][1], (gains.ci.channel_gain_orders[1][1][1] - gains.ci.channel_gain_orders[1][1][0]) / 2
    assert cell == f"{100 * v:.1f} ± {100 * hw:.1f} %".replace("-0.0 ", "0.0 ")
    order = viz.channel_gain_order(gains, "order", 0)
    assert [m[i, 0] for i in order] == sorted(m[:, 0], reverse=True)


def test_the_gain_heatmap_hatches_a_negative_gain_and_its_text_is_readable(nested_comparison) -> None:
    import dataclasses as dc

    from kcore.viz.style import TEXT_PT, text_sizes

    gains = nested_comparison.directions["A_to_B"].fit.nested.gains
    planted = [list(r) for r in gains.channel_gain_orders]
    planted[1][0] -= 0.2
    planted[2][0] += 0.2  # still adds up to 1
    neg = dc.replace(gains, channel_gain_orders=tuple(tuple(r) for r in planted))
    fig = viz.channel_gain_figure(neg)
    hatched = [p for p in fig.axes[0].patches if p.get_hatch()]
    assert (planted[1][0] < 0) == (len(hatched) >= 1)
    assert min(s for _, s in text_sizes(fig)) >= TEXT_PT


def test_the_gain_heatmap_of_64_channels_stays_readable(nested_comparison) -> None:
    """As the shares' heatmap: at most WIDE_IN wide, text >= TEXT_PT, >= 11 px in a 564 px wide main area."""
    import dataclasses as dc

    from dashboard.ui import DISPLAY_DPI
    from kcore.viz.charts import WIDE_IN
    from kcore.viz.style import MIN_SCREEN_PX, TEXT_PT, screen_px, text_sizes

    g = nested_comparison.directions["A_to_B"].fit.nested.gains
    wide = dc.replace(g, channel_gain_orders=tuple(tuple(v) * 13 for v in g.channel_gain_orders),
                      channel_instability=tuple(g.channel_instability) * 13)
    fig = viz.channel_gain_figure(wide, max_channels=64)
    assert fig.get_figwidth() <= WIDE_IN and min(s for _, s in text_sizes(fig)) >= TEXT_PT
    assert screen_px(TEXT_PT, DISPLAY_DPI, 564, fig.get_figwidth() * DISPLAY_DPI) >= MIN_SCREEN_PX
    assert "labelled" in fig.axes[0].get_xlabel() and len(fig.axes[0].get_xticklabels()) < 64


# ------------------------------------------------------------------------------------------- exports
def test_a_nested_run_s_export_holds_the_gains_and_the_nested_figures_and_verifies(nested_comparison, tmp_path) -> None:
    comp = nested_comparison
    dec = decompose_comparison(comp, "A_to_B", parts="nested")
    items = export.nested_figures(comp, "A_to_B", dec=dec, image_ids=comp.image_ids(), images=[0], channels=[1])
    res = export.export_comparison(comp, tmp_path / "exp", figures=items, formats=("svg",), dpi=100,
                                   arrays={"nested_components_A_to_B": (dec, comp.image_ids())})
    files = export.verify_export(res.folder)
    stems = {Path(f).stem for f in files if f.startswith("figures/")}
    assert "channel-gains_A_to_B" in stems and any(s.startswith("nested-components_A_to_B") for s in stems)
    assert "gains_A_to_B.csv" in files
    gains = comp.directions["A_to_B"].fit.nested.gains
    df = pd.read_csv(res.folder / "gains_A_to_B.csv")
    np.testing.assert_allclose(df["gain_x1"], gains.channel_gain_orders[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(df["gain_x1_ci_hi"], np.asarray(gains.ci.channel_gain_orders[1])[:, 1], rtol=1e-5,
                               atol=1e-7)
    side = json.loads((res.folder / "figures" / "channel-gains_A_to_B.json").read_text())
    assert side["gains"]["gain_orders"] == list(gains.gain_orders)
    grid = next(f for f in files if f.startswith("figures/nested-components") and f.endswith(".json"))
    meta = json.loads((res.folder / grid).read_text())
    assert meta["channel_gains"]["1"]["gain_orders"] == [g[1] for g in gains.channel_gain_orders]
    svg = (res.folder / grid.replace(".json", ".svg")).read_text()
    assert "x⁽¹⁾ₙ" in svg and "x⁽²⁾ₙ" in svg  # the nested components, labelled as such
    with np.load(res.folder / "arrays" / "nested_components_A_to_B.npz") as z:
        np.testing.assert_allclose(z["output"], dec.output.numpy(), atol=1e-5)
        assert "nested components" in str(z["meta"])


def test_a_plain_run_s_export_is_unchanged_and_refuses_nested_figures(plain_comparison, tmp_path) -> None:
    res = export.export_comparison(plain_comparison, tmp_path / "plain", formats=("svg",), dpi=100)
    assert not [f for f in export.verify_export(res.folder) if "gain" in f or "nested" in f]
    with pytest.raises(ValueError, match="'A_to_B' is not a nested fit.*Fix"):
        export.nested_figures(plain_comparison, "A_to_B")


# ------------------------------------------------------------------------------------------- the pages
@pytest.fixture(scope="module")
def run_folders(nested_comparison, plain_comparison, tmp_path_factory):
    from kcore.pipeline import write_run

    runs, exports = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("exports")
    return runs, exports, write_run(nested_comparison, runs / "nested"), write_run(plain_comparison, runs / "plain")


def _open(folder: Path, runs: Path, exports: Path, monkeypatch: pytest.MonkeyPatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("KCORE_RUNS_DIR", str(runs))
    monkeypatch.setenv("KCORE_EXPORTS_DIR", str(exports))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    at.switch_page("app_pages/fit.py").run()
    at.text_input(key="kc_open_path").input(str(folder)).run()
    at.button(key="kc_open_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


_CELL = re.compile(r"(-?\d+\.\d) ± (\d+\.\d) %")


@pytest.mark.slow
def test_filters_show_each_channel_s_gains_of_metrics_json(run_folders, monkeypatch) -> None:
    runs, exports, folder, _ = run_folders
    at = _open(folder, runs, exports, monkeypatch)
    at.switch_page("app_pages/filters.py").run()
    assert not at.exception, [e.value for e in at.exception]
    at.radio(key="kc_fl_show").set_value("gains").run()
    assert not at.exception, [e.value for e in at.exception]
    block = json.loads((folder / "metrics.json").read_text())["directions"]["A_to_B"]["nested"]["per_channel"]
    df = at.dataframe[0].value
    assert list(df.columns[:5]) == ["channel", "Δ₀", "Δ₁", "Δ₂", "x^Δ"]
    for _, row in df.iterrows():
        c = int(row["channel"])
        for k in range(3):
            m = _CELL.fullmatch(row[f"Δ{'₀₁₂'[k]}"])
            assert m, row[f"Δ{'₀₁₂'[k]}"]
            assert abs(float(m.group(1)) - 100 * block["gain_orders"][k][c]) <= 0.05 + 1e-9
            lo, hi = block["gain_ci"][k][c]
            assert abs(float(m.group(2)) - 100 * (hi - lo) / 2) <= 0.05 + 1e-9
    captions = " ".join(c.value for c in at.caption)
    assert "nested fits instead" in captions and "95% bootstrap interval over the 8 held-out images" in captions
    shown = [img.caption for el in at.get("image") for img in el.proto.imgs]
    assert any("the nested components x⁽⁰⁾ₙ…x⁽ᴷ⁾ₙ" in c for c in shown), shown
    at.selectbox(key="kc_fl_channel").set_value(3).run()
    at.button(key="kc_fl_to_explorer").click().run()  # the Explorer opens on that channel's nested components
    assert not at.exception, [e.value for e in at.exception]
    assert at.radio(key="kc_ex_parts").value == "nested" and at.number_input(key="kc_ex_channel").value == 3
    at.switch_page("app_pages/filters.py").run()
    # switched back: the shares, as before
    at.radio(key="kc_fl_show").set_value("shares").run()
    assert "x⁽⁰⁾" in at.dataframe[0].value.columns


@pytest.mark.slow
def test_explorer_shows_the_nested_components_of_a_nested_run(run_folders, monkeypatch) -> None:
    runs, exports, folder, _ = run_folders
    at = _open(folder, runs, exports, monkeypatch)
    at.switch_page("app_pages/explorer.py").run()
    assert not at.exception, [e.value for e in at.exception]
    at.radio(key="kc_ex_parts").set_value("nested").run()
    at.radio(key="kc_ex_kind").set_value("order").run()
    assert not at.exception, [e.value for e in at.exception]
    captions = " ".join(c.value for c in at.caption)
    assert "x⁽⁰⁾ₙ" in captions and "gₖ(x) − gₖ₋₁(x)" in captions
    block = json.loads((folder / "metrics.json").read_text())["directions"]["A_to_B"]["nested"]["per_channel"]
    iv = block["gain_ci"][1][0]  # channel 0's Δ₁ beside its maps, as metrics.json has it
    assert f"Δ₁ {viz.gains.percent_1(block['gain_orders'][1][0], tuple(iv))}" in captions
    # the Export page writes what the Explorer shows, and the gains
    at.switch_page("app_pages/export.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "nested" in at.multiselect(key="kc_exp_what").value
    at.button(key="kc_exp_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    out = next(p for p in exports.iterdir() if p.is_dir())
    files = export.verify_export(out)
    assert "gains_A_to_B.csv" in files
    assert any(f.startswith("figures/overlay_A_to_B") and "_xn0_" in f for f in files), files
    assert any(f.startswith("figures/nested-components_A_to_B") for f in files)
    assert "arrays/nested_components_A_to_B.npz" in files


@pytest.mark.slow
def test_a_plain_run_s_pages_have_no_nested_controls(run_folders, monkeypatch) -> None:
    runs, exports, _, folder = run_folders
    at = _open(folder, runs, exports, monkeypatch)
    for page, keys in (("filters", ["kc_fl_show"]), ("explorer", ["kc_ex_parts"]), ("export", [])):
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception, [e.value for e in at.exception]
        present = {w.key for w in at.radio}
        assert not present & set(keys), present
        assert not any("nested" in c.value.lower() or "Δ₀" in c.value for c in at.caption)
    assert set(at.multiselect(key="kc_exp_what").options) == {"Overview figures", "Explorer maps", "Channel shares",
                                                             "Figure 1 grid", "Component arrays (.npz)"}
    assert not any("nested" in (w.help or "") for w in at.multiselect)
