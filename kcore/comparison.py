"""The result of comparing two networks: which checkpoints, which directions, and what each fit found.

:class:`Comparison` holds one :class:`DirectionResult` per direction (A → B: blind spots of A; B → A: unreliable
features of A) with the checkpoints' :class:`ModelInfo`; :mod:`kcore.pipeline` makes it, :mod:`kcore.run_folder`
writes and reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from kcore.baselines import ChanceBaseline
from kcore.checkpoints import LoadedModel
from kcore.decompose import Decomposition
from kcore.feature_set import FeaturePair
from kcore.fit import FitResult
from kcore.progress import PipelineProgress  # noqa: F401  (re-exported: progress reports were defined here)
from kcore.verdict import ChanceVerdict, chance_verdict

DIRECTIONS: dict[str, tuple[str, str, str]] = {
    "A_to_B": ("A", "B", "blind spots of A: what B encodes that A's feature cannot reconstruct"),
    "B_to_A": ("B", "A", "unreliable features of A: what A encodes that B's feature cannot reconstruct"),
}
RUN_FORMAT = "kcore-run/1"


@dataclass(frozen=True)
class ModelInfo:
    """Which checkpoint produced a result (shown next to every result and written to provenance)."""

    name: str
    sha256: str
    kind: str
    architecture: str | None
    num_parameters: int
    test_accuracy: float | None
    layer: str
    path: str | None = None

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of the checkpoint's SHA-256."""
        return self.sha256[:12]

    @staticmethod
    def from_loaded(m: LoadedModel, layer: str, path: str | None = None) -> "ModelInfo":
        """The record of model ``m`` compared at ``layer`` (``path``: where it was read from)."""
        card = m.card
        return ModelInfo(
            name=m.name, sha256=m.sha256, kind=m.kind, architecture=(card.architecture if card else None) or m.architecture,
            num_parameters=m.num_parameters, test_accuracy=card.test_accuracy if card else None, layer=layer,
            path=path,
        )

    def label(self) -> str:
        """One line for people: name, short hash, layer, parameters and accuracy."""
        acc = f", acc {self.test_accuracy:.1%}" if self.test_accuracy is not None else ""
        return f"{self.name} [{self.short_hash}] · {self.layer} · {self.num_parameters:,} params{acc}"


@dataclass(frozen=True)
class DirectionResult:
    """g_θ fitted in one direction: ``source`` features reconstruct ``target`` features."""

    key: str
    source: str
    target: str
    meaning: str
    fit: FitResult


@dataclass(frozen=True, eq=False)
class Comparison:
    """Two networks compared at one layer each, in one or both directions.

    Attributes:
        a, b: the checkpoints (:class:`ModelInfo`).
        features: A's and B's features of the images (all images after :func:`compare`; only the
            held-out ones after :func:`read_run`).
        heldout_positions: positions in ``features`` of the held-out images (never used for fitting).
        directions: ``"A_to_B"`` and/or ``"B_to_A"`` → :class:`DirectionResult`.
        provenance: hashes, layers, image set, seed, preset, versions, device.
        baselines: chance-level references (:mod:`kcore.baselines`), kind → :class:`ChanceBaseline`.

    Examples::

        cmp = kcore.read_run("runs/ab")
        for key, d in cmp.directions.items():
            print(key, d.meaning, d.fit.heldout_report.instability)
    """

    a: ModelInfo
    b: ModelInfo
    features: FeaturePair
    heldout_positions: tuple[int, ...]
    directions: dict[str, DirectionResult]
    provenance: dict = field(default_factory=dict)
    baselines: dict[str, ChanceBaseline] = field(default_factory=dict)
    seed_spread: dict[str, dict] = field(default_factory=dict)

    @property
    def preset(self) -> str:
        """The fit preset that produced the numbers (the order split depends on it), or ``"unknown"``."""
        return str(self.provenance.get("preset") or "unknown")

    def pair(self, direction: str, positions: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """(x_src, x_tgt) float32 for ``direction`` at ``positions`` (default: the held-out images)."""
        _check_direction(direction, self.directions)
        pos = torch.as_tensor(list(self.heldout_positions if positions is None else positions), dtype=torch.long)
        xa, xb = self.features.x_a[pos].float(), self.features.x_b[pos].float()
        return (xa, xb) if direction == "A_to_B" else (xb, xa)

    def decompose(self, direction: str, positions: Sequence[int] | None = None) -> Decomposition:
        """The order-wise decomposition of ``direction`` for images at ``positions`` (default: held out)."""
        x_src, x_tgt = self.pair(direction, positions)
        return self.directions[direction].fit.decompose(x_src, x_tgt)

    def image_ids(self, positions: Sequence[int] | None = None) -> list[str]:
        """The ids of the images at ``positions`` (default: the held-out images)."""
        pos = self.heldout_positions if positions is None else positions
        return [self.features.image_ids[i] for i in pos]

    def verdict(self, direction: str) -> ChanceVerdict:
        """The verdict against chance of ``direction`` (:func:`kcore.verdict.chance_verdict`; ``unknown`` without
        baselines).

        Raises:
            ValueError: ``direction`` is not one of the comparison's directions.
        """
        _check_direction(direction, self.directions)
        return chance_verdict(self.directions[direction].fit.heldout_report, self.baselines, direction)

    def metrics(self) -> dict:
        """The metrics.json content: per direction the held-out report, error, baseline, gates and verdict."""
        out: dict[str, Any] = {"format": RUN_FORMAT, "directions": {}}
        for key, d in self.directions.items():
            block = {
                "meaning": d.meaning,
                "source": d.source,
                "target": d.target,
                **d.fit.heldout_report.as_dict(),
                "heldout_error": d.fit.heldout_error,
                "baseline": d.fit.baseline.as_dict(),
                "gates": list(d.fit.gates),
                "best_epoch": d.fit.best_epoch,
                "fit_seconds": d.fit.seconds,
                "verdict": self.verdict(key).as_dict(),
            }
            if d.fit.nested is not None:  # nested fits: the order-wise gains beside the split of g_K
                gains = d.fit.nested.gains.as_dict()
                block.update(gain_orders=gains["gain_orders"], gain_ci=gains["gain_ci"], nested=d.fit.nested.as_dict())
            out["directions"][key] = block
        if len(self.directions) == 1:  # one direction: its block is also the top level
            (key, block), = out["directions"].items()
            out.update({k: v for k, v in block.items()})
            out["direction"] = key
        out["preset"] = self.preset
        out["baselines"] = {k: b.as_dict() for k, b in self.baselines.items()}
        if self.provenance.get("baselines_failed"):  # a baseline that failed: its error, beside the others
            out["baselines_failed"] = dict(self.provenance["baselines_failed"])
        out["seed_spread"] = self.seed_spread
        return out

def _check_direction(direction: str, available: dict) -> None:
    if direction not in available:
        raise ValueError(f"direction must be one of {sorted(available)}; got {direction!r}.")
