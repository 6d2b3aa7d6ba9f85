"""A layer sweep against the separate fits it replaces, on the sample models.

:func:`sweep_benchmark` compares ``kshapes_resnet_s0`` with ``kshapes_resnet_s1`` at their four stages (stem,
layer1, layer2, layer3; diagonal pairs, both directions, the ``fast`` preset) on the bundled images, two ways:
four separate :func:`kcore.pipeline.compare` runs (each extracts both networks' features) and one
:func:`kcore.sweep.sweep` (each network runs once with every stage captured). It times both, the extraction alone
both ways, and checks that the sweep gives the separate runs' numbers.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.data import sample_images, sample_model_paths

SWEEP_PAIR = ("kshapes_resnet_s0", "kshapes_resnet_s1")


def sweep_benchmark(n_images: int = 400, models_dir: Path | None = None, epochs: int | None = None) -> dict[str, Any] | None:
    """Time a 4 × 4 diagonal sweep (both directions) against four separate comparisons; None without the models.

    Args:
        n_images: bundled images. models_dir: the sample models' folder. epochs: caps the fast preset's epochs.

    Returns:
        ``separate_seconds`` and ``sweep_seconds`` (wall time of the four comparisons and of the sweep),
        ``ratio`` (sweep / separate), the same in CPU time of this process (``*_cpu_seconds``, ``cpu_ratio``: less
        sensitive to other processes on a shared machine), ``extract_separate_seconds`` and ``extract_sweep_seconds`` (the extraction
        alone: four single-pair extractions against one multi-layer pass per network), ``max_abs_diff`` (the
        largest difference of instability or share between the sweep and the separate runs), the layers, images
        and forward passes.
    """
    from kcore.checkpoints import load_model
    from kcore.features import extract_features
    from kcore.fit import make_config
    from kcore.pipeline import compare
    from kcore.preprocessing import preprocessing_of
    from kcore.sweep import extract_layers, stages_of, sweep

    paths = sample_model_paths(models_dir)
    if not all(name in paths for name in SWEEP_PAIR):
        return None
    a, b = (load_model(paths[name]) for name in SWEEP_PAIR)
    layers = stages_of(a)
    images = sample_images(n_images)
    config = make_config("fast", epochs=epochs)
    ta, tb = preprocessing_of(a).transform(), preprocessing_of(b).transform()
    # warm-up (thread pools, allocator, first-call costs), so neither way pays it
    compare(a, layers[0], b, layers[0], sample_images(20), make_config("fast", epochs=1), device="cpu")

    t0 = time.perf_counter()
    for layer in layers:
        extract_features(a.model, layer, b.model, layer, images, transform_a=ta, transform_b=tb, device="cpu")
    extract_separate = time.perf_counter() - t0
    t0 = time.perf_counter()
    fa = extract_layers(a.model, layers, images, transform=ta, device="cpu")
    fb = extract_layers(b.model, layers, images, transform=tb, device="cpu")
    extract_sweep = time.perf_counter() - t0

    t0, c0 = time.perf_counter(), time.process_time()
    separate = [compare(a, layer, b, layer, images, config, preset="fast", device="cpu", both_directions=True)
                for layer in layers]
    separate_seconds, separate_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    result = sweep(a, layers, b, layers, images, config, preset="fast", device="cpu", both_directions=True)
    sweep_seconds, sweep_cpu = time.perf_counter() - t0, time.process_time() - c0

    diff = 0.0
    for alone, pair in zip(separate, result.pairs):
        for key, d in alone.directions.items():
            r1, r2 = d.fit.heldout_report, pair.comparison.directions[key].fit.heldout_report
            values = zip((r1.instability, *r1.share_orders), (r2.instability, *r2.share_orders))
            diff = max(diff, *(abs(x - y) for x, y in values))
    return {
        "pair": list(SWEEP_PAIR), "layers": layers, "n_images": n_images, "epochs": epochs,
        "separate_seconds": separate_seconds, "sweep_seconds": sweep_seconds,
        "ratio": sweep_seconds / separate_seconds,
        "separate_cpu_seconds": separate_cpu, "sweep_cpu_seconds": sweep_cpu, "cpu_ratio": sweep_cpu / separate_cpu,
        "extract_separate_seconds": extract_separate, "extract_sweep_seconds": extract_sweep,
        "extract_ratio": extract_sweep / extract_separate,
        "forward_passes": {"sweep": fa.forward_passes + fb.forward_passes,
                           "separate": 2 * len(layers) * fa.forward_passes},
        "max_abs_diff": diff,
        "instability": {p.label: {k: d.fit.heldout_report.instability for k, d in p.comparison.directions.items()}
                        for p in result.pairs},
    }
