"""Groups wherever they matter beyond the split: the shuffled pairing never pairs an image with its own group,
metrics.csv and the Overview say the intervals resampled groups, and a CSV grouping reproduces from any folder."""
from __future__ import annotations

import itertools
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import loaded, open_run_folder, tiny_net
from kcore.baselines import BaselineUnavailable, derangement
from kcore.groups import Groups

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SAMPLES = ROOT / "sample_models"
WEAK, STRONG = SAMPLES / "kshapes_tinynet_s0.safetensors", SAMPLES / "kshapes_resnet_s0.safetensors"


def _ungrouped_reference(n: int, seed: int) -> torch.Tensor:
    """The derangement as it was before groups: a random shift (1 … n−1) of a random order."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    shift = int(torch.randint(1, n, (1,), generator=g))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-shift)
    return perm


def _check_pairing(perm: torch.Tensor, labels: list[int]) -> None:
    n = len(labels)
    assert sorted(perm.tolist()) == list(range(n)), "a permutation"
    lab = torch.tensor(labels)
    assert not (lab[perm] == lab).any(), "an image paired within its group"


# ------------------------------------------------------------------------------------------------ the pairing
@pytest.mark.parametrize("n", [2, 3, 5, 17, 100])
def test_without_groups_the_pairing_is_exactly_the_ungrouped_one(n):
    for seed in range(10):
        want = _ungrouped_reference(n, seed)
        assert torch.equal(derangement(n, seed), want)
        assert torch.equal(derangement(n, seed, Groups.singletons(n)), want)
        assert torch.equal(derangement(n, seed, [f"photo{i}" for i in range(n)]), want)  # distinct keys: singletons


def test_random_layouts_never_pair_within_a_group_and_refuse_exactly_when_impossible():
    rng = np.random.default_rng(0)
    feasible = refused = 0
    for trial in range(300):
        n = int(rng.integers(2, 61))
        n_groups = int(rng.integers(1, n + 1))
        labels = rng.integers(0, n_groups, n)
        if trial % 3 == 0:  # bias some layouts towards one big group, near the limit
            labels[rng.random(n) < 0.45] = n_groups
        labels = rng.permutation(labels).tolist()  # a group's images scattered through the set
        biggest = max(np.bincount(labels))
        seed = int(rng.integers(0, 2**31))
        if 2 * biggest <= n:
            perm = derangement(n, seed, labels)
            _check_pairing(perm, labels)
            assert torch.equal(perm, derangement(n, seed, labels)), "seeded"
            feasible += 1
        else:
            with pytest.raises(BaselineUnavailable, match=f"holds {biggest} \\(at most {n // 2} allowed\\)"):
                derangement(n, seed, labels)
            refused += 1
    assert feasible > 100 and refused > 20  # both sides of the condition were tried


def _partitions(n: int, most: int | None = None):
    """Every way to write n as a sum of group sizes, largest first."""
    most = n if most is None else most
    if n == 0:
        yield ()
        return
    for first in range(min(n, most), 0, -1):
        for rest in _partitions(n - first, first):
            yield (first, *rest)


def test_the_condition_is_exact_against_brute_force():
    """A cross-group pairing exists exactly when no group holds more than half the images (all layouts ≤ 7)."""
    for n in range(2, 8):
        for sizes in _partitions(n):
            labels = [g for g, s in enumerate(sizes) for _ in range(s)]
            exists = any(all(labels[p[i]] != labels[i] for i in range(n)) for p in itertools.permutations(range(n)))
            assert exists == (2 * max(sizes) <= n), sizes
            if exists:
                for seed in range(5):
                    _check_pairing(derangement(n, seed, labels), labels)
            else:
                with pytest.raises(BaselineUnavailable):
                    derangement(n, 0, labels)


def test_exactly_half_works_and_one_more_is_refused_with_the_fix():
    labels = ["big"] * 3 + ["a", "b", "c"]
    for seed in range(20):
        perm = derangement(6, seed, labels)
        _check_pairing(perm, [0, 0, 0, 1, 2, 3])
        assert {int(perm[i]) for i in range(3)} == {3, 4, 5}  # the big group's partners are everyone else
    with pytest.raises(ValueError, match="group 'big' holds 3 \\(at most 2 allowed\\).*Fix: add images from other"):
        derangement(5, 0, ["big"] * 3 + ["a", "b"])
    with pytest.raises(ValueError, match="one group per image: expected 6 labels, got 2"):
        derangement(6, 0, ["a", "b"])
    with pytest.raises(ValueError, match="at least 2 images; got 1"):
        derangement(1, 0, ["a"])


def test_partners_vary_with_the_seed():
    labels = [i // 4 for i in range(48)]  # 12 groups of 4
    perms = [derangement(48, s, labels) for s in range(40)]
    assert len({tuple(p.tolist()) for p in perms}) == 40
    partner_groups = {labels[int(p[0])] for p in perms}
    assert len(partner_groups) >= 6 and 0 not in partner_groups


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def grouped_run(random_images, tmp_path_factory):
    """(runs folder, the run folder, the comparison, the perms the shuffled baseline drew) of a grouped fit."""
    import kcore.baselines as bl
    from kcore.pipeline import compare, write_run

    drawn: list[tuple[int, object, torch.Tensor]] = []

    def spy(n, seed=0, groups=None):
        perm = derangement(n, seed, groups)
        drawn.append((n, groups, perm))
        return perm

    images = random_images(48, 12)
    images.groups = Groups.from_keys([f"photo{i // 4}" for i in range(48)], "folder")  # 12 groups of 4
    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1), "b.pt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bl, "derangement", spy)
        comp = compare(a, "2", b, "2", images, orders=1, epochs=1, device="cpu", baselines=["shuffled"])
    runs = tmp_path_factory.mktemp("runs")
    return runs, write_run(comp, runs / "grouped"), comp, drawn


def test_compare_pairs_the_shuffled_baseline_across_groups(grouped_run):
    _, _, comp, drawn = grouped_run
    assert "shuffled" in comp.baselines and len(drawn) == 1
    n, groups, perm = drawn[0]
    assert n == 48 and isinstance(groups, Groups) and groups.n_groups == 12
    _check_pairing(perm, [i // 4 for i in range(48)])


def test_compare_skips_the_shuffled_baseline_when_one_group_holds_most_images(random_images):
    from kcore.pipeline import compare

    images = random_images(40, 12)
    images.groups = Groups.from_keys(["big" if i < 21 else f"own{i}" for i in range(40)])
    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1), "b.pt")
    comp = compare(a, "2", b, "2", images, orders=1, epochs=1, device="cpu", baselines=["shuffled"])
    assert "shuffled" not in comp.baselines and comp.directions["A_to_B"].fit.heldout_report is not None
    assert "group 'big' holds 21 (at most 20 allowed)" in comp.provenance["baselines_skipped"]["shuffled"]


# ------------------------------------------------------------------------------------------------ exports, Overview
def test_metrics_csv_has_the_held_out_groups(grouped_run, random_images, tmp_path):
    from kcore import export
    from kcore.pipeline import compare, read_run

    _, folder, comp, _ = grouped_run
    export.write_metrics(read_run(folder), tmp_path / "grouped")
    row = pd.read_csv(tmp_path / "grouped" / "metrics.csv").iloc[0]
    held = {i // 4 for i in comp.directions["A_to_B"].fit.heldout_indices}
    assert row["n_groups"] == len(held) >= 2 and row["n_heldout"] == 4 * len(held)
    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1), "b.pt")
    plain = compare(a, "2", b, "2", random_images(24, 12), orders=1, epochs=1, device="cpu")
    export.write_metrics(plain, tmp_path / "plain")
    assert pd.isna(pd.read_csv(tmp_path / "plain" / "metrics.csv").loc[0, "n_groups"])  # images resampled


@pytest.mark.slow
def test_the_overview_says_the_intervals_resampled_groups(grouped_run, monkeypatch):
    from streamlit.testing.v1 import AppTest

    runs, folder, comp, _ = grouped_run
    g = comp.directions["A_to_B"].fit.heldout_report.ci.n_groups
    monkeypatch.setenv("KCORE_RUNS_DIR", str(runs))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    open_run_folder(at, folder, "overview")
    assert not at.exception, [e.value for e in at.exception]
    help_text = {m.label: m for m in at.metric}["Instability Var(x^Δ)/Var(x*)"].proto.help
    assert f"over the {4 * g} held-out images, resampled by group ({g} groups) (no refit)" in help_text


# ------------------------------------------------------------------------------------------------ reproduce
def test_a_legacy_csv_name_still_gets_its_note():
    from kcore.reproduce import _groups

    flags, code, notes = _groups({"source": "csv", "detail": "groups.csv"})
    assert flags == ["--groups", "./groups.csv"] and "its folder is not recorded" in notes[0]
    flags, code, notes = _groups({"source": "csv", "detail": "/data/my groups.csv"})
    assert flags == ["--groups", "/data/my groups.csv"] and not notes
    assert "groups.csv_groups('/data/my groups.csv', images.ids)" in code


@pytest.mark.skipif(not STRONG.is_file(), reason="sample models not built")
def test_a_csv_grouping_given_relative_reproduces_from_another_folder(tmp_path, monkeypatch):
    from PIL import Image

    from kcore.cli import main
    from kcore.reproduce import reproduce

    work, elsewhere = tmp_path / "work dir", tmp_path / "elsewhere"
    data = work / "photos"
    rng = np.random.default_rng(0)
    data.mkdir(parents=True)
    rows = ["image,group"]
    for photo in range(8):  # 8 photos, 3 near-identical crops each, in one folder: only the CSV groups them
        base = rng.integers(0, 256, (32, 32, 3))
        for k in range(3 * photo, 3 * photo + 3):
            Image.fromarray(np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)).save(
                data / f"img{k:02d}.png")
            rows.append(f"img{k:02d}.png,photo{photo}")
    (work / "crops.csv").write_text("\n".join(rows) + "\n")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    assert main(["fit", "--a", str(WEAK), "--b", str(STRONG), "--data", "photos", "--groups", "crops.csv",
                 "--epochs", "1", "--orders", "1", "--out", str(tmp_path / "run")]) == 0
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert prov["groups"]["detail"] == str(work / "crops.csv") and prov["groups"]["n_groups"] == 8
    r = reproduce(prov, out=tmp_path / "again")
    argv = shlex.split(r.cli)
    assert argv[argv.index("--groups") + 1] == str(work / "crops.csv") and r.exact, r.notes
    monkeypatch.chdir(elsewhere)
    assert main(argv[1:]) == 0
    again = json.loads((tmp_path / "again" / "provenance.json").read_text())["groups"]
    assert again == prov["groups"]  # the same groups, the same split
    want = json.loads((tmp_path / "run" / "metrics.json").read_text())["directions"]["A_to_B"]
    got = json.loads((tmp_path / "again" / "metrics.json").read_text())["directions"]["A_to_B"]
    assert got["instability"] == pytest.approx(want["instability"], rel=1e-5)
