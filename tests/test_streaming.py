"""Streaming feature maps (kcore.streaming): lazy prepared rows, this rank's batches, Gram-matrix CKA.

Known answers: what a :class:`Rows` view returns is what preparing the whole tensor and indexing it returns;
moments streamed batch by batch through it equal the whole tensor's; the block-wise CKA equals the direct one.
Merging moments over ranks is tested in test_moments.py, the streamed fit in test_distributed.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kcore import distributed as kd
from kcore.feature_cache import CachedArray
from kcore.metrics import ChannelMoments, linear_cka, paper_var
from kcore.streaming import Rows, batch_slices, gram_cka


def _prepare(t: torch.Tensor) -> torch.Tensor:
    """A preparation that is not elementwise-trivial: per-channel affine map, then a 2 × 2 average pool."""
    scale = torch.arange(1, t.shape[1] + 1, dtype=t.dtype).view(1, -1, 1, 1)
    return torch.nn.functional.avg_pool2d(t * scale - 1.0, 2)


@pytest.fixture(scope="module")
def raw() -> torch.Tensor:
    return torch.randn(30, 3, 6, 6, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def index() -> torch.Tensor:
    return torch.tensor([17, 3, 25, 3, 0, 29, 11, 8])  # unsorted, with a repeat


def test_rows_equal_the_prepared_whole_tensor_indexed(raw: torch.Tensor, index: torch.Tensor) -> None:
    rows = Rows(raw, _prepare, index, torch.contiguous_format, (3, 3, 3))
    whole = _prepare(raw)[index]
    assert rows.shape == whole.shape == (8, 3, 3, 3) and len(rows) == 8
    torch.testing.assert_close(rows[:], whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(rows[2:6], whole[2:6], rtol=0, atol=1e-6)
    torch.testing.assert_close(rows[::3], whole[::3], rtol=0, atol=1e-6)
    torch.testing.assert_close(rows[torch.tensor([7, 0, 3, 3])], whole[[7, 0, 3, 3]], rtol=0, atol=1e-6)
    torch.testing.assert_close(rows[5], whole[5], rtol=0, atol=1e-6)
    assert rows[4:4].shape == (0, 3, 3, 3)
    sub = rows.take(torch.tensor([6, 1]))
    assert torch.equal(sub.index, index[[6, 1]])
    torch.testing.assert_close(sub[:], whole[[6, 1]], rtol=0, atol=1e-6)


def test_rows_read_the_source_forwards_and_never_change_it(raw: torch.Tensor, index: torch.Tensor) -> None:
    asked: list[list[int]] = []

    class Source:  # a raw array that records which images each read asks for
        shape = raw.shape

        def __getitem__(self, picks: torch.Tensor) -> torch.Tensor:
            asked.append(picks.tolist())
            return raw[picks]

    before = raw.clone()
    rows = Rows(Source(), _prepare, index, torch.contiguous_format, (3, 3, 3))
    rows[torch.tensor([2, 0, 1])]
    assert asked == [[3, 17, 25]]  # one read, in file order
    assert torch.equal(raw, before)


def test_rows_from_the_float16_cache_are_prepared_in_float32(tmp_path: Path, raw: torch.Tensor,
                                                             index: torch.Tensor) -> None:
    np.save(tmp_path / "x.npy", raw.half().numpy())
    rows = Rows(CachedArray(tmp_path / "x.npy"), _prepare, index, torch.channels_last, (3, 3, 3))
    got = rows[1:7]
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, _prepare(raw.half().float())[index[1:7]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("n, batch, world", [(23, 4, 3), (8, 4, 2), (5, 8, 2), (40, 5, 4), (0, 4, 2), (7, 1, 3)])
def test_the_ranks_batches_are_the_single_process_batches_dealt_out(n: int, batch: int, world: int) -> None:
    one = batch_slices(n, batch)
    assert [(s.start, s.stop) for s in one] == [(s, min(s + batch, n)) for s in range(0, n, batch)]
    dealt = [batch_slices(n, batch, kd.Context(rank=r, world_size=world)) for r in range(world)]
    for r, mine in enumerate(dealt):  # batch i goes to rank i mod R
        assert [(s.start, s.stop) for s in mine] == [(s.start, s.stop) for s in one[r::world]]
    covered = sorted(i for mine in dealt for s in mine for i in range(s.start, s.stop))
    assert covered == list(range(n))  # every position once


def test_moments_streamed_through_rows_equal_the_whole_tensor(tmp_path: Path, raw: torch.Tensor) -> None:
    # the fit's pass over a split from the cache: Rows read batch by batch, moments merged per batch
    np.save(tmp_path / "x.npy", raw.half().numpy())
    split = torch.arange(1, 30, 2)
    rows = Rows(CachedArray(tmp_path / "x.npy"), _prepare, split, torch.contiguous_format, (3, 3, 3))
    mom = ChannelMoments(3)
    for sl in batch_slices(len(rows), 4):
        mom.update(rows[sl])
    whole = _prepare(raw.half().float())[split].double()
    assert mom.n == whole.numel() // 3
    torch.testing.assert_close(mom.mean, whole.mean(dim=(0, 2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(mom.channel_var(), whole.var(dim=(0, 2, 3), unbiased=False), rtol=1e-10, atol=1e-12)
    assert mom.global_var() == pytest.approx(paper_var(whole), rel=1e-10)


@pytest.mark.parametrize("batch", [1, 7, 50, 256])
def test_gram_cka_equals_the_direct_linear_cka(batch: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 3, 4, 4, generator=g)
    y = torch.randn(50, 2, 4, 4, generator=g) + x[:, :2]
    assert gram_cka(x, y, batch_size=batch) == pytest.approx(linear_cka(x, y), rel=1e-10)


def test_gram_cka_known_answers(raw: torch.Tensor, index: torch.Tensor) -> None:
    x = raw[:20]
    q, _ = torch.linalg.qr(torch.randn(108, 108, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    rotated = (x.reshape(20, -1).double() @ q).reshape(20, 3, 6, 6)
    assert gram_cka(x, x, batch_size=6) == pytest.approx(1.0, abs=1e-12)
    assert gram_cka(x, 3.0 * x + 2.0, batch_size=6) == pytest.approx(1.0, abs=1e-12)  # isotropic scale, shift
    assert gram_cka(x, rotated, batch_size=6) == pytest.approx(1.0, abs=1e-10)  # an orthogonal map
    assert gram_cka(x, x[:, [2, 0, 1]], batch_size=6) == pytest.approx(1.0, abs=1e-12)  # channels permuted
    rows = Rows(raw, _prepare, index, torch.contiguous_format, (3, 3, 3))  # Rows in, as a fit passes them
    assert gram_cka(rows, rows, batch_size=3) == pytest.approx(1.0, abs=1e-12)
    assert gram_cka(rows, raw[index], batch_size=3) == pytest.approx(linear_cka(_prepare(raw)[index], raw[index]),
                                                                      rel=1e-6)


def test_gram_cka_is_undefined_without_two_images_or_without_variation() -> None:
    assert np.isnan(gram_cka(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)))
    assert np.isnan(gram_cka(torch.ones(6, 2, 3, 3), torch.randn(6, 2, 3, 3)))  # every image the same
