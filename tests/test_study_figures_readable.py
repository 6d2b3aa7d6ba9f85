"""The paper studies' figures are readable where the Studies page shows them (a 1024 px window, sidebar open):
each is at most GRID_IN wide, draws no text under TEXT_PT (so >= 11 px on screen), and no two of its texts
overlap or reach past its edge. Every figure is drawn from small planted results (no training)."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from helpers import overlapping_texts, texts_outside
from kcore.experiments._arms import ArmResult, accuracy_figure
from kcore.experiments.compression import compression_figure
from kcore.experiments.diagnosis import DiagnosisResult
from kcore.experiments.distillation import blind_spot_maps_figure, distillation_figure
from kcore.experiments.stability import StabilityResult
from kcore.viz.figure1 import GRID_IN
from kcore.viz.style import MIN_SCREEN_PX, TEXT_PT, screen_px, text_sizes, tick_rotation

NARROW_MAIN_PX = 564
"""The main area's width in a 1024 px window with the sidebar open (measured in test_readable_figures)."""


def _arm(name: str, seed: int, acc: float) -> ArmResult:
    return ArmResult(name=name, features="x", upper_layers="fresh", channels=4, test_accuracy_before=acc - 0.2,
                     test_accuracy=acc, train_accuracy=acc + 0.05, train_loss=(1.0, 0.5), n_trainable=10,
                     lower_unchanged=True, seconds=0.1, seed=seed)


def _arms(n: int) -> list[ArmResult]:
    names = ["x(0)", "x(0)+x(1)", "x(0)+x(1)+x(2)", "x* (strong net)", "x^Δ only", "all orders + x^Δ"][:n]
    return [_arm(nm, s, 0.5 + 0.05 * i + 0.01 * s) for i, nm in enumerate(names) for s in (0, 1)]


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.random((16, 16, 3)) * 255).astype(np.uint8) for _ in range(n)]


def _row(v: float):
    return types.SimpleNamespace(var_residual=v)


def _compression(finetune: int):
    return types.SimpleNamespace(
        points=[types.SimpleNamespace(ratio=r, row=_row(0.1 + r), accuracy=0.9 - r / 2, accuracy_pruned=0.8 - r / 2)
                for r in (0.2, 0.5, 0.8)], finetune_epochs=finetune, scope="layer", layer="layer2.0.conv1")


def _distillation(n_maps: int):
    g = torch.Generator().manual_seed(0)
    gens = [types.SimpleNamespace(generation=i, row=_row(0.3 - 0.1 * i) if i < 3 else None, accuracy=0.8 + 0.03 * i)
            for i in range(4)]
    return types.SimpleNamespace(
        generations=gens, newest=3, layer="layer3", map_channel=1, map_ids=[f"test/{i:05d}" for i in range(n_maps)],
        map_images=_images(n_maps), map_target=torch.randn(n_maps, 2, 8, 8, generator=g),
        maps=[torch.randn(n_maps, 2, 8, 8, generator=g) for _ in range(3)])


def _stability(n_layers: int):
    layers = [f"layer{i}.1.conv2" for i in range(1, n_layers + 1)]
    summary = [types.SimpleNamespace(layer=nm, var_orders=(0.5, 0.2, 0.1), var_residual=0.2, var_target=1.0)
               for nm in layers]
    return types.SimpleNamespace(
        layers=layers, orders=2, case="seeds", directions=[],
        random_reference={nm: {"instability": 0.9} for nm in layers},
        pair_instability=lambda layer: {"a-b": 0.3, "a-c": 0.35, "b-c": 0.32}, summary=lambda: summary)


def _diagnosis(n_maps: int):
    g = torch.Generator().manual_seed(1)
    weak, strong = types.SimpleNamespace(name="vgg11-weak"), types.SimpleNamespace(name="vgg11-strong")
    return types.SimpleNamespace(
        map_ids=[f"test/{i:05d}" for i in range(n_maps)], images=np.stack(_images(n_maps)) / 255.0, map_labels=[3] * n_maps,
        class_names=["plane", "car", "bird", "cat"], blind_energy=torch.rand(n_maps, 4, 4, generator=g).numpy(),
        unreliable_energy=torch.rand(n_maps, 4, 4, generator=g).numpy(), energy_units="standardised units²",
        weak=weak, strong=strong, layer_weak="features.10", layer_strong="features.10",
        classifier_init="pretrained", arms=_arms(4))


FIGURES = {
    "accuracy, 1 arm": lambda: accuracy_figure(
        _arms(1), "Classifiers with the weak net's upper layers above features.10 (pretrained init)"),
    "accuracy, 6 arms": lambda: accuracy_figure(
        _arms(6), "Classifiers with the weak net's upper layers above features.10 (pretrained init)", before=False),
    "compression": lambda: compression_figure(_compression(0)),
    "compression, fine-tuned": lambda: compression_figure(_compression(2)),
    "distillation": lambda: distillation_figure(_distillation(2)),
    "distillation maps, 2 images": lambda: blind_spot_maps_figure(_distillation(2)),
    "distillation maps, 6 images": lambda: blind_spot_maps_figure(_distillation(6)),
    "stability, 2 layers": lambda: StabilityResult.figures(_stability(2))["instability"],
    "stability, 4 layers": lambda: StabilityResult.figures(_stability(4))["instability"],
    "diagnosis maps": lambda: DiagnosisResult.maps_figure(_diagnosis(3)),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_study_figure_is_readable_at_1024_px(name):
    fig = FIGURES[name]()
    assert isinstance(fig, Figure)
    assert fig.get_figwidth() <= GRID_IN + 1e-9, fig.get_figwidth()
    sizes = text_sizes(fig)
    assert sizes
    assert min(s for _, s in sizes) >= TEXT_PT, [t for t in sizes if t[1] < TEXT_PT]
    dpi = 100  # any: the page scales the PNG to the main area's width
    assert screen_px(TEXT_PT, dpi, NARROW_MAIN_PX, fig.get_figwidth() * dpi) >= MIN_SCREEN_PX
    assert not overlapping_texts(fig), overlapping_texts(fig)
    assert not texts_outside(fig), texts_outside(fig)


def test_the_checks_find_a_figure_as_the_studies_drew_it_before():
    """A figure made the old way (9 in wide, 7 pt annotations crowded together) fails each check."""
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0.2, 0.8], [0.5, 0.3])
    for r in (0.2, 0.25):  # two ratios whose points lie on top of each other
        ax.annotate(f"r={r:g}", (0.2, 0.5), textcoords="offset points", xytext=(4, 4), fontsize=7)
    assert fig.get_figwidth() > GRID_IN
    assert min(s for _, s in text_sizes(fig)) < TEXT_PT
    assert overlapping_texts(fig)


def test_tick_labels_lie_flat_only_where_the_longest_fits_its_slot():
    # 10 characters of 9.5 pt text are about 10 * 0.6 * 9.5 / 72 = 0.79 in wide
    assert tick_rotation(["abcdefghij"], slot_in=0.79 / 0.9 + 0.01) == 0
    assert tick_rotation(["abcdefghij"], slot_in=0.79 / 0.9 - 0.01) == 90
    assert tick_rotation(["a", "abcdefghij"], slot_in=0.5) == 90  # the longest decides
    assert tick_rotation([], slot_in=0.1) == 0
