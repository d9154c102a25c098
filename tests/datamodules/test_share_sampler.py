"""ShareSampler: DDP evaluation shares are disjoint, cover every item, and no rank is
left without an item (a rank with none would skip the epoch-end gathers and hang)."""

from __future__ import annotations

import pytest

from medlit.datamodules.base import ShareSampler


@pytest.mark.parametrize(("n", "world"), [(7, 2), (8, 2), (5, 3), (3, 4), (1, 2)])
def test_shares_are_disjoint_and_cover_every_item(n: int, world: int) -> None:
    shares = [list(ShareSampler(list(range(n)), world, rank)) for rank in range(world)]
    assert all(len(s) == len(ShareSampler(list(range(n)), world, r)) for r, s in enumerate(shares))
    assert all(shares)  # every rank evaluates something
    unique = [s for r, s in enumerate(shares) if r < n]  # ranks beyond n repeat one item
    assert sorted(i for s in unique for i in s) == list(range(n))
    assert all(s == [r % n] for r, s in enumerate(shares) if r >= n)
