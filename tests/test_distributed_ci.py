"""The shares' bootstrap intervals under torchrun use every rank's held-out images, placed by image, as the nested
gains' do: a 2-rank job gives the intervals of one process (kcore.streaming.merge_image_moments)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_job
from kcore.metrics import ImageMoments

ROOT = Path(__file__).resolve().parents[1]


def _parts(n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) + 5.0
    comps = [0.5 * t + torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64), 0.2 * t + 1.0]
    return comps, t - sum(comps), t


def test_sums_re_centred_on_other_shifts_equal_the_sums_taken_around_them() -> None:
    """Two passes over the same images in different batch orders take different shifts (each from its first
    batch); re-centred on the other's shifts, one's per-image sums are the other's, and the rows come back in
    position order whatever order the batches were added in."""
    comps, r, t = _parts(10, 0)
    forward, backward = ImageMoments(1, 3), ImageMoments(1, 3)
    for s in (slice(0, 4), slice(4, 10)):
        forward.update([c[s] for c in comps], r[s], t[s], positions=s)
    for s in (slice(6, 10), slice(0, 6)):
        backward.update([c[s] for c in comps], r[s], t[s], positions=s)
    assert forward.shifts != backward.shifts
    rows_f, _ = forward.rows()
    rows_b, order = backward.rows(forward.shifts)
    assert order.tolist() == [4, 5, 6, 7, 8, 9, 0, 1, 2, 3]
    torch.testing.assert_close(rows_b, rows_f, rtol=1e-12, atol=1e-9)
    a, b = forward.bootstrap(n_boot=50, seed=3), backward.bootstrap(n_boot=50, seed=3)
    np.testing.assert_allclose(b.share_orders, a.share_orders, atol=1e-12)
    np.testing.assert_allclose(b.channel_share_orders, a.channel_share_orders, atol=1e-12)
    with pytest.raises(ValueError, match="positions must give one position per image of the batch: expected 4, got 2"):
        forward.update([c[:4] for c in comps], r[:4], t[:4], positions=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shifts must hold K\\+3 = 4 numbers"):
        forward.rows([0.0, 1.0])


@pytest.mark.slow
@pytest.mark.parametrize("grouped", [False, True])
def test_two_torchrun_ranks_give_the_share_intervals_of_one_process(tmp_path: Path, grouped: bool) -> None:
    job = str(ROOT / "tests" / "shares_dist_job.py")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 5, 8, 8, generator=g)
    y = torch.nn.functional.conv2d(x, torch.randn(4, 5, 3, 3, generator=g) * 0.3, padding=1).relu()
    y = y + 0.3 * torch.randn(y.shape, generator=g)
    np.save(tmp_path / "x.npy", x.half().numpy())  # the feature cache stores float16
    np.save(tmp_path / "y.npy", y.half().numpy())
    extra = ["grouped"] if grouped else []
    one = run_job([sys.executable, job, str(tmp_path), str(tmp_path / "one.json"), *extra], tmp_path / "one.json")
    two = run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", job,
                str(tmp_path), str(tmp_path / "two.json"), *extra], tmp_path / "two.json")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # the held-out images span several evaluation batches, so rank 1 really holds some of them
    assert one["n_heldout"] == two["n_heldout"] == two["ci"]["n_heldout"] == one["ci"]["n_heldout"] > 16
    assert two["ci"]["n_groups"] == one["ci"]["n_groups"] and (one["ci"]["n_groups"] is not None) == grouped
    np.testing.assert_allclose(two["share_orders"], one["share_orders"], atol=1e-9)
    for key in ("instability", "share_orders", "share_residual", "channel_share_orders", "channel_share_residual",
                "channel_instability"):
        np.testing.assert_allclose(two["ci"][key], one["ci"][key], atol=1e-9, err_msg=key)
    # the intervals are real ones (a width), not a degenerate point
    assert all(hi - lo > 1e-4 for lo, hi in one["ci"]["share_orders"])


def test_sum_by_position_places_rows_and_refuses_a_split_that_misses_images() -> None:
    from kcore.streaming import sum_by_position

    rows = torch.arange(6, dtype=torch.float64).view(3, 2)
    torch.testing.assert_close(sum_by_position(rows, torch.tensor([2, 0, 1]), 3),
                               torch.tensor([[2.0, 3.0], [4.0, 5.0], [0.0, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"cover positions 0 … 3 once each; got 1 missing and 0 repeated. Fix"):
        sum_by_position(rows, torch.tensor([0, 1, 2]), 4)
    with pytest.raises(ValueError, match=r"got 1 missing and 1 repeated"):
        sum_by_position(rows, torch.tensor([0, 0, 1]), 3)
