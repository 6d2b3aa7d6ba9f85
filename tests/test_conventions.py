"""The two normalisation conventions (kcore.conventions): known answers for each step, by hand.

g_θ against a transcription of the authors' code is tested in test_gtheta.py; channel statistics of maps too
big for one batch in test_metrics.py.
"""
from __future__ import annotations

import pytest
import torch

from kcore.conventions import (
    CONVENTIONS,
    EPS,
    STD_FLOOR,
    Normalization,
    channel_mean_std,
    check_convention,
    resample,
    spatial_std,
    std_floor,
)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Source maps (12, 3, 8, 8) with channel offsets and scales, and target maps (12, 2, 4, 4)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 8, 8, generator=g) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1, 1) + torch.tensor(
        [0.0, 10.0, -3.0]).view(1, 3, 1, 1)
    y = torch.randn(12, 2, 4, 4, generator=g) * 3 + 7
    return x, y


def test_the_conventions_are_the_two_named_ones_and_others_are_refused() -> None:
    assert set(CONVENTIONS) == {"paper", "authors"}
    assert check_convention("paper") == "paper" and check_convention("authors") == "authors"
    with pytest.raises(ValueError, match=r"convention must be one of \['authors', 'paper'\]; got 'Paper'\. 'paper' "
                                         r"follows Sec\. 3 of the paper, 'authors' follows the authors' public code"):
        check_convention("Paper")
    with pytest.raises(ValueError, match="convention must be one of"):
        Normalization.fit(torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), "neither")  # type: ignore[arg-type]


def test_resample_known_answers() -> None:
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    assert resample(x, (6, 6)) is x  # the same size: untouched
    const = torch.full((1, 2, 8, 8), 2.5)
    torch.testing.assert_close(resample(const, (4, 4)), torch.full((1, 2, 4, 4), 2.5))  # shrinking keeps a constant
    torch.testing.assert_close(resample(const, (16, 12)), torch.full((1, 2, 16, 12), 2.5))
    rows = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 1, 8, 8)  # constant along each row
    shrunk = resample(rows, (4, 3))
    assert shrunk.shape == (1, 1, 4, 3)
    torch.testing.assert_close(shrunk, shrunk[..., :1].expand_as(shrunk))
    assert torch.all(shrunk[0, 0, 1:, 0] > shrunk[0, 0, :-1, 0])  # the ramp keeps its order
    # linear: resample(a x + b y) = a resample(x) + b resample(y)
    y = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(resample(2 * x - y, (4, 5)), 2 * resample(x, (4, 5)) - resample(y, (4, 5)))
    half = resample(x.half(), (6, 6))
    assert half.dtype == torch.float32 and torch.equal(half, x.half().float())  # float16 cache values: float32 out


def test_spatial_std_is_the_unbiased_std_over_positions_plus_eps() -> None:
    h = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).repeat(2, 2, 1, 1)
    h[1, 1] *= 3  # values 3, 6, 9, 12
    s = spatial_std(h)
    assert s.shape == (2, 2, 1, 1)
    want = torch.tensor(5 / 3) ** 0.5  # unbiased variance of 1, 2, 3, 4 is 5/3
    torch.testing.assert_close(s[0, 0, 0, 0], want + EPS)
    torch.testing.assert_close(s[1, 1, 0, 0], 3 * want + EPS)
    h.requires_grad_(True)
    assert not spatial_std(h).requires_grad  # detached: Σ carries no gradient
    assert torch.equal(spatial_std(torch.randn(3, 2, 1, 1)), torch.ones(3, 2, 1, 1))


def test_channel_statistics_are_the_population_ones_over_images_and_positions(pair) -> None:
    x, _ = pair
    whole = x.double()
    for batch in (1, 5, None):
        mean, std = channel_mean_std(x, batch_size=batch)
        assert mean.dtype == std.dtype == torch.float64
        torch.testing.assert_close(mean, whole.mean(dim=(0, 2, 3)))
        torch.testing.assert_close(std, whole.std(dim=(0, 2, 3), unbiased=False))


def test_std_floor_known_answers() -> None:
    std = torch.tensor([1.0, 2.0, 3.0, 1e-6, 0.0], dtype=torch.float64)
    floor = STD_FLOOR * float(std.mean())  # 0.01 × 1.2000002
    assert std_floor(std).tolist() == pytest.approx([1.0, 2.0, 3.0, floor, floor])
    assert std_floor(std, share=0.5).tolist() == pytest.approx([1.0, 2.0, 3.0, 0.6, 0.6], rel=1e-6)
    assert torch.equal(std_floor(torch.zeros(3)), torch.ones(3))  # every channel constant: nothing to scale


def test_paper_convention_standardises_over_the_fit_split_and_inverts_exactly(pair) -> None:
    x, y = pair
    train = torch.arange(0, 12, 2)
    norm = Normalization.fit(x, y, "paper", indices=train)
    assert norm.convention == "paper" and norm.target_size == (4, 4)
    xs, ys = norm.source(x[train]), norm.target(y[train])
    assert xs.shape == (6, 3, 4, 4)  # x resampled to x*'s size, then standardised
    torch.testing.assert_close(xs.double().mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(xs.double().std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ys.double().mean(dim=(0, 2, 3)), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-5)
    # statistics of the fit split only: the other images are not standardised exactly
    assert float(norm.target(y[1::2]).double().mean(dim=(0, 2, 3)).abs().max()) > 1e-3
    torch.testing.assert_close(norm.target_to_raw(norm.target(y)), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.target_to_raw(ys, add_mean=False), y[train] - norm.tgt_mean.float().view(1, 2, 1, 1),
                               rtol=1e-5, atol=1e-5)
    assert set(norm.state()) == {"src_mean", "src_std", "tgt_mean", "tgt_std"}
    torch.testing.assert_close(norm.state()["tgt_mean"], y[train].double().mean(dim=(0, 2, 3)))


def test_authors_convention_divides_by_the_spatial_std_and_keeps_the_target_raw(pair) -> None:
    x, y = pair
    norm = Normalization.fit(x, y, "authors")
    assert norm == Normalization("authors", (4, 4)) and norm.state() == {}
    small = resample(x, (4, 4))
    torch.testing.assert_close(norm.source(x), small / spatial_std(small))
    # no centring: a channel with a large mean keeps its sign; scale-free per image
    assert float(norm.source(x)[:, 1].mean()) > 5
    torch.testing.assert_close(norm.source(3.0 * x), norm.source(x), rtol=1e-3, atol=1e-3)  # (up to EPS)
    assert torch.equal(norm.target(y), y) and torch.equal(norm.target_to_raw(y), y)


def test_normalisation_does_not_change_its_inputs(pair) -> None:
    x, y = pair
    x0, y0 = x.clone(), y.clone()
    for convention in ("paper", "authors"):
        norm = Normalization.fit(x, y, convention)
        norm.source(x), norm.target(y), norm.target_to_raw(y)
    assert torch.equal(x, x0) and torch.equal(y, y0)
