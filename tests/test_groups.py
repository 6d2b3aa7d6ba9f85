"""Groups of correlated images: group-aware splits, the cluster bootstrap, where groups come from, and provenance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kcore.fit import fit, split_indices
from kcore.groups import (
    MAX_PATTERN_CHARS,
    Groups,
    csv_groups,
    folder_groups,
    group_split,
    groups_provenance,
    pattern_groups,
)
from kcore.metrics import ImageMoments
from kcore.metrics.variance import resample_weights

ROOT = Path(__file__).resolve().parents[1]
STRONG = ROOT / "sample_models" / "kshapes_resnet_s0.safetensors"
WEAK = ROOT / "sample_models" / "kshapes_tinynet_s0.safetensors"


# ------------------------------------------------------------------------------------------------ the split
def test_a_group_split_never_splits_a_group_and_covers_every_image_once():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(300):
        g = int(rng.integers(2, 40))
        sizes = rng.integers(1, int(rng.choice([2, 5, 20])), size=g)
        keys = np.repeat(rng.permutation(g), sizes)  # groups in any order of labels
        rng.shuffle(keys)  # and their images interleaved
        groups = Groups.from_keys(keys.tolist())
        n = len(keys)
        val, mon = float(rng.uniform(0.05, 0.5)), float(rng.uniform(0.0, 0.4))
        try:
            parts = split_indices(n, val, mon, int(rng.integers(0, 10**6)), groups)
        except ValueError as exc:  # only when one group holds nearly every image (or 2 ungrouped images)
            assert "too few" in str(exc) and "held-out" in str(exc) and "Fix:" in str(exc)
            continue
        checked += 1
        everything = torch.cat(parts).sort().values
        assert torch.equal(everything, torch.arange(n)), "every image exactly once"
        labels = torch.tensor(groups.labels)
        owner = {}
        for name, idx in zip(("train", "monitor", "held"), parts):
            for lab in labels[idx].tolist():
                assert owner.setdefault(lab, name) == name, f"group {lab} split (trial {trial})"
        train, monitor, held = parts
        assert len(held) >= 1 and len(train) >= 2
        assert abs(len(held) - max(1, round(n * val))) <= max(sizes), "the held-out count as close as sizes allow"
    assert checked > 250


def test_every_image_its_own_group_gives_exactly_the_ungrouped_split():
    for n, seed in ((12, 0), (57, 3), (400, 11)):
        plain = split_indices(n, 0.2, 0.1, seed)
        for groups in (Groups.singletons(n), list(range(n)), [f"img{i}" for i in range(n)]):
            same = split_indices(n, 0.2, 0.1, seed, groups)
            assert all(torch.equal(a, b) for a, b in zip(plain, same))


def test_too_few_groups_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"too few groups for a held-out set: 10 images in 1 group.*Fix:"):
        split_indices(10, 0.2, 0.1, 0, ["a"] * 10)
    with pytest.raises(ValueError, match=r"leaves 1 for training"):
        group_split(Groups.from_keys(["a"] * 9 + ["b"]), 0.9, 0.0, 0)
    with pytest.raises(ValueError, match=r"one group per image: expected 10 labels, got 3"):
        split_indices(10, 0.2, 0.1, 0, [0, 1, 2])


# ------------------------------------------------------------------------------------------------ bootstrap
def _planted(n_groups: int, size: int, seed: int, hw: int = 3, channels: int = 2):
    """Groups of near-identical images: each group's residual x^Δ is one random map scaled by one random strength
    √v_g (v_g ~ U(0, 1)) plus tiny noise; x* is white noise of variance 1, so the true instability is E[v] = 0.5."""
    gen = torch.Generator().manual_seed(seed)
    n = n_groups * size
    t = torch.randn(n, channels, hw, hw, generator=gen, dtype=torch.float64)
    strength = torch.rand(n_groups, generator=gen, dtype=torch.float64).sqrt()
    shared = torch.randn(n_groups, channels, hw, hw, generator=gen, dtype=torch.float64)
    r = (strength[:, None, None, None] * shared).repeat_interleave(size, 0)
    r = r + 1e-3 * torch.randn(n, channels, hw, hw, generator=gen, dtype=torch.float64)
    labels = torch.arange(n_groups).repeat_interleave(size)
    return [t - r], r, t, labels


def _moments(comps, r, t, groups=None, batch: int = 7) -> ImageMoments:
    mom = ImageMoments(len(comps) - 1, t.shape[1])
    for i in range(0, t.shape[0], batch):
        mom.update([c[i : i + batch] for c in comps], r[i : i + batch], t[i : i + batch],
                   None if groups is None else groups[i : i + batch])
    return mom


def test_the_cluster_bootstrap_is_wider_and_covers_the_true_instability_better():
    covered = {"images": 0, "groups": 0}
    width = {"images": 0.0, "groups": 0.0}
    repeats = 40
    for rep in range(repeats):
        comps, r, t, labels = _planted(n_groups=12, size=16, seed=1000 + rep)
        naive = _moments(comps, r, t).bootstrap(n_boot=300, seed=rep)
        cluster = _moments(comps, r, t, labels).bootstrap(n_boot=300, seed=rep)
        assert naive.n_groups is None and cluster.n_groups == 12 and cluster.n_heldout == 192
        for name, ci in (("images", naive), ("groups", cluster)):
            lo, hi = ci.instability
            covered[name] += lo <= 0.5 <= hi
            width[name] += (hi - lo) / repeats
    assert width["groups"] > 2.5 * width["images"]
    assert covered["groups"] / repeats >= 0.75 and covered["images"] / repeats <= 0.6
    assert covered["groups"] >= covered["images"] + 0.3 * repeats


def test_every_image_its_own_group_gives_exactly_todays_intervals():
    comps, r, t, _ = _planted(n_groups=5, size=6, seed=3)
    n = t.shape[0]
    plain = _moments(comps, r, t).bootstrap(n_boot=200, seed=4)
    for labels in (torch.arange(n), torch.randperm(n, generator=torch.Generator().manual_seed(1)) * 7):
        assert _moments(comps, r, t, labels).bootstrap(n_boot=200, seed=4) == plain
        assert _moments(comps, r, t).bootstrap(n_boot=200, seed=4, groups=labels) == plain
    assert torch.equal(resample_weights(n, 50, 2, torch.arange(n)), resample_weights(n, 50, 2))


def test_the_cluster_bootstrap_equals_resampling_the_groups_by_hand():
    comps, r, t, labels = _planted(n_groups=6, size=3, seed=5)
    labels = labels * 10 + 3  # any label values
    ci = _moments(comps, r, t, labels).bootstrap(n_boot=40, seed=9)
    uniq = torch.unique(labels)
    draws = torch.randint(len(uniq), (40, len(uniq)), generator=torch.Generator().manual_seed(9))
    inst, share0 = [], []
    for row in draws:  # each resample: the drawn groups' images stacked, the statistics computed directly
        pick = torch.cat([torch.nonzero(labels == uniq[g]).flatten() for g in row])
        rr, tt, cc = r[pick], t[pick], comps[0][pick]
        var_t = tt.var(unbiased=False)
        inst.append(rr.var(unbiased=False) / var_t)
        share0.append(((cc - cc.mean()) * (tt - tt.mean())).mean() / var_t)
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    for got, values in ((ci.instability, inst), (ci.share_orders[0], share0)):
        want = torch.quantile(torch.stack(values), q)
        assert torch.allclose(torch.tensor(got, dtype=torch.float64), want, rtol=1e-9, atol=1e-12)


def test_groups_must_come_with_every_batch_or_none():
    comps, r, t, labels = _planted(n_groups=2, size=4, seed=0)
    mom = ImageMoments(0, t.shape[1])
    mom.update([comps[0][:4]], r[:4], t[:4], labels[:4])
    with pytest.raises(ValueError, match="every batch or for none"):
        mom.update([comps[0][4:]], r[4:], t[4:])
    with pytest.raises(ValueError, match="one label per image of the batch: expected 4, got 2"):
        mom.update([comps[0][4:]], r[4:], t[4:], labels[:2])


def test_a_grouped_fit_keeps_groups_whole_and_resamples_them():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, 5, 5, generator=gen)
    y = 0.7 * x[:, :2] + 0.2 * torch.randn(60, 2, 5, 5, generator=gen)
    keys = [i // 3 for i in range(60)]
    res = fit(x, y, orders=1, epochs=2, device="cpu", groups=keys)
    held = {keys[i] for i in res.heldout_indices}
    assert held.isdisjoint({keys[i] for i in res.train_indices + res.monitor_indices})
    assert res.heldout_report.ci.n_groups == len(held) and len(res.heldout_indices) == 3 * len(held)
    plain = fit(x, y, orders=1, epochs=2, device="cpu")
    own = fit(x, y, orders=1, epochs=2, device="cpu", groups=Groups.singletons(60))
    assert own.heldout_indices == plain.heldout_indices and own.heldout_report.ci == plain.heldout_report.ci
    prov = groups_provenance(Groups.from_keys(keys, "folder"), 60,
                             (res.train_indices, res.monitor_indices, res.heldout_indices))
    assert prov["n_groups"] == 20 and prov["sizes"]["histogram"] == {"3": 20}
    assert prov["split"]["heldout"] == {"images": len(res.heldout_indices), "groups": len(held)}
    assert sum(p["images"] for p in prov["split"].values()) == 60


# ------------------------------------------------------------------------------------------------ sources
def test_folder_groups_are_each_images_parent_folder():
    g = folder_groups(["a/1.png", "a/2.png", "b/1.png", "cat/x/1.png", "cat/x/2.png", "dog/x/1.png", "top.png"])
    assert g.labels == (0, 0, 1, 2, 2, 3, 4) and g.names == ("a", "b", "cat/x", "dog/x", "top.png")
    assert g.source == "folder" and g.sizes() == (2, 1, 2, 1, 1)
    with pytest.raises(ValueError, match=r"needs images in subfolders.*got 2 images directly.*Fix:"):
        folder_groups(["1.png", "2.png"])


def test_csv_groups_and_their_errors(tmp_path, monkeypatch):
    ids = ["a/1.png", "a/2.png", "b/3.png"]
    path = tmp_path / "groups.csv"
    path.write_text("image,group\na/1.png,x\n./a/2.png,x\nb/3.png,y\n")
    g = csv_groups(path, ids)
    assert g.labels == (0, 0, 1) and g.names == ("x", "y") and g.detail == str(path)
    assert csv_groups(b"group,image\nq,a/1.png\nq,a/2.png\nq,b/3.png\n", ids).n_groups == 1
    with pytest.raises(ValueError, match=r"must list every image; 1 of 3 are missing, e.g. 'b/3.png'.*Fix:"):
        csv_groups(b"image,group\na/1.png,x\na/2.png,x\n", ids)
    with pytest.raises(ValueError, match=r"lists 1 image\(s\) that are not in the image set, e.g. 'c/9.png'"):
        csv_groups(b"image,group\na/1.png,x\na/2.png,x\nb/3.png,y\nc/9.png,z\n", ids)
    assert csv_groups(b"image,group\na/1.png,x\na/2.png,x\nb/3.png,y\nc/9.png,z\n", ids, partial=True).n_groups == 2
    assert csv_groups(b"image,group\na/1.png,x\na/2.png,x\nb/3.png,y\nc/9.png,z\n", ids, ignore=["c/9.png"]).n_groups == 2
    with pytest.raises(ValueError, match=r"header row naming the columns image and group; got \['file', 'g'\]"):
        csv_groups(b"file,g\na/1.png,x\n", ids)
    with pytest.raises(ValueError, match=r"line 3: image 'a/1.png' is listed twice"):
        csv_groups(b"image,group\na/1.png,x\na/1.png,y\n", ids)
    with pytest.raises(ValueError, match=r"line 2: expected an image and a group"):
        csv_groups(b"image,group\na/1.png\n", ids)
    with pytest.raises(ValueError, match=r"does not exist"):
        csv_groups(tmp_path / "none.csv", ids)
    monkeypatch.setenv("KCORE_MAX_IMAGES", "2")  # rows and bytes are capped by the server's image cap
    with pytest.raises(ValueError, match=r"the number of rows is at least 3; this server allows at most 2"):
        csv_groups(path, ids[:2])
    path.write_text("image,group\n" + "".join(f"i{k}.png,g\n" for k in range(400)))
    with pytest.raises(ValueError, match=r"--groups: .*at most 2,048 bytes"):
        csv_groups(path, ids[:2])


def test_pattern_groups_by_file_name():
    ids = ["p/cat_crop1.png", "p/cat_crop2.png", "q/dog_crop1.png", "q/dog_crop7.png", "q/lone.png"]
    g = pattern_groups(r"^(.*)_crop\d+", ids)
    assert g.labels == (0, 0, 1, 1, 2) and g.names == ("cat", "dog", "q/lone.png")
    assert g.unmatched == 1 and g.source == "pattern" and "1 name(s) did not match, each its own group" in g.describe()
    with pytest.raises(ValueError, match=r"has 2 capturing groups; exactly 1 is needed"):
        pattern_groups(r"^(.*)_(crop)", ids)
    with pytest.raises(ValueError, match=r"does not compile"):
        pattern_groups(r"^(.*", ids)
    with pytest.raises(ValueError, match=r"matches none of the 5 file names"):
        pattern_groups(r"^(zzz)", ids)
    with pytest.raises(ValueError, match=rf"1 to {MAX_PATTERN_CHARS} characters"):
        pattern_groups("(a)" * 100, ids)
    with pytest.raises(ValueError, match=r"at most 255 characters; 1 are longer"):
        pattern_groups(r"(a)", ["x" * 300 + ".png"])
    with pytest.raises(TypeError, match="pattern must be a string"):
        pattern_groups(3, ids)


def test_a_catastrophic_pattern_is_stopped_by_its_time_limit():
    with pytest.raises(ValueError, match=r"took more than 2 s on 1 file names.*Fix:"):
        pattern_groups(r"^((?:a+)+)$", ["a" * 60 + "!"], timeout=2)


def test_image_sets_carry_groups(tmp_path):
    from PIL import Image

    from kcore.data import ImageSet

    for g in ("x", "y"):
        (tmp_path / g).mkdir()
        for k in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * k + (g == "y") * 100, np.uint8)).save(tmp_path / g / f"{k}.png")
    images = ImageSet.from_folder(tmp_path, (8, 8))
    assert images.groups is None
    grouped = images.with_groups("folder")
    assert grouped.groups.labels == (0, 0, 1, 1) and images.groups is None  # a new set; the old one unchanged
    assert grouped.with_groups(None).groups is None
    with pytest.raises(ValueError, match="one group per image: expected 4 labels, got 2"):
        images.with_groups([0, 1])


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.skipif(not STRONG.is_file(), reason="sample models not built")
def test_cli_fit_with_groups_from_the_folder_layout(tmp_path, capsys):
    from PIL import Image

    from kcore.cli import main

    data = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for g in range(10):  # 10 photos, 3 near-identical crops of each
        (data / f"photo{g}").mkdir(parents=True)
        base = rng.integers(0, 256, (64, 64, 3))
        for k in range(3):
            crop = np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(crop).save(data / f"photo{g}" / f"crop{k}.png")
    out = tmp_path / "run"
    rc = main(["fit", "--a", str(WEAK), "--b", str(STRONG), "--data", str(data), "--groups", "folder",
               "--epochs", "2", "--orders", "1", "--out", str(out)])
    said = capsys.readouterr()
    err = said.err
    assert rc == 0, err
    assert "6 held-out images in 2 groups, resampled whole" in said.out
    assert "warning: the held-out images form only 2 groups (fewer than 10)" in said.out
    assert "groups: 30 images in 10 groups (3 each), from the folder layout" in err
    prov = json.loads((out / "provenance.json").read_text())["groups"]
    assert prov["source"] == "folder" and prov["n_groups"] == 10 and prov["sizes"]["histogram"] == {"3": 10}
    split = prov["split"]
    assert sum(p["images"] for p in split.values()) == 30 and split["heldout"]["images"] == 6
    assert all(p["images"] == 3 * p["groups"] for p in split.values()), "whole groups in every part"
    ci = json.loads((out / "metrics.json").read_text())["directions"]["A_to_B"]["ci"]
    assert ci["n_groups"] == split["heldout"]["groups"]
    # a grouping that leaves no held-out set is refused before anything is written
    csv = tmp_path / "one.csv"
    csv.write_text("image,group\n" + "".join(f"photo{g}/crop{k}.png,all\n" for g in range(10) for k in range(3)))
    assert main(["fit", "--a", str(WEAK), "--b", str(STRONG), "--data", str(data), "--groups", str(csv),
                 "--epochs", "1", "--out", str(tmp_path / "r2")]) == 2
    assert "too few groups for a held-out set: 30 images in 1 group" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
    assert main(["fit", "--a", str(WEAK), "--b", str(STRONG), "--groups", "folder", "--out", str(tmp_path / "r3")]) == 2
    assert "--groups folder needs a folder of images" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ dashboard
def _crops_zip(n_groups: int = 6, per: int = 3) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A zip of photo{g}/crop{k}.png (near-identical crops of one random photo each), and the same files flat."""
    import io
    import zipfile

    from PIL import Image

    rng = np.random.default_rng(1)
    buf, flat = io.BytesIO(), []
    with zipfile.ZipFile(buf, "w") as zf:
        for g in range(n_groups):
            base = rng.integers(0, 256, (16, 16, 3))
            for k in range(per):
                png = io.BytesIO()
                Image.fromarray(np.clip(base + k, 0, 255).astype(np.uint8)).save(png, format="PNG")
                zf.writestr(f"photo{g}/crop{k}.png", png.getvalue())
                flat.append((f"photo{g}_crop{k}.png", png.getvalue()))
    return buf.getvalue(), flat


def test_dashboard_state_groups_uploads_by_subfolder_or_pattern():
    from dashboard.state import images as state

    zipped, flat = _crops_zip()
    up = state.ImageChoice(state.uploaded_images([("photos.zip", zipped)], (16, 16)), "18 uploaded images", "upload")
    by_folder = state.group_images(up, "folder")
    assert by_folder.images.groups.n_groups == 6 and by_folder.grouping == ("folder", "")
    assert up.images.groups is None and up.grouping == ("none", "")  # the choice it came from is unchanged
    files = state.ImageChoice(state.uploaded_images(flat, (16, 16)), "18 uploaded images", "upload")
    by_name = state.group_images(files, "pattern", r"^(.*)_crop\d+")
    assert by_name.images.groups.sizes() == (3,) * 6 and by_name.grouping == ("pattern", r"^(.*)_crop\d+")
    assert state.group_images(by_name, "none").images.groups is None
    with pytest.raises(ValueError, match="needs images in subfolders"):
        state.group_images(files, "folder")
    with pytest.raises(ValueError, match=r"took more than"):  # what a browser sends is run under a time limit
        state.group_images(state.ImageChoice(state.uploaded_images([("a" * 40 + "!.png", flat[0][1])], (16, 16)),
                                             "1 image", "upload"), "pattern", r"^((?:a|a)+)$")
    with pytest.raises(ValueError, match="grouping must be one of"):
        state.group_images(files, "../etc")
    bundled = state.ImageChoice(state.bundled_images(60), "bundled", "bundled")
    with pytest.raises(ValueError, match="bundled images are each rendered independently"):
        state.group_images(bundled, "pattern", "(x)")


def test_models_page_groups_an_uploaded_zip(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    if not hasattr(AppTest, "file_uploader"):
        pytest.skip("this Streamlit's AppTest cannot upload files")
    monkeypatch.setenv("KCORE_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    at.segmented_control(key="kc_img_src").set_value("upload").run()
    at.file_uploader(key="kc_img_upload").upload("photos.zip", _crops_zip()[0], "application/zip").run()
    assert not at.exception, [e.value for e in at.exception]
    at.selectbox(key="kc_img_groups").set_value("folder").run()
    assert any("18 images in 6 groups (3 each), from the folder layout" in c.value for c in at.caption)
    assert at.session_state["kc_images"].images.groups.n_groups == 6
    at.selectbox(key="kc_img_groups").set_value("pattern").run()
    at.text_input(key="kc_img_pattern").set_value(r"^(crop)\d").run()
    assert any("18 images in 1 group (18 each), from the pattern" in c.value for c in at.caption)
    at.text_input(key="kc_img_pattern").set_value(r"^(crop").run()
    assert any("does not compile" in e.value for e in at.error)
    assert at.session_state["kc_images"].images.groups is None  # a refused pattern leaves no stale grouping
    assert any("Every image is its own group." in c.value for c in at.caption)


def test_compare_keeps_groups_whole_in_memory_and_streamed_from_the_cache(tmp_path, random_images):
    from helpers import loaded, tiny_net
    from kcore.pipeline import compare

    images = random_images(48, 12)
    images.groups = Groups.from_keys([i // 4 for i in range(48)], "folder")  # 12 groups of 4
    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1), "b.pt")
    runs = [compare(a, "2", b, "2", images, orders=1, epochs=1, device="cpu", baselines=["shuffled"], **kw)
            for kw in ({}, {"cache_dir": tmp_path / "cache"})]
    for comp in runs:
        f = comp.directions["A_to_B"].fit
        held = {i // 4 for i in f.heldout_indices}
        assert held.isdisjoint({i // 4 for i in f.train_indices + f.monitor_indices})
        assert f.heldout_report.ci.n_groups == len(held) >= 2
        assert comp.baselines["shuffled"].reports["A_to_B"].ci.n_groups == len(held)  # comparable intervals
        assert comp.provenance["groups"]["n_groups"] == 12
    # the same split and the same resamples; the cache stores float16, so the numbers agree to its rounding
    mem, disk = (c.directions["A_to_B"].fit for c in runs)
    assert mem.heldout_indices == disk.heldout_indices
    assert np.allclose(mem.heldout_report.ci.instability, disk.heldout_report.ci.instability, rtol=0.05)


def test_groups_are_checked_when_built():
    with pytest.raises(ValueError, match="labels must use each of 0 … 1"):
        Groups((0, 0), ("a", "b"))
    with pytest.raises(ValueError, match="source must be one of"):
        Groups((0,), ("a",), "folders")
    assert Groups.from_keys(["b", "a", "b"]).names == ("b", "a") and Groups.singletons(3).trivial
