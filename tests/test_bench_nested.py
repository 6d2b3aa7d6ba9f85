"""bench.nested's own arithmetic: the gains read in the paper's units, and a row without today's fit."""
from __future__ import annotations

import torch

import kcore
from bench.nested import gains_in_paper_units, one_row, table
from helpers import planted_relu_pair


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = planted_relu_pair(120)
    return x * torch.linspace(0.5, 2.0, 4).view(1, 4, 1, 1), y * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1, 1) + 5.0


def test_a_paper_convention_fit_s_gains_read_in_the_paper_s_units_are_its_own_gains() -> None:
    xa, xb = _pair()
    res = kcore.fit(xa, xb, device="cpu", nested=True, orders=1, kernel_size=1, max_steps=40, seed=0)
    g = res.nested.gains
    own = [*g.gain_orders, g.instability]
    read = gains_in_paper_units(res, xa, xb)
    assert abs(sum(read) - 1.0) < 1e-9  # they telescope too
    assert max(abs(a - b) for a, b in zip(own, read)) < 2e-4  # float32 components against kcore's float64 sums


def test_an_authors_convention_fit_is_read_in_the_paper_s_units() -> None:
    # the authors' convention keeps x* raw. Where x* is already standardised per channel on the training images,
    # the paper's units are x*'s own, so the gains read in them are the fit's own gains (two ways to one number);
    # with channels of unequal scale and mean they are other numbers
    xa, xb = _pair()
    kw = dict(device="cpu", nested=True, orders=1, kernel_size=1, max_steps=40, seed=0, convention="authors")
    res = kcore.fit(xa, xb, **kw)
    g = res.nested.gains
    read = gains_in_paper_units(res, xa, xb)
    assert abs(sum(read) - 1.0) < 1e-9 and abs(read[0] - g.gain_orders[0]) > 0.01
    train = torch.tensor(res.train_indices)
    mean, std = xb[train].mean((0, 2, 3), keepdim=True), xb[train].std((0, 2, 3), keepdim=True, correction=0)
    xs = (xb - mean) / std
    res = kcore.fit(xa, xs, **kw)
    assert res.train_indices == tuple(int(i) for i in train)  # the split depends on the seed and the count only
    g = res.nested.gains
    read = gains_in_paper_units(res, xa, xs)
    assert max(abs(a - b) for a, b in zip([*g.gain_orders, g.instability], read)) < 2e-4


def test_a_nested_only_row_has_no_plain_numbers_and_its_table_says_so() -> None:
    xa, xb = _pair()
    row = one_row("tiny", xa, xb, plain_fit=False, orders=1, kernel_size=1, max_steps=20, seed=0)
    assert "plain_shares" not in row and len(row["gains"]) == 3 and abs(sum(row["gains"]) - 1.0) < 1e-9
    text = table([row], (4, 3, 4, 4))
    assert "| tiny | not run |" in text and f"not run / {row['nested_cpu_seconds']:.0f} s" in text
