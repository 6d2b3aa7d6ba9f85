"""Chance-level baselines: what the same fit gives when B knows nothing, or when the images are mismatched.

An instability of 0.3 means little until one knows what a network that learned nothing gives (random networks
share much low-level structure with trained ones). Two references, each fitted with exactly the fit's recipe
and split and reported with the same :class:`~kcore.metrics.VarianceReport` (held-out, with intervals):

- ``random_b``: B replaced by a randomly initialised network of the same architecture (seeded; built from
  the architecture registry when the checkpoint names one, else by re-running every module's
  ``reset_parameters`` on a copy).
- ``shuffled``: the image pairing shuffled (x of image i against x* of image π(i), π without fixed points; with
  groups of images, π(i) always in another group than i):
  nothing but the per-channel statistics can be predicted: the instability comes out about 1, or a little below,
  when g generalises; an interval entirely above 1 means g over-fits its training images (:mod:`kcore.verdict`).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from kcore.metrics import VarianceReport

BASELINE_KINDS: dict[str, str] = {
    "random_b": "B replaced by a randomly initialised network of the same architecture",
    "shuffled": "image pairing shuffled (x of one image against x* of another): about 1 when g generalises; above 1, g over-fits",
}
BASELINE_LABELS: dict[str, str] = {"random_b": "random-init B", "shuffled": "shuffled pairs"}
#: baselines are "cheap" (on by default in the dashboard) up to this many feature values of B over all images:
#: they add two fits per direction and one extraction of B, about three times the fit alone
CHEAP_FEATURE_VALUES = 20_000_000


def baselines_are_cheap(n_images: int, shape_b: Sequence[int]) -> bool:
    """Whether the chance baselines add little wall time: N · C·H·W of B's feature at most CHEAP_FEATURE_VALUES."""
    n = int(n_images)
    for s in shape_b:
        n *= int(s)
    return n <= CHEAP_FEATURE_VALUES


@dataclass(frozen=True)
class ChanceBaseline:
    """One chance-level reference: per direction the held-out report of the same fit on the reference data.

    Attributes:
        kind: a key of :data:`BASELINE_KINDS`. description: what was done, in words.
        reports: direction key → :class:`VarianceReport`. heldout_error: direction key → 1 − R².
        seed: the seed of the random network or of the shuffle.
    """

    kind: str
    description: str
    reports: Mapping[str, VarianceReport]
    heldout_error: Mapping[str, float]
    seed: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The baseline's display name (its kind when it has none)."""
        return BASELINE_LABELS.get(self.kind, self.kind)

    def as_dict(self) -> dict:
        """The metrics.json form: kind, description, seed, extra, and per direction the report and error."""
        return {
            "kind": self.kind, "description": self.description, "seed": self.seed, "extra": dict(self.extra),
            "directions": {k: {**r.as_dict(), "heldout_error": self.heldout_error.get(k)} for k, r in self.reports.items()},
        }

    @staticmethod
    def from_dict(d: Mapping) -> "ChanceBaseline":
        """The baseline from its :meth:`as_dict` form."""
        dirs = d.get("directions", {})
        return ChanceBaseline(
            kind=str(d["kind"]), description=str(d.get("description", "")), seed=int(d.get("seed", 0)),
            reports={k: VarianceReport.from_dict(v) for k, v in dirs.items()},
            heldout_error={k: float(v.get("heldout_error") or float("nan")) for k, v in dirs.items()},
            extra=dict(d.get("extra", {})),
        )


def seed_spread(reports: Sequence[VarianceReport], seeds: Sequence[int]) -> dict:
    """The spread from fitting: instability, additive shares and the paper's Var ratios of fits with several seeds.

    Each seed draws its own split, initialisation and batch order, so the spread holds both the sampling of the
    held-out images and the fit's own randomness. Returns the per-seed values and their mean, sd, min and max.
    """
    import statistics

    def stats(vals: Sequence[float]) -> dict:
        return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "min": min(vals), "max": max(vals)}

    K = reports[0].orders
    per = {
        "instability": [r.instability for r in reports],
        "share_orders": [list(r.share_orders or ()) for r in reports],
        "share_residual": [r.share_residual for r in reports],
        "var_ratio_orders": [list(r.var_ratio_orders) for r in reports],
    }
    return {
        "seeds": list(seeds), **per,
        "summary": {
            "instability": stats(per["instability"]),
            "share_orders": [stats([s[k] for s in per["share_orders"]]) for k in range(K + 1)] if reports[0].has_shares else [],
            "share_residual": stats(per["share_residual"]) if reports[0].has_shares else None,
            "var_ratio_orders": [stats([s[k] for s in per["var_ratio_orders"]]) for k in range(K + 1)],
        },
    }


def derangement(n: int, seed: int = 0, groups: Any = None) -> Tensor:
    """A seeded permutation π of ``range(n)`` that pairs every image with one of another group: a random shift
    of a random order that keeps each group together.

    The images are put in a seeded random order, then gathered group by group (the groups in the order their
    first image appears, each group's images in their drawn order); image ``order[i]`` is paired with
    ``order[(i + shift) mod n]``. With the largest group holding m images, any shift from m to n − m moves
    every image past the end of its own group without wrapping back into it, so no image meets its group; the
    shift is drawn uniformly from that range. Without groups (every image its own group, m = 1) the order is
    the drawn one and the shift any of 1 … n − 1: the permutation is exactly the ungrouped derangement of the
    same seed.

    Such a pairing exists exactly when no group holds more than half of the images (2·m ≤ n): a group of m
    images needs m partners outside it, and only n − m images are outside it.

    Args:
        n: the number of images (at least 2).
        seed: the seed of the order and of the shift.
        groups: one group per image (:class:`kcore.groups.Groups` or N keys), or ``None``: every image its own.

    Returns:
        π as a (n,) int64 tensor: image i is paired with image π(i), never of i's group (never i itself).

    Raises:
        BaselineUnavailable: (a ValueError) a group holds more than half of the images.
        ValueError: ``n`` below 2, or ``groups`` not one per image.
        TypeError: ``groups`` is neither :class:`kcore.groups.Groups`, a sequence of keys nor ``None``.
    """
    from kcore.groups import as_groups

    if n < 2:
        raise ValueError(f"shuffling the pairing needs at least 2 images; got {n}.")
    grouped = as_groups(groups, n, "groups")
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=g)
    largest = 1
    if grouped is not None and not grouped.trivial:
        sizes = grouped.sizes()
        largest = max(sizes)
        if 2 * largest > n:
            big = sizes.index(largest)
            raise BaselineUnavailable(
                f"groups: the shuffled pairing pairs every image with an image of another group, which needs every "
                f"group to hold at most half of the {n} images; group {grouped.names[big]!r} holds {largest} "
                f"(at most {n // 2} allowed). Fix: add images from other groups, use finer groups, or leave out the "
                "shuffled baseline.")
        labels = grouped.label_tensor()[order]
        first = torch.full((grouped.n_groups,), n, dtype=torch.long).scatter_reduce(
            0, labels, torch.arange(n), reduce="amin")  # where each group first appears in the drawn order
        order = order[torch.argsort(first[labels], stable=True)]  # grouped; the drawn order kept inside a group
    shift = int(torch.randint(largest, n - largest + 1, (1,), generator=g))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-shift)  # image order[i] is paired with order[i + shift]
    return perm


class BaselineUnavailable(ValueError):
    """A chance baseline that cannot be built for this model or these images by design (e.g. a random network of a
    TorchScript archive's architecture, or a pairing across groups when one group holds more than half the images);
    :func:`kcore.pipeline.compare` records it as skipped, not as failed."""


#: the random-init B must differ from the trained B in at least this share of its parameter elements
MIN_CHANGED_SHARE = 0.9


def _copy_module(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose fx graphs' node metadata is shared, not copied.

    An unflattened ``torch.export`` program keeps fake (symbolic) tensors in its graphs' node metadata, which
    cannot be deep-copied; they describe shapes only, so the copy may share them. Parameters and buffers are
    copied as usual.

    Args:
        model: the network.

    Returns:
        The copy.
    """
    memo: dict[int, Any] = {}
    for mod in model.modules():
        graph = getattr(mod, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            for node in graph.nodes:
                for value in node.meta.values():
                    memo[id(value)] = value
    return copy.deepcopy(model, memo)


def _redraw(name: str, tensor: Tensor) -> None:
    """Re-draw one parameter in place as torch's layers initialise theirs, judged from its name and shape.

    Two or more dimensions: Kaiming uniform with ``a=√5`` (``nn.Linear`` / ``nn.Conv2d``); a 1-D weight (a
    normalisation's scale): ones; any other 1-D or 0-D parameter (a bias or shift): zeros.

    Args:
        name: the parameter's name (e.g. ``"weight"``).
        tensor: the parameter's data, changed in place.
    """
    if tensor.dim() >= 2:
        nn.init.kaiming_uniform_(tensor, a=5 ** 0.5)
    elif name.endswith("weight"):
        nn.init.ones_(tensor)
    else:
        nn.init.zeros_(tensor)


def _reinitialise(net: nn.Module) -> int:
    """Re-initialise ``net`` in place.

    Each module's ``reset_parameters`` / ``reset_running_stats`` runs where it has one; the parameters of
    modules that have none (e.g. an exported program's ``InterpreterModule``) are re-drawn by :func:`_redraw`,
    and their normalisation statistics reset by name (``running_mean`` 0, ``running_var`` 1).

    Args:
        net: the network, changed in place.

    Returns:
        How many parameters were re-drawn by :func:`_redraw`.
    """
    redrawn = 0
    for mod in net.modules():
        reset = getattr(mod, "reset_parameters", None)
        if callable(reset):
            reset()
        else:
            with torch.no_grad():
                for pname, param in mod.named_parameters(recurse=False):
                    _redraw(pname, param.data)
                    redrawn += 1
        stats = getattr(mod, "reset_running_stats", None)
        if callable(stats):
            stats()
        else:
            with torch.no_grad():
                for bname, buf in mod.named_buffers(recurse=False):
                    if bname.endswith("running_mean") or bname.endswith("num_batches_tracked"):
                        buf.zero_()
                    elif bname.endswith("running_var"):
                        buf.fill_(1)
    return redrawn


def changed_share(trained: nn.Module, other: nn.Module) -> float:
    """The share of ``trained``'s parameter elements whose value differs in ``other`` (matched by name and shape).

    Args:
        trained: the trained network.
        other: a network of the same architecture.

    Returns:
        Changed elements / all parameter elements of ``trained`` (a parameter missing from ``other`` or of
        another shape counts as changed); 1.0 for a network without parameters.
    """
    theirs = dict(other.named_parameters())
    total = changed = 0
    for name, param in trained.named_parameters():
        total += param.numel()
        mine = theirs.get(name)
        if mine is None or mine.shape != param.shape:
            changed += param.numel()
        else:
            changed += int((mine.detach().cpu() != param.detach().cpu()).sum())
    return changed / total if total else 1.0


def random_init_like(m: Any, seed: int = 0) -> tuple[Any, str]:
    """A copy of the :class:`~kcore.checkpoints.LoadedModel` ``m`` with freshly initialised weights (seeded),
    and how it was made.

    The architecture registry builds it when ``m`` names an architecture (the architecture's own initialisation);
    otherwise a copy of the model (an exported program's included: its symbolic graph metadata is shared, not
    copied) is re-initialised: every module's ``reset_parameters`` / ``reset_running_stats``, and the parameters
    of modules without one re-drawn by shape (:func:`_redraw`). The trained model is never touched.

    Args:
        m: the loaded model B.
        seed: the seed of the initialisation.

    Returns:
        (the random model as a ``LoadedModel``, how it was made in words).

    Raises:
        BaselineUnavailable: (a ValueError) the model can be neither rebuilt nor copied (a TorchScript archive).
        ValueError: fewer than
            :data:`MIN_CHANGED_SHARE` of its parameter elements changed (the result would be the trained network).
    """
    from kcore.architectures import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if m.architecture and m.num_classes:
            net, how = build_model(m.architecture, int(m.num_classes)), f"built as {m.architecture}"
        else:
            if isinstance(m.model, torch.jit.ScriptModule):
                raise BaselineUnavailable(f"{m.name} is a TorchScript archive: kcore cannot build a random network of its "
                                 "architecture. Fix: load the weights into a named architecture (--arch-b).")
            net, how = _copy_module(m.model), "a copy with every module's reset_parameters()"
            if _reinitialise(net):
                how += " and the other parameters re-drawn by shape (Kaiming uniform weights, unit scales, zero biases)"
    net.eval()
    share = changed_share(m.model, net)
    if share < MIN_CHANGED_SHARE:
        raise ValueError(
            f"the random-init baseline of {m.name} changed only {share:.1%} of its parameter elements "
            f"(at least {MIN_CHANGED_SHARE:.0%} expected), so it would be the trained network, not a chance "
            "reference. Fix: load B's weights into a named architecture (--arch-b, or a model card's "
            "architecture) so kcore can build a fresh one, or leave out the random_b baseline."
        )
    digest = hashlib.sha256(f"random-init:{m.sha256}:{seed}".encode()).hexdigest()
    return dataclasses.replace(m, model=net, name=f"{m.name} (random init, seed {seed})", sha256=digest), how


def _fit_directions(x_a: Tensor, x_b: Tensor, keys: Sequence[str], cfg: Any, device: Any, cancel: Any,
                    on_fit: Callable[[str, Any], None], groups: Any = None) -> tuple[dict, dict]:
    from kcore.fit import fit

    reports, errors = {}, {}
    for key in keys:
        x_src, x_tgt = (x_a, x_b) if key == "A_to_B" else (x_b, x_a)
        res = fit(x_src, x_tgt, config=cfg, device=device, cancel=cancel,
                  progress=lambda p, key=key: on_fit(key, p), groups=groups)
        reports[key], errors[key] = res.heldout_report, res.heldout_error
    return reports, errors


def shuffled_baseline(x_a: Tensor, x_b: Tensor, keys: Sequence[str], cfg: Any, *, seed: int = 0,
                      device: Any = "cpu", cancel: Any = None,
                      on_fit: Callable[[str, Any], None] | None = None, groups: Any = None) -> ChanceBaseline:
    """The fit of ``cfg`` with B's features of image π(i) paired with A's of image i (π: :func:`derangement`).

    ``groups`` (one per image, :class:`kcore.groups.Groups`) are A's images': π pairs every image with one of
    another group (a near-copy as partner would make the chance level optimistic), the split keeps them whole and
    the intervals resample them, as in the main fit, so the two intervals are comparable."""
    perm = derangement(x_b.shape[0], seed, groups)
    reports, errors = _fit_directions(x_a, x_b[perm], keys, cfg, device, cancel, on_fit or (lambda k, p: None),
                                      groups)
    return ChanceBaseline("shuffled", BASELINE_KINDS["shuffled"], reports, errors, seed)


def random_network_baseline(x_a: Tensor, b: Any, layer_b: str, images: Any, keys: Sequence[str], cfg: Any, *,
                            seed: int = 0, device: Any = "cpu", batch_size: int = 64, ids: Sequence[str] | None = None,
                            cancel: Any = None, on_fit: Callable[[str, Any], None] | None = None,
                            groups: Any = None) -> ChanceBaseline:
    """The fit of ``cfg`` with B replaced by :func:`random_init_like` (same layer, same images, same preprocessing,
    the same ``groups``: :class:`kcore.groups.Groups` of the images, kept whole by the split)."""
    from kcore.features import extract_features
    from kcore.preprocessing import preprocessing_of

    rand, how = random_init_like(b, seed)
    t = preprocessing_of(b).transform()
    feats = extract_features(rand.model, layer_b, rand.model, layer_b, images, batch_size=batch_size, device=device,
                             ids=ids, transform_a=t, transform_b=t, cancel=cancel)
    reports, errors = _fit_directions(x_a, feats.x_b, keys, cfg, device, cancel, on_fit or (lambda k, p: None),
                                      groups)
    return ChanceBaseline("random_b", BASELINE_KINDS["random_b"], reports, errors, seed, {"network": how})
