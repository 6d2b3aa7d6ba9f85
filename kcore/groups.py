"""Groups of correlated images (crops of one photo, frames of one video, one subject): which images belong together.

A fit never splits a group between its training, monitor and held-out images (:func:`group_split`), and the
bootstrap intervals resample whole groups (a cluster bootstrap, :meth:`kcore.metrics.ImageMoments.bootstrap`), so
that held-out numbers and their intervals are not made optimistic by near-copies on both sides of the split.
The paper has no groups; without them every image is its own group and every number is what it was before.

Where groups come from (:data:`GROUP_SOURCES`):

- ``"folder"``: the folder an image lies in, below the data root: ``group/image.png`` → ``group``;
  ``class/group/image.png`` → ``class/group`` (the whole parent path, so groups of different classes never merge);
  an image directly in the root is its own group.
- ``"csv"``: a file with the columns ``image,group`` (``image`` = the path relative to the data root, as the image
  set's ids are); every image must be listed.
- ``"pattern"``: a regular expression with one capturing group applied to each file name (not its folder), e.g.
  ``^(.*)_crop\\d+`` puts ``cat_crop1.png`` and ``cat_crop2.png`` together; a name it does not match is its own
  group. The pattern runs in a separate process under a time limit, so a catastrophic pattern sent by a browser
  cannot stall the server.
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

import torch
from torch import Tensor

from kcore.limits import limits as current_limits

__all__ = [
    "GROUP_SOURCES", "GroupSource", "Groups", "MAX_NAME_CHARS", "MAX_PATTERN_CHARS", "PATTERN_TIMEOUT_S",
    "as_groups", "csv_groups", "folder_groups", "group_split", "groups_option", "pattern_groups",
    "groups_provenance", "split_summary",
]

GroupSource = Literal["none", "folder", "csv", "pattern", "given"]

GROUP_SOURCES: dict[str, str] = {
    "none": "every image its own group",
    "folder": "the folder each image lies in (group/image.png; class/group/image.png)",
    "csv": "a CSV file with the columns image,group",
    "pattern": "a regular expression with one group on each file name",
    "given": "group labels passed by the caller",
}
"""Where a grouping comes from, with the words the UI and the docs show."""

MAX_PATTERN_CHARS = 200
"""A file-name pattern may be at most this long."""

MAX_NAME_CHARS = 255
"""A pattern is applied only to file names of at most this many characters (longer ones are refused)."""

PATTERN_TIMEOUT_S = 10.0
"""Seconds the separate process may take to compile a pattern and apply it to every file name."""

CSV_BYTES_PER_IMAGE = 1024
"""A groups CSV may hold at most this many bytes per image the server allows (``max_images``)."""


@dataclass(frozen=True)
class Groups:
    """A group label for every image of an image set, in the set's order.

    Attributes:
        labels: N group numbers in ``0 … G−1``, numbered in order of first appearance.
        names: G group names (``names[labels[i]]`` is image i's group).
        source: where the grouping came from, a key of :data:`GROUP_SOURCES`.
        detail: the CSV file's absolute path (``"upload"`` for bytes) or the pattern (empty otherwise).
        unmatched: images a pattern did not match (each its own group).
    """

    labels: tuple[int, ...]
    names: tuple[str, ...]
    source: GroupSource = "given"
    detail: str = ""
    unmatched: int = 0

    def __post_init__(self) -> None:
        if self.source not in GROUP_SOURCES:
            raise ValueError(f"source must be one of {sorted(GROUP_SOURCES)}; got {self.source!r}.")
        if len(set(self.labels)) != len(self.names) or (self.labels and (min(self.labels) < 0
                                                                        or max(self.labels) >= len(self.names))):
            raise ValueError(f"labels must use each of 0 … {len(self.names) - 1} (one per name) at least once; got "
                             f"{len(set(self.labels))} distinct labels for {len(self.names)} names. Fix: build "
                             "Groups with Groups.from_keys.")

    @staticmethod
    def from_keys(keys: Sequence[Hashable], source: GroupSource = "given", detail: str = "",
                  unmatched: int = 0) -> Groups:
        """Groups from one key per image (images with equal keys form a group), numbered by first appearance."""
        index: dict[Hashable, int] = {}
        labels = tuple(index.setdefault(k, len(index)) for k in keys)
        return Groups(labels, tuple(str(k) for k in index), source, detail, unmatched)

    @staticmethod
    def singletons(n: int) -> Groups:
        """Every one of ``n`` images its own group (the default: no grouping)."""
        return Groups(tuple(range(n)), tuple(str(i) for i in range(n)), "none")

    @property
    def n_images(self) -> int:
        """Images grouped."""
        return len(self.labels)

    @property
    def n_groups(self) -> int:
        """Groups (G)."""
        return len(self.names)

    @property
    def trivial(self) -> bool:
        """True when every image is its own group (then splits and intervals are exactly the ungrouped ones)."""
        return self.n_groups == self.n_images

    def sizes(self) -> tuple[int, ...]:
        """Images in each group, by group number."""
        counts = Counter(self.labels)
        return tuple(counts[g] for g in range(self.n_groups))

    def label_tensor(self) -> Tensor:
        """The labels as a (N,) int64 tensor."""
        return torch.tensor(self.labels, dtype=torch.long)

    def as_dict(self) -> dict:
        """The provenance form: source, detail, images, groups, and group sizes (min, median, max, a histogram)."""
        sizes = sorted(self.sizes())
        return {
            "source": self.source, "detail": self.detail, "n_images": self.n_images, "n_groups": self.n_groups,
            "sizes": {"min": sizes[0] if sizes else 0, "median": sizes[len(sizes) // 2] if sizes else 0,
                      "max": sizes[-1] if sizes else 0,
                      "histogram": {str(s): c for s, c in sorted(Counter(sizes).items())}},
            "unmatched": self.unmatched,
        }

    def describe(self) -> str:
        """One line for people, e.g. ``'32 images in 8 groups (4 each), from the folder layout'``."""
        if self.source == "none":
            return f"{self.n_images} images, each its own group"
        sizes = self.sizes()
        lo, hi = min(sizes), max(sizes)
        each = f"{lo} each" if lo == hi else f"{lo}–{hi} each"
        where = {"folder": "the folder layout", "csv": f"the CSV {self.detail}", "pattern": f"the pattern {self.detail!r}",
                 "given": "labels given"}[self.source]
        extra = f"; {self.unmatched} name(s) did not match, each its own group" if self.unmatched else ""
        groups = "1 group" if self.n_groups == 1 else f"{self.n_groups} groups"
        return f"{self.n_images} images in {groups} ({each}), from {where}{extra}"


def as_groups(groups: Groups | Sequence[Hashable] | None, n: int, what: str = "groups") -> Groups | None:
    """``groups`` checked against ``n`` images: a :class:`Groups`, one key per image, or ``None`` (no grouping).

    Raises:
        TypeError: not a :class:`Groups`, a sequence or ``None``.
        ValueError: not one label per image.
    """
    if groups is None:
        return None
    if not isinstance(groups, Groups):
        if isinstance(groups, (str, bytes)) or not isinstance(groups, (Sequence, Tensor)):
            raise TypeError(f"{what} must be a kcore.groups.Groups, one group key per image, or None; got "
                            f"{type(groups).__name__}. Fix: pass Groups.from_keys(keys) or a list of N keys.")
        keys = groups.tolist() if isinstance(groups, Tensor) else list(groups)
        groups = Groups.from_keys(keys)
    if groups.n_images != n:
        raise ValueError(f"{what} must give one group per image: expected {n} labels, got {groups.n_images}. "
                         "Fix: build the groups from the same image set, in the same order.")
    return groups


# ---------------------------------------------------------------------------------------------- sources
def folder_groups(ids: Sequence[str]) -> Groups:
    """Groups from the folder layout: each image's parent folder below the data root (see the module docstring).

    Args:
        ids: the images' paths relative to the data root (an :class:`kcore.data.ImageSet`'s ``ids``).

    Raises:
        ValueError: no image lies in a subfolder (nothing to group by).
    """
    parents = [PurePosixPath(i).parent.as_posix() for i in ids]
    if not any(p != "." for p in parents):
        shown = ", ".join(repr(i) for i in list(ids)[:3])
        raise ValueError(f"--groups folder needs images in subfolders (group/image.png); got {len(ids)} images "
                         f"directly in the folder (e.g. {shown}). Fix: put each group's images in a subfolder, or "
                         "give --groups FILE.csv with the columns image,group.")
    keys = [i if p == "." else p for i, p in zip(ids, parents)]
    return Groups.from_keys(keys, "folder")


def csv_groups(source: str | os.PathLike | bytes, ids: Sequence[str], *, ignore: Sequence[str] = (),
               partial: bool = False) -> Groups:
    """Groups from a CSV with the columns ``image,group`` (a header row; ``image`` relative to the data root).

    Args:
        source: the CSV file's path, or its bytes (an upload).
        ids: the images' paths relative to the data root (the image set's ``ids``), in order.
        ignore: names that may be listed without being in ``ids`` (e.g. files the image set skipped).
        partial: allow listed images that are not in ``ids`` (a subset was loaded, e.g. ``--n-images``).

    Returns:
        The :class:`Groups` of ``ids``, in their order.

    Raises:
        ValueError: over the size caps (:mod:`kcore.limits`: at most ``max_images`` rows and
            ``CSV_BYTES_PER_IMAGE`` bytes per allowed image), no ``image``/``group`` header, an empty or repeated
            image, an image of ``ids`` not listed (the first few named), or a listed image that is not in ``ids``.
    """
    from kcore.safe_files import read_nofollow

    lim = current_limits()
    max_bytes = lim.max_images * CSV_BYTES_PER_IMAGE
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "the groups CSV"
        lim.check("max_images", len(data) / CSV_BYTES_PER_IMAGE, shown=f"{len(data):,} bytes",
                  what=f"{name} (at most {CSV_BYTES_PER_IMAGE} bytes per image)", fix="give a smaller CSV")
    else:
        name = f"groups CSV {os.fspath(source)!r}"
        try:
            data = read_nofollow(source, max_bytes=max_bytes, what="groups CSV")
        except FileNotFoundError:
            raise ValueError(f"--groups: {name} does not exist. Fix: give 'folder' or the path of a CSV with the "
                             "columns image,group.") from None
        except ValueError as exc:  # too large or not a regular file (UnsafePathError)
            raise ValueError(f"--groups: {exc} (at most {max_bytes:,} bytes: {CSV_BYTES_PER_IMAGE} per image of "
                             f"KCORE_MAX_IMAGES={lim.max_images:,}).") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start}). Fix: save it as UTF-8.") from None
    rows = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(rows, [])]
    if "image" not in header or "group" not in header:
        raise ValueError(f"{name} must start with a header row naming the columns image and group; got "
                         f"{header[:4]!r}. Fix: make the first line 'image,group'.")
    ci, cg = header.index("image"), header.index("group")
    listed: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        lim.check("max_images", len(listed) + 1, shown=f"at least {len(listed) + 1:,}",
                  what=f"{name}: the number of rows", fix="list only the images of the data folder")
        if len(row) <= max(ci, cg) or not row[ci].strip() or not row[cg].strip():
            raise ValueError(f"{name} line {line}: expected an image and a group; got {row[:4]!r}. Fix: give "
                             "both columns on every line.")
        image = PurePosixPath(row[ci].strip().replace("\\", "/")).as_posix()
        if image in listed:
            raise ValueError(f"{name} line {line}: image {image!r} is listed twice. Fix: list each image once.")
        listed[image] = row[cg].strip()
    missing = [i for i in ids if i not in listed]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise ValueError(f"{name} must list every image; {len(missing)} of {len(ids)} are missing, e.g. {shown}. "
                         "Fix: add a row 'image,group' for each (image = its path relative to the data folder).")
    known = set(ids) | set(ignore)
    unknown = [i for i in listed if i not in known]
    if unknown and not partial:
        shown = ", ".join(repr(u) for u in unknown[:5])
        raise ValueError(f"{name} lists {len(unknown)} image(s) that are not in the image set, e.g. {shown}. "
                         "Fix: give paths relative to the data folder (as 'group/image.png'), or remove those rows.")
    detail = "upload" if isinstance(source, (bytes, bytearray)) else os.path.abspath(os.fspath(source))
    return Groups.from_keys([listed[i] for i in ids], "csv", detail)


_PATTERN_WORKER = r"""
import json, re, sys
req = json.loads(sys.stdin.read())
try:
    rx = re.compile(req["pattern"])
except re.error as exc:
    print(json.dumps({"error": "does not compile: " + str(exc)})); sys.exit(0)
if rx.groups != 1:
    print(json.dumps({"error": "has %d capturing groups; exactly 1 is needed" % rx.groups})); sys.exit(0)
out = []
for name in req["names"]:
    m = rx.search(name)
    out.append(m.group(1) if m and m.group(1) else None)
print(json.dumps({"keys": out}))
"""


def pattern_groups(pattern: str, ids: Sequence[str], *, timeout: float = PATTERN_TIMEOUT_S) -> Groups:
    """Groups from a regular expression with one capturing group applied to each image's file name.

    Images whose names give the same captured text form a group; a name the pattern does not match (or where the
    group captures nothing) is its own group. The pattern is compiled and applied in a separate Python process
    that is killed after ``timeout`` seconds, so a pattern with catastrophic backtracking cannot stall the caller.

    Args:
        pattern: e.g. ``r"^(.*)_crop\\d+"``; at most :data:`MAX_PATTERN_CHARS` characters.
        ids: the images' ids; the pattern sees the last path component (the file name) of each.
        timeout: seconds allowed for compiling and matching every name.

    Raises:
        TypeError: ``pattern`` is not a string.
        ValueError: too long, does not compile, not exactly one capturing group, a file name over
            :data:`MAX_NAME_CHARS` characters, no name matched, or the time limit was reached.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string (a regular expression); got {type(pattern).__name__}.")
    if not pattern or len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"pattern must have 1 to {MAX_PATTERN_CHARS} characters; got {len(pattern)}. "
                         r"Fix: a short pattern with one group, e.g. ^(.*)_crop\d+")
    names = [PurePosixPath(str(i)).name for i in ids]
    long = [n for n in names if len(n) > MAX_NAME_CHARS]
    if long:
        raise ValueError(f"pattern grouping applies to file names of at most {MAX_NAME_CHARS} characters; "
                         f"{len(long)} are longer (e.g. {long[0][:40]!r}…). Fix: rename those files, or group by "
                         "subfolder.")
    request = json.dumps({"pattern": pattern, "names": names})
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _PATTERN_WORKER], input=request, text=True,
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError(f"pattern {pattern!r} took more than {timeout:g} s on {len(names)} file names (catastrophic "
                         "backtracking?). Fix: a simpler pattern without nested repeats such as (a+)+, e.g. "
                         r"^(.*)_crop\d+") from None
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise ValueError(f"pattern {pattern!r} could not be applied (the matching process ended with "
                         f"{done.returncode}: {done.stderr.strip()[-200:]}). Fix: a simpler pattern.") from None
    if "error" in reply:
        raise ValueError(f"pattern {pattern!r} {reply['error']}. Fix: one group in parentheses marks the part of "
                         r"the name shared by a group, e.g. ^(.*)_crop\d+ (use (?:…) for other parentheses).")
    keys = reply["keys"]
    unmatched = sum(k is None for k in keys)
    if unmatched == len(keys):
        shown = ", ".join(repr(n) for n in names[:3])
        raise ValueError(f"pattern {pattern!r} matches none of the {len(names)} file names (e.g. {shown}). "
                         r"Fix: a pattern that matches them, e.g. ^(.*)_crop\d+ for cat_crop1.png.")
    grouped = [("g", k) if k is not None else ("own", str(i)) for i, k in zip(ids, keys)]
    first = Groups.from_keys(grouped, "pattern", pattern, unmatched)
    names_out = tuple(k[1] for k in dict.fromkeys(grouped))
    return Groups(first.labels, names_out, "pattern", pattern, unmatched)


def groups_option(option: str | os.PathLike | None, ids: Sequence[str], *, ignore: Sequence[str] = (),
                  partial: bool = False) -> Groups | None:
    """The groups a ``--groups`` option names: ``None``/``"none"``, ``"folder"``, or a CSV file's path.

    Raises:
        ValueError: see :func:`folder_groups` and :func:`csv_groups`.
    """
    if option is None or option == "none":
        return None
    if option == "folder":
        return folder_groups(ids)
    return csv_groups(option, ids, ignore=ignore, partial=partial)


# ---------------------------------------------------------------------------------------------- the split
def _closest(order: Sequence[int], sizes: Sequence[int], target: int) -> list[int]:
    """Groups taken, in ``order``, whenever one brings the total closer to ``target`` images."""
    taken, total = [], 0
    for g in order:
        if abs(total + sizes[g] - target) < abs(total - target):
            taken.append(g)
            total += sizes[g]
    return taken


def group_split(groups: Groups, val_fraction: float, monitor_fraction: float, seed: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded (train, monitor, held-out) image indices that keep every group whole.

    The groups are put in a seeded random order; walking that order, a group goes to the held-out images
    whenever it brings their count closer to ``round(N · val_fraction)`` (at least one group is held out: the
    first smallest when none is taken), then likewise to the monitor images (``round(N_train ·
    monitor_fraction)``, none below 10 training images). Every image is in exactly one part.

    Args:
        groups: one group per image.
        val_fraction, monitor_fraction, seed: as :func:`kcore.fit.split_indices`.

    Returns:
        ``(train, monitor, held_out)`` sorted int64 index tensors.

    Raises:
        ValueError: fewer than 2 groups, or fewer than 2 training images left after holding out one group.
    """
    n, g = groups.n_images, groups.n_groups
    sizes = groups.sizes()
    fix = ("Fix: use more groups (several dozen for a meaningful held-out estimate), or finer groups "
           "(e.g. --groups FILE.csv), or no grouping.")
    if g < 2:
        raise ValueError(f"too few groups for a held-out set: {n} images in {g} group(s); the held-out images must "
                         f"come from other groups than the training images, so at least 2 are needed. {fix}")
    order = torch.randperm(g, generator=torch.Generator().manual_seed(seed)).tolist()
    held = _closest(order, sizes, max(1, int(round(n * val_fraction))))
    if not held:
        held = [min(order, key=lambda k: sizes[k])]
    rest = [k for k in order if k not in set(held)]
    n_train = n - sum(sizes[k] for k in held)
    if n_train < 2:
        raise ValueError(f"too few groups for a held-out set: holding out the group(s) {[groups.names[k] for k in held][:3]} "
                         f"({n - n_train} of {n} images) leaves {n_train} for training; at least 2 are needed. {fix}")
    monitor = _closest(rest, sizes, int(round(n_train * monitor_fraction))) if n_train >= 10 else []
    if n_train - sum(sizes[k] for k in monitor) < 2:
        monitor = []
    lab = groups.label_tensor()

    def members(parts: list[int]) -> Tensor:
        mask = torch.zeros(g, dtype=torch.bool)
        mask[torch.tensor(parts, dtype=torch.long)] = True
        return torch.nonzero(mask[lab]).flatten()

    held_set, mon_set = set(held), set(monitor)
    train = [k for k in range(g) if k not in held_set and k not in mon_set]
    return members(train), members(monitor), members(held)


def split_summary(groups: Groups | None, split: tuple[Sequence[int], Sequence[int], Sequence[int]], n: int) -> dict:
    """Images and groups in each part of a split, for provenance: ``{"train": {"images", "groups"}, …}``."""
    labels = groups.labels if groups is not None else tuple(range(n))
    out = {}
    for name, idx in zip(("train", "monitor", "heldout"), split):
        idx = [int(i) for i in idx]
        out[name] = {"images": len(idx), "groups": len({labels[i] for i in idx})}
    return out


def groups_provenance(groups: Groups | None, n: int, split: tuple[Sequence[int], Sequence[int], Sequence[int]]
                      ) -> dict:
    """What a run records about its grouping: :meth:`Groups.as_dict` (every image its own group without one) and
    the images and groups of each part of the split (:func:`split_summary`)."""
    grouping = groups if groups is not None else Groups.singletons(n)
    return {**grouping.as_dict(), "split": split_summary(groups, split, n)}
