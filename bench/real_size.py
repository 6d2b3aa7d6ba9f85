"""Real sizes: torchvision architectures (random weights) at 224 px on images the project renders (kshapes).

One row per (architecture, layer, N images): extraction into the float16 disk cache, the whole default fit from
that cache, the held-out decomposition report; steps run, held-out error against the least-squares baseline and
(optionally) against the same preset run 10× longer; peak memory; and the training step's FLOP/s against a bare
convolution forward of the same shape (oneDNN's rate, the floor the step cannot beat) in the same process.

Random weights make the timing honest; the quality is a function of the data (two differently seeded networks on
the same images), the same for every schedule compared. Opt-in (``python -m bench --only real_size``): minutes
per row on two cores, never part of the smoke profile.
"""
from __future__ import annotations

import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import interleaved_times, proc_status
from bench.throughput import forward_flops
from kcore.fit import FitConfig, make_config, make_optimizer, train_step
from kcore.gtheta import GTheta, GThetaSpec

ROWS: tuple[tuple[str, str, int], ...] = (
    ("resnet18", "layer3", 600),
    ("resnet50", "layer3", 1000),
    ("vgg16", "features.21", 1000),  # conv4_3 (512×28×28 at 224 px)
)
"""(architecture, layer, images) of the issue's real-size rows."""


def step_vs_conv(channels_in: int, channels_out: int, size: int, repeats: int = 3,
                 device: str = "cpu", batch_size: int | None = None) -> dict[str, Any]:
    """FLOP/s of the default fit's training step against one bare 3×3 convolution forward of the same shape
    (both in float32, ``batch_size`` images, default the preset's; on CUDA each call is timed to its end with a
    synchronisation)."""
    cfg = make_config("fast")
    torch.manual_seed(0)
    spec = GThetaSpec(channels_in, channels_out, cfg.orders, cfg.kernel_size, cfg.convention, cfg.gate, cfg.p_init)
    fmt = torch.channels_last
    dev = torch.device(device)
    model = GTheta(spec).to(dev, memory_format=fmt).train()
    opt = make_optimizer(model, cfg)
    b = batch_size or cfg.batch_size
    xb = torch.randn(b, channels_in, size, size, device=dev).contiguous(memory_format=fmt)
    tb = torch.randn(b, channels_out, size, size, device=dev).contiguous(memory_format=fmt)
    w = torch.randn(channels_out, channels_in, 3, 3, device=dev).contiguous(memory_format=fmt)

    def synced(fn: Any) -> Any:
        if dev.type != "cuda":
            return fn
        def run() -> None:
            fn()
            torch.cuda.synchronize(dev)
        return run

    def conv() -> None:
        with torch.no_grad():
            F.conv2d(xb, w, padding=1)

    t = interleaved_times({"step": synced(lambda: train_step(model, opt, xb, tb, cfg.lam)), "conv": synced(conv)},
                          repeats=repeats, warmup=1)
    step_rate = 3.0 * forward_flops(spec, size, size) * b / t["step"]
    conv_rate = 2.0 * 9 * channels_in * channels_out * size * size * b / t["conv"]
    return {"step_gflops": step_rate / 1e9, "conv_gflops": conv_rate / 1e9, "ratio": step_rate / conv_rate,
            "step_seconds": t["step"], "batch_size": b}


def longer_overrides(cfg: FitConfig, planned: int, factor: int = 10) -> dict[str, Any]:
    """``fit`` overrides for the quality reference: the config that ran (``FitResult.config``) for ``factor``× its
    ``planned`` steps, with the same batch and monitor interval.

    An explicit ``max_steps`` is taken literally (:func:`kcore.fit.make_config` lifts the preset's
    ``flops_budget``, which would otherwise cap the plan at the default's length, and an explicit batch clears
    ``small_batch``); the patience grows by the same factor.
    """
    return {"max_steps": planned * factor, "patience_steps": (cfg.patience_steps or 0) * factor or None,
            "batch_size": cfg.batch_size, "eval_every": cfg.eval_every}


def real_size_row(arch: str, layer: str, n: int, longer: bool = False, batch_size: int = 32,
                  float32: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Extraction + whole default fit + held-out report for two random-weight ``arch`` networks on ``n`` images.

    ``longer``: also the same preset with 10× the planned steps (the quality reference); ``float32``: also the
    default fit with ``train_precision="float32"`` (what the bfloat16 training steps change). ``device``:
    ``"cpu"`` or ``"cuda"`` for extraction, fits and decomposition (the features' cache stays on disk either way);
    on CUDA the row also records the peak GPU memory.
    """
    import torchvision

    from kcore.data import ImageSet, Preprocess
    from kcore.feature_cache import CacheKey, cached_arrays
    from kcore.features import extract_features
    from kcore.fit import fit
    from kcore.preprocessing import standard_preprocessing
    from kcore.synthetic import KShapesSpec

    prep = standard_preprocessing(arch)
    size = prep.load_size
    images = ImageSet.from_kshapes(KShapesSpec(seed=0, image_size=size[0], n_train=n, n_test=10), "train", n,
                                   Preprocess(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    torch.manual_seed(0)
    a = torchvision.models.get_model(arch, num_classes=10).eval()
    torch.manual_seed(1)
    b = torchvision.models.get_model(arch, num_classes=10).eval()
    out: dict[str, Any] = {"arch": arch, "layer": layer, "n_images": n, "preprocessing": prep.as_dict(),
                           "device": device}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="kcore-bench-") as tmp:
        t = time.perf_counter()
        feats = extract_features(a, layer, b, layer, images, batch_size=batch_size, device=device,
                                 transform_a=prep.transform(), transform_b=prep.transform(), cache_dir=tmp,
                                 cache_key=CacheKey(f"{arch}-seed0", f"{arch}-seed1", f"kshapes-224-{n}", str(prep)))
        out["extract_seconds"] = time.perf_counter() - t
        xa, xb = cached_arrays(feats) if _has_cached(feats) else (feats.x_a, feats.x_b)
        out["shape"] = list(feats.x_a.shape[1:])
        t = time.perf_counter()
        res = fit(xa, xb, device=device)
        out["fit_seconds"] = time.perf_counter() - t
        held = torch.as_tensor(res.heldout_indices)
        t = time.perf_counter()
        res.report(feats.x_a[held].float(), feats.x_b[held].float())
        out["decompose_seconds"] = time.perf_counter() - t
        out.update(steps_run=res.extra.get("steps_run"), epochs_run=res.extra.get("epochs_run"),
                   stopped_by=res.extra.get("stopped_by"), best=res.best_epoch, heldout_error=res.heldout_error,
                   lstsq_error=1.0 - res.baseline.linear_r2)
        print(f"[real size] {arch} {layer}: extract {out['extract_seconds']:.1f} s, fit {out['fit_seconds']:.1f} s "
              f"({out['steps_run']} of {res.extra.get('steps_planned')} planned steps, {out['stopped_by']}), "
              f"decompose {out['decompose_seconds']:.1f} s; held-out {out['heldout_error']:.4f} vs least squares "
              f"{out['lstsq_error']:.4f}", file=sys.stderr, flush=True)
        out["train_precision"] = res.extra.get("train_precision")
        out["batch_size"] = res.config.batch_size
        if float32:
            t = time.perf_counter()
            ref32 = fit(xa, xb, device=device, train_precision="float32")
            out["float32_seconds"] = time.perf_counter() - t
            out["float32_heldout_error"] = ref32.heldout_error
            out["float32_steps_run"] = ref32.extra.get("steps_run")
        if longer:
            cfg = res.config
            planned = int(res.extra["steps_planned"])
            out["longer_steps_planned"] = planned * 10
            t = time.perf_counter()
            ref = fit(xa, xb, device=device, **longer_overrides(cfg, planned))
            out["longer_steps_run"] = ref.extra.get("steps_run")
            out["longer_seconds"] = time.perf_counter() - t
            out["longer_heldout_error"] = ref.heldout_error
    out["peak_rss"] = proc_status().get("VmHWM")
    if cuda:
        out["peak_cuda"] = torch.cuda.max_memory_allocated()
    c, h = out["shape"][0], out["shape"][1]
    out["throughput"] = step_vs_conv(c, c, h, device=device, batch_size=out["batch_size"])
    out["total_seconds"] = out["extract_seconds"] + out["fit_seconds"] + out["decompose_seconds"]
    return out


def _has_cached(feats: Any) -> bool:
    return getattr(feats, "entry", None) is not None
