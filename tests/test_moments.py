"""Streaming moments packed and merged (kcore.metrics.moments), and their merge over ranks (kcore.streaming).

Known answers: moments of parts merged equal the moments of the whole; ranks simulated by threads that
exchange tensors through a barrier (what ``torch.distributed``'s collectives give) end with the same numbers
as one process, every rank alike, and leave their own moments unchanged.
"""
from __future__ import annotations

import threading

import pytest
import torch

from kcore import distributed as kd
from kcore import streaming
from kcore.metrics import ChannelMoments, CrossMoments, VarianceAccumulator, paper_cov, paper_var


def _maps(seed: int, n: int = 23, c: int = 4) -> torch.Tensor:
    """(n, c, 5, 3) maps with very different scales per channel and a large mean (a hard case for moments)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 2, c, dtype=torch.float64).view(1, c, 1, 1)
    return torch.randn(n, c, 5, 3, generator=g, dtype=torch.float64) * scale + 1000.0


def test_packed_parts_merge_to_the_moments_of_the_whole():
    x = _maps(0)
    parts = [x[:9], x[9:9], x[9:]]  # an empty part in the middle is skipped
    packs = []
    for p in parts:
        m = ChannelMoments(x.shape[1])
        m.update(p)
        packs.append(m.pack())
    merged = ChannelMoments(x.shape[1])
    merged.merge(torch.stack(packs))
    assert merged.n == x.shape[0] * x.shape[2] * x.shape[3]
    torch.testing.assert_close(merged.channel_var(), x.var(dim=(0, 2, 3), unbiased=False), rtol=1e-10, atol=0)
    assert merged.global_var() == pytest.approx(paper_var(x), rel=1e-10)
    # one row at a time is the same as a stack of rows, exactly
    one_by_one = ChannelMoments(x.shape[1])
    for p in packs:
        one_by_one.merge(p)
    assert torch.equal(one_by_one.pack(), merged.pack())


def test_pack_round_trips_exactly():
    m = ChannelMoments(4)
    m.update(_maps(1))
    again = ChannelMoments(4)
    again.merge(m.pack())
    assert again.n == m.n and torch.equal(again.mean, m.mean) and torch.equal(again.m2, m.m2)
    assert m.pack().shape == (1 + 2 * 4,) and m.pack().dtype == torch.float64


def test_packed_cross_moments_merge_to_the_covariance_of_the_whole():
    a, b = _maps(2), _maps(3) * 0.5 + 0.25 * _maps(2)
    packs = []
    for sl in (slice(0, 5), slice(5, 14), slice(14, None)):
        m = CrossMoments(a.shape[1])
        m.update(a[sl], b[sl])
        packs.append(m.pack())
    merged = CrossMoments(a.shape[1])
    merged.merge(torch.stack(packs))
    ac, bc = a - a.mean(dim=(0, 2, 3), keepdim=True), b - b.mean(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(merged.channel_cov(), (ac * bc).mean(dim=(0, 2, 3)), rtol=1e-9, atol=0)
    assert merged.global_cov() == pytest.approx(paper_cov(a, b), rel=1e-9)
    assert merged.pack().shape == (1 + 3 * a.shape[1],)


def test_merge_refuses_what_pack_did_not_make():
    m = ChannelMoments(5)
    with pytest.raises(ValueError, match=r"packed must be \(11,\) or \(R, 11\) for ChannelMoments of 5 channels; "
                                         r"got shape \(16,\)\. Fix: merge moments of the same channels"):
        m.merge(CrossMoments(5).pack())
    with pytest.raises(ValueError, match=r"for CrossMoments of 2 channels; got shape \(2, 2, 7\)"):
        CrossMoments(2).merge(torch.zeros(2, 2, 7, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"packed must be a tensor from ChannelMoments\.pack\(\); got ChannelMoments\. "
                                        r"Fix: pass moments\.pack\(\)"):
        m.merge(ChannelMoments(5))
    assert m.n == 0 and not bool(m.mean.any())  # a refused merge changes nothing


class _ThreadRanks:
    """``world`` ranks as threads whose collectives meet at a barrier and see every rank's tensor in rank order."""

    def __init__(self, world: int):
        self.world = world
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def all_gather_tensors(self, t: torch.Tensor, ctx: kd.Context | None = None) -> list[torch.Tensor]:
        self.slots[ctx.rank] = t.detach().clone()
        self.barrier.wait()
        out = [s.clone() for s in self.slots]
        self.barrier.wait()  # nobody overwrites a slot before every rank has read it
        return out

    def all_reduce_floats(self, *values: float, ctx: kd.Context | None = None) -> tuple[float, ...]:
        rows = self.all_gather_tensors(torch.tensor(values, dtype=torch.float64), ctx)
        return tuple(float(v) for v in torch.stack(rows).sum(0))

    def all_reduce_sum(self, t: torch.Tensor, ctx: kd.Context | None = None) -> torch.Tensor:
        return torch.stack(self.all_gather_tensors(t, ctx)).sum(0)

    def run(self, fn):
        """``fn(ctx)`` on every rank; their results in rank order (a rank's exception is raised here)."""
        results, errors = [None] * self.world, []

        def one(rank: int) -> None:
            try:
                results[rank] = fn(kd.Context(rank=rank, world_size=self.world))
            except BaseException as exc:  # noqa: BLE001  (handed to the test thread below)
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def three_ranks(monkeypatch):
    ranks = _ThreadRanks(3)
    monkeypatch.setattr(kd, "all_gather_tensors", ranks.all_gather_tensors)
    monkeypatch.setattr(kd, "all_reduce_floats", ranks.all_reduce_floats)
    monkeypatch.setattr(kd, "all_reduce_sum", ranks.all_reduce_sum)
    return ranks


def test_moments_merged_over_ranks_equal_one_process(three_ranks):
    x, batch = _maps(4, n=29), 4

    def on_rank(ctx: kd.Context):
        mine = ChannelMoments(x.shape[1])
        for sl in streaming.batch_slices(x.shape[0], batch, ctx):
            mine.update(x[sl])
        before = mine.pack()
        merged = streaming.merge_moments(mine, ctx)
        assert torch.equal(mine.pack(), before)  # this rank's moments are left as they were
        return merged

    merged = three_ranks.run(on_rank)
    assert all(torch.equal(m.pack(), merged[0].pack()) for m in merged)  # every rank gets the same numbers
    one = ChannelMoments(x.shape[1])
    for sl in streaming.batch_slices(x.shape[0], batch):
        one.update(x[sl])
    assert merged[0].n == one.n
    torch.testing.assert_close(merged[0].channel_var(), one.channel_var(), rtol=1e-12, atol=0)
    assert merged[0].global_var() == pytest.approx(one.global_var(), rel=1e-12)


def test_accumulator_merged_over_ranks_reports_what_one_process_reports(three_ranks):
    g = torch.Generator().manual_seed(5)
    target = torch.randn(26, 3, 4, 4, generator=g)
    comps = [0.7 * target + 0.1 * torch.randn(26, 3, 4, 4, generator=g), 0.2 * target]
    residual = target - comps[0] - comps[1]

    def accumulate(ctx: kd.Context | None) -> VarianceAccumulator:
        acc = VarianceAccumulator(1, 3)
        for sl in streaming.batch_slices(target.shape[0], 5, ctx):
            acc.update([c[sl] for c in comps], residual[sl], target[sl], positions=sl)
        return acc

    def on_rank(ctx: kd.Context):
        acc = accumulate(ctx)
        images, target_pack = acc.images, acc.target.pack()
        merged = streaming.merge_accumulator(acc, ctx)
        assert acc.images == images and torch.equal(acc.target.pack(), target_pack)  # input unchanged
        return merged.report()

    reports = three_ranks.run(on_rank)
    assert reports[1] == reports[0] and reports[2] == reports[0]
    one = accumulate(None).report()
    assert reports[0].n_images == one.n_images == 26
    for name in ("var_output", "var_residual", "var_target", "instability", "mse", "share_residual"):
        assert getattr(reports[0], name) == pytest.approx(getattr(one, name), rel=1e-10), name
    assert reports[0].var_orders == pytest.approx(one.var_orders, rel=1e-10)
    assert reports[0].share_orders == pytest.approx(one.share_orders, rel=1e-10)
    assert reports[0].per_channel.var_target == pytest.approx(one.per_channel.var_target, rel=1e-10)
    # the bootstrap resamples every rank's images, placed by position: the intervals of one process
    assert reports[0].ci.n_heldout == 26
    for name in ("share_orders", "channel_share_orders", "instability"):
        torch.testing.assert_close(torch.tensor(getattr(reports[0].ci, name)), torch.tensor(getattr(one.ci, name)),
                                   rtol=0, atol=1e-12)


def test_one_process_gets_its_own_moments_back():
    m = ChannelMoments(2)
    m.update(_maps(6, n=3, c=2))
    assert streaming.merge_moments(m) is m
    acc = VarianceAccumulator(0, 2)
    assert streaming.merge_accumulator(acc, kd.Context()) is acc
