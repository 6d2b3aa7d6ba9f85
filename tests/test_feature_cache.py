"""The float16 feature cache (kcore.feature_cache), on its own: entries written and read back, keys, parts.

No model runs here: entries are written with the same primitives extraction uses (start_entry, ArrayWriter,
finish_entry). Extraction through the cache is tested in test_features.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kcore import feature_cache as fc
from kcore.feature_cache import CacheKey
from kcore.feature_set import FeaturePair

KEY = CacheKey(checkpoint_a="a" * 64, checkpoint_b="b" * 64, image_set="imgs", transform="32px mean/std")


def _maps(n: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], torch.Tensor]:
    """Seeded (n, 3, 4, 5) and (n, 2, 2, 2) feature maps already on the float16 grid, ids and labels."""
    g = torch.Generator().manual_seed(seed)
    x_a = (torch.randn(n, 3, 4, 5, generator=g) * 4).half().float()
    x_b = (torch.randn(n, 2, 2, 2, generator=g) * 100).half().float()
    return x_a, x_b, tuple(f"img{i:03d}" for i in range(n)), torch.arange(n) % 3


def _write(entry: Path, x_a, x_b, ids, labels, *, known_n: bool = True, batch: int = 4) -> None:
    """Write an entry batch by batch, as extract_features does."""
    tmp = fc.start_entry(entry)
    n = len(ids) if known_n else None
    writers = [fc.ArrayWriter(tmp, n, tuple(x.shape[1:]), name) for x, name in ((x_a, "x_a"), (x_b, "x_b"))]
    for s in range(0, len(ids), batch):
        writers[0].write(x_a[s : s + batch], "la")
        writers[1].write(x_b[s : s + batch], "lb")
    for w in writers:
        w.finish()
    fc.finish_entry(tmp, entry, tuple(x_a.shape[1:]), tuple(x_b.shape[1:]), "la", "lb", ids, labels)


def test_an_entry_written_then_read_returns_identical_arrays(tmp_path: Path) -> None:
    x_a, x_b, ids, labels = _maps()
    entry = fc.cache_entry_dir(tmp_path, KEY, "la", "lb")
    _write(entry, x_a, x_b, ids, labels)
    got = fc.load_cached_features(tmp_path, KEY, "la", "lb")
    assert isinstance(got, FeaturePair) and got.entry == entry
    assert got.x_a.dtype == got.x_b.dtype == torch.float16
    assert torch.equal(got.x_a.float(), x_a) and torch.equal(got.x_b.float(), x_b)
    assert got.image_ids == ids and torch.equal(got.labels, labels)
    assert (got.layer_a, got.layer_b) == ("la", "lb")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder was renamed


def test_an_unknown_number_of_images_writes_the_same_bytes(tmp_path: Path) -> None:
    x_a, x_b, ids, _ = _maps(n=7)
    _write(tmp_path / "known", x_a, x_b, ids, None)
    _write(tmp_path / "unknown", x_a, x_b, ids, None, known_n=False, batch=3)
    for name in ("x_a.npy", "x_b.npy", "meta.json", "ids.json"):
        assert (tmp_path / "known" / name).read_bytes() == (tmp_path / "unknown" / name).read_bytes(), name
    assert not (tmp_path / "unknown" / "labels.npy").exists() and fc.read_entry(tmp_path / "unknown").labels is None
    assert sorted(p.name for p in (tmp_path / "unknown").iterdir()) == ["ids.json", "meta.json", "x_a.npy", "x_b.npy"]


@pytest.mark.parametrize(
    "key, layers, extra",
    [
        (CacheKey("c" * 64, "b" * 64, "imgs", "32px mean/std"), ("la", "lb"), ""),  # another checkpoint A
        (CacheKey("a" * 64, "c" * 64, "imgs", "32px mean/std"), ("la", "lb"), ""),  # another checkpoint B
        (CacheKey("a" * 64, "b" * 64, "other imgs", "32px mean/std"), ("la", "lb"), ""),  # other images
        (CacheKey("a" * 64, "b" * 64, "imgs", "64px mean/std"), ("la", "lb"), ""),  # other preprocessing
        (KEY, ("la", "lc"), ""),  # another layer
        (KEY, ("lb", "la"), ""),  # the layers swapped
        (KEY, ("la", "lb"), "224px"),  # anything else that changes the features
    ],
)
def test_a_changed_key_misses(tmp_path: Path, key: CacheKey, layers: tuple[str, str], extra: str) -> None:
    x_a, x_b, ids, labels = _maps(n=4)
    _write(fc.cache_entry_dir(tmp_path, KEY, "la", "lb"), x_a, x_b, ids, labels)
    assert fc.load_cached_features(tmp_path, KEY, "la", "lb") is not None
    assert fc.load_cached_features(tmp_path, key, *layers, cache_key_extra=extra) is None


def test_the_digest_is_a_stable_hash_of_every_field() -> None:
    d = fc.cache_digest(KEY, "la", "lb")
    assert len(d) == 64 and int(d, 16) >= 0
    assert d == fc.cache_digest(CacheKey("a" * 64, "b" * 64, "imgs", "32px mean/std"), "la", "lb")
    assert fc.cache_entry_dir("/c", KEY, "la", "lb") == Path("/c") / d
    assert fc.cache_digest("my key", "la", "lb") != fc.cache_digest("my key 2", "la", "lb")
    assert fc.cache_digest("my key", "la", "lb") != d


@pytest.mark.parametrize("bad", ["", None, 3])
def test_a_bad_cache_key_names_the_argument_and_the_fix(bad) -> None:
    with pytest.raises(ValueError, match=r"cache_key must be a kcore\.feature_cache\.CacheKey or a non-empty string; "
                                         rf"got {bad!r}\. Fix: CacheKey\(checkpoint_a="):
        fc.cache_digest(bad, "la", "lb")


def test_image_hashes_follow_content_and_order() -> None:
    assert fc.image_set_hash(["a", "b"]) != fc.image_set_hash(["b", "a"])
    assert fc.image_set_hash(["ab"]) != fc.image_set_hash(["a", "b"])  # ids are separated
    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    h = fc.image_content_hash(x)
    assert h == fc.image_content_hash(x.clone())
    assert h != fc.image_content_hash(x.flip(0))  # order
    y = x.clone()
    y[1, 2, 3, 3] += 1e-3
    assert h != fc.image_content_hash(y)  # one value
    assert h != fc.image_content_hash(x.double())  # dtype
    assert h != fc.image_content_hash(x, ids=["i0", "i1", "i2"])  # names
    # a dataset of (image, label) items hashes its images, like the stacked tensor's items
    items = [(x[i], i) for i in range(3)]
    assert fc.image_content_hash(items) == fc.image_content_hash([x[i] for i in range(3)]) != h


def test_float16_overflow_is_refused_before_it_is_written(tmp_path: Path) -> None:
    w = fc.ArrayWriter(tmp_path, 2, (1, 1, 1), "x_a")
    try:
        with pytest.raises(ValueError, match=r"layer 'relu9' has values up to 7e\+04 in magnitude, beyond float16 "
                                             r"\(max 65504\.0\).*Fix: pass cache_dir=None"):
            w.write(torch.tensor([1.0, -7e4]).view(2, 1, 1, 1), "relu9")
        assert w.done == 0
    finally:
        w.close()


def test_cached_array_reads_what_the_entry_holds(tmp_path: Path) -> None:
    x_a, x_b, ids, labels = _maps(n=9)
    _write(tmp_path / "e", x_a, x_b, ids, labels)
    arr_a, arr_b = fc.cached_arrays(fc.read_entry(tmp_path / "e"))
    assert len(arr_a) == 9 and arr_a.shape == x_a.shape and arr_b.shape == x_b.shape
    half = x_a.half()
    assert torch.equal(arr_a[2:7], half[2:7]) and torch.equal(arr_a[::3], half[::3])
    assert torch.equal(arr_a[torch.tensor([8, 0, 8, 3])], half[[8, 0, 8, 3]])
    assert torch.equal(arr_a[3], half[3]) and torch.equal(arr_a[[1, 2]], half[[1, 2]])
    assert torch.equal(arr_a[torch.tensor([-1])], half[[-1]])
    assert arr_a[5:5].shape == (0, 3, 4, 5)
    assert torch.equal(arr_b[:], x_b.half())
    with pytest.raises(IndexError, match="index out of range for 9 images"):
        arr_a[torch.tensor([9])]


def test_a_cached_array_takes_a_negative_index(tmp_path: Path) -> None:
    x_a, x_b, ids, labels = _maps(n=3)
    _write(tmp_path / "e", x_a, x_b, ids, labels)
    arr_a, _ = fc.cached_arrays(fc.read_entry(tmp_path / "e"))
    assert torch.equal(arr_a[-1], x_a.half()[-1])


def test_cached_arrays_of_features_in_memory_say_how_to_cache_them() -> None:
    x_a, x_b, ids, _ = _maps(n=2)
    with pytest.raises(ValueError, match=r"these features are in memory, not in the disk cache\. Fix: extract them "
                                         r"with cache_dir="):
        fc.cached_arrays(FeaturePair(x_a, x_b, "la", "lb", ids))


def test_a_cached_array_of_another_dtype_or_shape_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "f32.npy", np.zeros((2, 1, 2, 2), np.float32))
    np.save(tmp_path / "flat.npy", np.zeros((2, 4), np.float16))
    for name, got in (("f32.npy", r"float32, shape \(2, 1, 2, 2\)"), ("flat.npy", r"float16, shape \(2, 4\)")):
        with pytest.raises(ValueError, match=rf"is not a float16 \(N, C, H, W\) array in C order \(got {got}\)\. "
                                             r"Fix: delete that cache entry"):
            fc.CachedArray(tmp_path / name)


def test_an_entry_that_does_not_match_its_meta_is_named_with_the_fix(tmp_path: Path) -> None:
    x_a, x_b, ids, labels = _maps(n=4)
    entry = tmp_path / "e"
    _write(entry, x_a, x_b, ids, labels)
    (entry / "ids.json").write_text(json.dumps(list(ids[:3])))  # an id lost
    with pytest.raises(ValueError, match=r"feature cache entry '.*e' does not match its meta\.json .*3 ids.*"
                                         r"Fix: delete that folder"):
        fc.read_entry(entry)
    (entry / "meta.json").write_text("{")  # cut short
    with pytest.raises(ValueError, match=r"feature cache entry '.*e' is unreadable .*Fix: delete that folder"):
        fc.read_entry(entry)


@pytest.mark.parametrize("n, world, block", [(10, 2, 3), (9, 3, 2), (5, 2, 4)])
def test_parts_of_several_ranks_assemble_into_the_single_process_entry(tmp_path: Path, n: int, world: int,
                                                                       block: int) -> None:
    x_a, x_b, ids, labels = _maps(n=n, seed=1)
    _write(tmp_path / "single", x_a, x_b, ids, labels)
    entry = tmp_path / "job" / "entry"
    parts = []
    for r in range(world):  # rank r extracts blocks r, r + R, … (kcore.distributed.shard)
        rows = [i for s in range(r * block, n, world * block) for i in range(s, min(s + block, n))]
        part = fc.parts_dir(entry) / fc.part_key(entry, r, world).split("/")[-1]
        _write(part, x_a[rows], x_b[rows], tuple(ids[i] for i in rows), labels[rows])
        parts.append(part)
    got = fc.assemble_entry(entry, parts, block)
    assert got.image_ids == ids and torch.equal(got.labels, labels)
    for name in ("x_a.npy", "x_b.npy", "ids.json", "meta.json"):
        assert (entry / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert not fc.parts_dir(entry).exists()  # the parts are removed once assembled


def test_parts_that_do_not_fit_are_named(tmp_path: Path) -> None:
    x_a, x_b, ids, labels = _maps(n=6)
    entry = tmp_path / "entry"
    p0, p1 = fc.parts_dir(entry) / "p0", fc.parts_dir(entry) / "p1"
    _write(p0, x_a[:4], x_b[:4], ids[:4], labels[:4])  # blocks of 3 over 2 ranks: rank 0 holds 3 images, not 4
    _write(p1, x_a[4:], x_b[4:], ids[4:], labels[4:])
    with pytest.raises(ValueError, match=r"part 0 of '.*entry' \(4 images, layers 'la'/'lb'\) does not fit part 0 "
                                         r"or the 3 images expected\. Fix: delete '.*\.entry\.parts' and rerun"):
        fc.assemble_entry(entry, [p0, p1], 3)
    q0, q1 = fc.parts_dir(entry) / "q0", fc.parts_dir(entry) / "q1"
    _write(q0, x_a[:3], x_b[:3], ids[:3], labels[:3])
    _write(q1, x_a[3:, :2], x_b[3:], ids[3:], labels[3:])  # another layer's channels
    with pytest.raises(ValueError, match=r"part 1 of '.*entry' \(3 images, layers 'la'/'lb'\) does not fit part 0"):
        fc.assemble_entry(entry, [q0, q1], 3)
    assert not entry.exists()
