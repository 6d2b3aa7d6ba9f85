"""A fitted g_θ as a value: :class:`FitResult` (predict, decompose, report) and its run folder (save/load)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from kcore._readback import Maybe
from kcore._validate import check_pair
from kcore.conventions import Normalization
from kcore.decompose import Decomposition, Method, components
from kcore.fit.config import FitConfig
from kcore.fit.plan import eval_batch_size
from kcore.gtheta import GTheta, GThetaSpec
from kcore.metrics import Baseline, VarianceAccumulator, VarianceReport
from kcore.provenance import json_default

StoppedBy = Literal["schedule", "patience", "budget"]
"""Why training ended: the planned steps ran out, patience ran out on the monitor split, or the time budget."""
RanPrecision = Literal["float32", "bfloat16 autocast"]
"""What the training steps' forward pass ran in (:attr:`FitConfig.train_precision` decides)."""

@dataclass(frozen=True)
class EpochRecord:
    """One epoch of the loss history.

    ``monitor_error`` is the relative error Σ(x* − g(x))² / Σ(x* − channel mean)² on the monitor split after
    the epoch; without a monitor split (the authors' recipe, tiny data sets) it is the training split's, from
    the epoch's running squared error (weights change during the epoch), which costs no extra pass.
    """

    epoch: int
    train_loss: float
    train_mse: float
    monitor_error: float
    lr: float
    gates: tuple[float, ...]
    seconds: float
    step: int = 0


@dataclass(frozen=True)
class FitResult:
    """A fitted g_θ with everything needed to reuse, judge and reproduce it.

    Attributes:
        model: the fitted :class:`GTheta` (CPU, eval mode).
        norm: the :class:`Normalization` (conventions and stored statistics).
        config: the :class:`FitConfig` used.
        history: one :class:`EpochRecord` per epoch run.
        best_epoch: the epoch whose weights were kept (early stopping on the monitor split).
        heldout_error: relative squared error Σ(x* − g(x))² / Σ(x* − channel mean)² on held-out images (= 1 − R²).
        heldout_report: the :class:`~kcore.metrics.VarianceReport` on held-out images.
        baseline: the 0-order baseline (least-squares R², linear CKA) on the same held-out images.
        train_indices, heldout_indices: the split (image indices into the fit's inputs).
        device: where it was fitted; seconds: wall time of the fit.
        monitor_indices: the images set aside to pick the best epoch (a share of the training split).
        steps_planned, epochs_planned: the length of the plan (:class:`~kcore.fit.plan.TrainPlan`).
        steps_run, epochs_run: the optimiser steps taken and the epochs begun.
        stopped_by: why training ended (:data:`StoppedBy`).
        train_precision: what the training steps' forward pass ran in (:data:`RanPrecision`).
        start_monitor_error: the monitor error of the starting weights (``None`` without a monitor split).
        nested: with ``nested=True``, the :class:`~kcore.fit.nested.NestedFits` (g₀ … g_K and their held-out
            gains); the training fields above are then g_K's. ``None`` otherwise.

    The last seven are ``None`` (``"float32"`` for ``train_precision``) for a fit saved before kcore recorded them.

    Examples::

        res = kcore.fit(x_src, x_tgt)
        res.gates, res.heldout_error, res.heldout_report.share_residual
        dec = res.decompose(x_src[:8], x_tgt[:8])
    """

    model: GTheta
    norm: Normalization
    config: FitConfig
    history: tuple[EpochRecord, ...]
    best_epoch: int
    heldout_error: float
    heldout_report: VarianceReport
    baseline: Baseline
    train_indices: tuple[int, ...]
    heldout_indices: tuple[int, ...]
    device: str = "cpu"
    seconds: float = 0.0
    monitor_indices: tuple[int, ...] = ()
    steps_planned: int | None = None
    steps_run: int | None = None
    epochs_planned: int | None = None
    epochs_run: int | None = None
    stopped_by: StoppedBy | None = None
    train_precision: RanPrecision = "float32"
    start_monitor_error: float | None = None
    nested: Any = None

    @property
    def extra(self) -> dict[str, Any]:
        """The facts of the fit as ``fit.json`` keeps them under ``"extra"``: the fields above, ``None`` left out.

        Returns:
            A new dict (``monitor_indices`` as a list), e.g. ``{"steps_run": 120, "stopped_by": "patience", …}``;
            read the typed fields instead where you can.
        """
        facts = {key: getattr(self, key) for key in FIT_EXTRA_FIELDS}
        facts["monitor_indices"] = list(self.monitor_indices)
        return {key: value for key, value in facts.items() if value is not None}

    @property
    def gates(self) -> tuple[float, ...]:
        """Fitted (p^(1), …, p^(K))."""
        return tuple(float(v) for v in self.model.gates().detach())

    def _check(self, x_src: Tensor, x_tgt: Tensor | None) -> None:
        spec = self.model.spec
        if x_src.shape[1] != spec.in_channels:
            raise ValueError(
                f"x_src has {x_src.shape[1]} channels, but this g_θ was fitted on {spec.in_channels}. "
                "Fix: use features of the same layer of network A as in the fit."
            )
        if x_tgt is not None:
            if x_tgt.shape[1] != spec.out_channels or tuple(x_tgt.shape[-2:]) != self.norm.target_size:
                raise ValueError(
                    f"x_tgt has shape (C, H, W) = {tuple(x_tgt.shape[1:])}, but this g_θ was fitted on "
                    f"({spec.out_channels}, {self.norm.target_size[0]}, {self.norm.target_size[1]}). "
                    "Fix: use features of the same layer of network B as in the fit."
                )

    def predict(self, x_src: Tensor, batch_size: int | None = None) -> Tensor:
        """g(x) in the fit's target units for raw source features (N, C_a, H_a, W_a) -> (N, C_b, H, W)."""
        from kcore._validate import check_feature_map

        check_feature_map("x_src", x_src)
        self._check(x_src, None)
        batch_size = batch_size or eval_batch_size(x_src.shape)
        dev = _model_device(self.model)
        with torch.no_grad():
            return torch.cat(
                [self.model(self.norm.source(x_src[i : i + batch_size].to(dev))).cpu() for i in range(0, len(x_src), batch_size)]
            )

    def iter_decompose(self, x_src: Tensor, x_tgt: Tensor, batch_size: int | None = None, method: Method = "batched"):
        """Yield (components, residual, target) batch by batch (memory bounded by ``batch_size``; default
        :func:`eval_batch_size`)."""
        x_src, x_tgt = check_pair(x_src, x_tgt)
        self._check(x_src, x_tgt)
        batch_size = batch_size or max(1, min(eval_batch_size(x_src.shape), eval_batch_size(x_tgt.shape)))
        dev = _model_device(self.model)
        dtype = next(self.model.parameters()).dtype
        for i in range(0, x_src.shape[0], batch_size):
            xs = self.norm.source(x_src[i : i + batch_size].to(dev, dtype))
            xt = self.norm.target(x_tgt[i : i + batch_size].to(dev, dtype))
            comps = components(self.model, xs, method)
            resid = xt - torch.stack(comps).sum(0)
            yield comps, resid, xt

    def decompose(self, x_src: Tensor, x_tgt: Tensor, batch_size: int | None = None, method: Method = "batched") -> Decomposition:
        """Split x* into x^(0) … x^(K) and x^Δ (Eq. 3–4) for raw features of the same images.

        Args:
            x_src: (N, C_a, H_a, W_a) features of network A.
            x_tgt: (N, C_b, H, W) features of network B.
            batch_size: images per batch (bounds the working memory; default :func:`eval_batch_size`).
            method: ``"batched"`` (default) or ``"branchwise"`` (reference).

        Returns:
            A :class:`Decomposition` (tensors on the CPU, in the fit's target units).
        """
        parts: list[list[Tensor]] = [[] for _ in range(self.model.orders + 1)]
        res, tgt = [], []
        for comps, resid, xt in self.iter_decompose(x_src, x_tgt, batch_size, method):
            for k, c in enumerate(comps):
                parts[k].append(c.cpu())
            res.append(resid.cpu())
            tgt.append(xt.cpu())
        return Decomposition([torch.cat(p) for p in parts], torch.cat(res), torch.cat(tgt), self.norm.convention)

    def report(self, x_src: Tensor, x_tgt: Tensor, batch_size: int | None = None) -> VarianceReport:
        """The :class:`~kcore.metrics.VarianceReport` for these images in one streaming pass, without keeping the components."""
        acc = VarianceAccumulator(self.model.orders, self.model.spec.out_channels)
        for comps, resid, xt in self.iter_decompose(x_src, x_tgt, batch_size):
            acc.update(comps, resid, xt)
        return acc.report()

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``g.safetensors`` (weights, Σ statistics, normalisation) and ``fit.json`` into ``directory``."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"g.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tensors.update({f"norm.{k}": v.contiguous() for k, v in self.norm.state().items()})
        if self.nested is not None:  # g_0 … g_(K-1) of a nested fit (g_K is the model)
            for k, m in enumerate(self.nested.models[:-1]):
                tensors.update({f"nested.{k}.{n}": v.detach().cpu().contiguous() for n, v in m.state_dict().items()})
        save_file(tensors, str(out / "g.safetensors"))
        meta = {
            "format": "kcore-fit/1",
            "spec": dataclasses.asdict(self.model.spec),
            "config": dataclasses.asdict(self.config),
            "target_size": list(self.norm.target_size),
            "history": [dataclasses.asdict(r) for r in self.history],
            "best_epoch": self.best_epoch,
            "heldout_error": self.heldout_error,
            "heldout_report": self.heldout_report.as_dict(),
            "baseline": self.baseline.as_dict(),
            "train_indices": list(self.train_indices),
            "heldout_indices": list(self.heldout_indices),
            "device": self.device,
            "seconds": self.seconds,
            "extra": self.extra,
        }
        if self.nested is not None:
            meta["nested"] = self.nested.as_dict()
        (out / "fit.json").write_text(json.dumps(meta, indent=1, default=json_default))
        return out

    @staticmethod
    def load(directory: str | Path, *, root: str | Path | None = None) -> "FitResult":
        """Read a result written by :meth:`save` (weights-only: safetensors + JSON), checked field by field.

        Both files are read like uploads (:mod:`kcore._readback`): regular files inside the folder, no symlink
        followed, under a size cap; every field of ``fit.json`` has the type it was written with, its lengths
        agree with K and the channels, the headline numbers and every tensor are finite.

        Args:
            directory: the folder written by :meth:`save`; relative to ``root`` when ``root`` is given.
            root: the folder the result lies in (e.g. a run folder): then no symlink below ``root`` is followed,
                ``directory`` included. Default: ``directory`` itself.

        Returns:
            The :class:`FitResult`.

        Raises:
            ValueError: a file is missing, unsafe (symlink, FIFO, device), too large, truncated, edited or
                inconsistent with the other; the message names the file and the field.

        Examples::

            res = kcore.load_result("runs/g")               # the folder written by res.save("runs/g")
            dec = res.decompose(x_src, x_tgt)
        """
        from kcore import _readback as rb

        top = Path(root) if root is not None else Path(directory)
        sub = Path(directory) if root is not None else Path()
        names = {n: str(sub / n) for n in ("fit.json", "g.safetensors")}
        try:
            meta = rb.read_json(top, names["fit.json"])
            tensors = rb.read_safetensors(top, names["g.safetensors"])
        except FileNotFoundError:
            missing = [n for n in names.values() if not (top / n).is_file()] or list(names.values())
            raise ValueError(f"directory {str(top / sub)!r} holds no {missing[0]}: expected a folder written by "
                             "FitResult.save().") from None
        spec, meta = _checked_fit_json(meta, tensors, top, names)
        try:
            return FitResult._from_parts(top / sub, meta, spec, tensors)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise rb.folder_error(top, names["fit.json"], f"is inconsistent ({type(exc).__name__}: "
                                                          f"{str(exc)[:200]})") from None

    @staticmethod
    def _from_parts(d: Path, meta: dict, spec: GThetaSpec, tensors: dict) -> "FitResult":
        model = GTheta(spec)
        model.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("g.")})
        model.eval()
        nt = {k[5:]: v for k, v in tensors.items() if k.startswith("norm.")}
        norm = Normalization(spec.convention, tuple(meta["target_size"]), **nt)
        extra = meta.get("extra") or {}  # the facts by field name (fits saved before them have fewer or none)
        facts = {key: extra[key] for key in FIT_EXTRA_FIELDS if extra.get(key) is not None}
        if "monitor_indices" in facts:
            facts["monitor_indices"] = tuple(facts["monitor_indices"])
        return FitResult(
            model=model,
            norm=norm,
            # fits saved before these options existed ran without warm-up and with the 1e-6 improvement threshold
            config=FitConfig(**{"warmup": 0.0, "min_delta": 1e-6, **meta["config"]}),
            history=tuple(EpochRecord(**{**r, "gates": tuple(r["gates"])}) for r in meta["history"]),
            best_epoch=meta["best_epoch"],
            heldout_error=meta["heldout_error"],
            heldout_report=VarianceReport.from_dict(meta["heldout_report"]),
            baseline=Baseline.from_dict(meta["baseline"]),
            train_indices=tuple(meta["train_indices"]),
            heldout_indices=tuple(meta["heldout_indices"]),
            device=meta["device"],
            seconds=meta["seconds"],
            nested=_nested_from_parts(meta.get("nested"), spec, tensors, model),
            **facts,
        )


def _nested_from_parts(block: Any, spec: GThetaSpec, tensors: dict, model: GTheta) -> Any:
    """The :class:`~kcore.fit.nested.NestedFits` that :meth:`FitResult.save` wrote, or None for other fits."""
    if block is None:
        return None
    from kcore.fit.nested import NestedFits, NestedGains, NestedStage

    models = []
    for k in range(spec.orders):
        m = GTheta(dataclasses.replace(spec, orders=k))
        m.load_state_dict({n[len(f"nested.{k}."):]: v for n, v in tensors.items() if n.startswith(f"nested.{k}.")})
        models.append(m.eval())
    gains = NestedGains.from_dict(block)
    if gains.orders != spec.orders or len(gains.gain_orders) != spec.orders + 1:
        raise ValueError(f"nested.orders = {gains.orders} with {len(gains.gain_orders)} gains; expected K = {spec.orders}")
    stages = tuple(NestedStage(**{**s, "gates": tuple(s["gates"])}) for s in block.get("stages") or ())
    return NestedFits(tuple(models) + (model,), gains, stages)


FIT_EXTRA_FIELDS: dict[str, Any] = {
    "monitor_indices": Maybe(tuple[int, ...]), "steps_planned": Maybe(int), "epochs_planned": Maybe(int),
    "train_precision": Maybe(RanPrecision), "start_monitor_error": Maybe(float), "steps_run": Maybe(int),
    "stopped_by": Maybe(StoppedBy), "epochs_run": Maybe(int),
}
"""The facts ``fit.json`` keeps under ``"extra"`` (each the :class:`FitResult` field of its name) and their types;
each may be missing (fits saved before it was recorded)."""

FIT_JSON_FIELDS: dict[str, Any] = {
    "format": Literal["kcore-fit/1"], "spec": GThetaSpec, "config": FitConfig, "target_size": tuple[int, int],
    "history": tuple[EpochRecord, ...], "best_epoch": int, "heldout_error": float, "heldout_report": VarianceReport,
    "baseline": Baseline, "train_indices": tuple[int, ...], "heldout_indices": tuple[int, ...], "device": str,
    "seconds": float, "extra": Maybe(FIT_EXTRA_FIELDS),
}
"""The fields of ``fit.json`` and the types :meth:`FitResult.save` writes them with."""


def check_report_lengths(rep: dict, orders: int, channels: int, folder: Path, name: str, where: str) -> None:
    """Check that a variance report read from JSON has K+1 orders and ``channels`` channels everywhere.

    Raises:
        ValueError: a list of another length; the message names the file and the field.
    """
    from kcore import _readback as rb

    k1 = orders + 1
    why_k, why_c = f"K+1 = {k1} orders", f"{channels} channels of the target"
    if rep.get("orders") != orders:
        raise rb.folder_error(folder, name, f"has field '{where}.orders' = {rep.get('orders')!r}; expected "
                                            f"{orders} (the spec's K)")
    for key in ("var_orders", "var_orders_channel_centred", "share_orders"):
        rb.check_length(rep.get(key), k1, folder, name, f"{where}.{key}", why_k)
    pc = rep["per_channel"]
    for key in ("var_orders", "share_orders"):
        rb.check_length(pc.get(key), k1, folder, name, f"{where}.per_channel.{key}", why_k)
        for i, row in enumerate(pc.get(key) or ()):
            rb.check_length(row, channels, folder, name, f"{where}.per_channel.{key}[{i}]", why_c)
    for key in ("var_residual", "var_target", "share_residual"):
        rb.check_length(pc.get(key), channels, folder, name, f"{where}.per_channel.{key}", why_c)
    ci = rep.get("ci")
    if ci:
        rb.check_length(ci["share_orders"], k1, folder, name, f"{where}.ci.share_orders", why_k)
        cso = ci.get("channel_share_orders")
        rb.check_length(cso, k1, folder, name, f"{where}.ci.channel_share_orders", why_k)
        for i, row in enumerate(cso or ()):
            rb.check_length(row, channels, folder, name, f"{where}.ci.channel_share_orders[{i}]", why_c)
        for key in ("channel_share_residual", "channel_instability"):
            rb.check_length(ci.get(key), channels, folder, name, f"{where}.ci.{key}", why_c)
    rb.check_finite({f"{where}.{k}": rep.get(k) for k in (
        "instability", "var_orders", "var_output", "var_residual", "var_target", "mse", "share_orders",
        "share_residual")}, folder, name)


def _checked_fit_json(meta: Any, tensors: dict, folder: Path, names: dict[str, str]) -> tuple[GThetaSpec, dict]:
    """``fit.json`` checked field by field and against ``g.safetensors``: the spec and the JSON, or a ValueError."""
    from kcore import _readback as rb

    name = names["fit.json"]
    rb.check_fields(meta, FIT_JSON_FIELDS, folder, name)
    try:
        spec = GThetaSpec(**meta["spec"])
    except (TypeError, ValueError) as exc:
        raise rb.folder_error(folder, name, f"has an invalid field 'spec' ({str(exc)[:200]})") from None
    sizes = {k: meta["spec"][k] for k in ("in_channels", "out_channels", "kernel_size")}
    if max(sizes.values()) > 1 << 16 or spec.orders > 64:  # the spec must not build a model of terabytes
        raise rb.folder_error(folder, name, f"has field 'spec' with sizes {sizes} and K={spec.orders}, far beyond "
                                            "any network's (at most 65536 channels, K ≤ 64)")
    with torch.device("meta"):  # shapes only: an edited spec must not allocate anything
        expected = {k: tuple(v.shape) for k, v in GTheta(spec).state_dict().items()}
    got = {k[2:]: tuple(v.shape) for k, v in tensors.items() if k.startswith("g.")}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise rb.folder_error(folder, name, f"has a spec that does not match the weights in g.safetensors: {diff}")
    norm = {"src_mean": spec.in_channels, "src_std": spec.in_channels, "tgt_mean": spec.out_channels,
            "tgt_std": spec.out_channels}
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise rb.folder_error(folder, names["g.safetensors"], f"holds {key!r} of dtype {t.dtype}; expected "
                                                                  "floating point")
        if key.startswith("norm.") and tuple(t.shape) != (norm.get(key[5:], -1),):
            raise rb.folder_error(folder, names["g.safetensors"], f"holds {key!r} of shape {tuple(t.shape)}; "
                                                                  f"expected ({norm.get(key[5:], 'no such key')},)")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise rb.folder_error(folder, names["g.safetensors"], f"holds {bad} NaN/Inf value(s) in {key!r}; "
                                                                  "expected finite weights and statistics")
        # the maps are divided by these: a std of 0 or a negative variance would give NaN/Inf components
        rule = {"norm.src_std": "> 0", "norm.tgt_std": "> 0", "g.running_var": ">= 0"}.get(key)
        if rule is not None and bool((t <= 0).any() if rule == "> 0" else (t < 0).any()):
            raise rb.folder_error(folder, names["g.safetensors"], f"holds {key!r} with values that are not {rule}; "
                                                                  "expected standard deviations and variances")
    if min(meta["target_size"]) < 1:
        raise rb.folder_error(folder, name, f"has field 'target_size' = {meta['target_size']}; expected two "
                                            "positive integers")
    for i, rec in enumerate(meta["history"]):
        rb.check_length(rec["gates"], spec.orders, folder, name, f"history[{i}].gates", f"K = {spec.orders} gates")
    check_report_lengths(meta["heldout_report"], spec.orders, spec.out_channels, folder, name, "heldout_report")
    rb.check_finite({"heldout_error": meta["heldout_error"]}, folder, name)
    for key in ("train_indices", "heldout_indices"):
        if any(i < 0 for i in meta[key]):
            raise rb.folder_error(folder, name, f"has a negative image index in field {key!r}")
    for key in ("monitor_indices", "steps_planned", "steps_run", "epochs_planned", "epochs_run"):
        value = (meta.get("extra") or {}).get(key)
        if value is not None and min(value if isinstance(value, list) else [value], default=0) < 0:
            raise rb.folder_error(folder, name, f"has a negative value in field 'extra.{key}'; expected image "
                                                "indices and counts of steps or epochs (>= 0)")
    return spec, meta


def _model_device(m: torch.nn.Module) -> torch.device:
    return next(m.parameters()).device
