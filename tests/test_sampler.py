"""DistributedWeightedSampler: per-rank shares, determinism per (seed, epoch), weights, resume."""

import numpy as np
import pytest

from vla_ds.data.sampler import DistributedWeightedSampler
from vla_ds.errors import ConfigError


def shares(n, replicas, epoch=0, **kw):
    out = []
    for r in range(replicas):
        s = DistributedWeightedSampler(n, replicas, r, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("weighted", [False, True])
def test_rank_shares_interleave_into_global_draw(weighted):
    n, replicas = 103, 4
    w = np.linspace(1, 2, n) if weighted else None
    per_rank = shares(n, replicas, epoch=3, seed=7, weights=w)
    assert [len(p) for p in per_rank] == [25] * 4  # drop_last: 103 // 4
    order = DistributedWeightedSampler(n, replicas, 0, seed=7, weights=w)
    order.set_epoch(3)
    glob = order.global_order().tolist()
    assert len(glob) == n
    for r in range(replicas):
        assert per_rank[r] == glob[r:100:replicas]  # positions r, r+R, ... of the global draw
    if not weighted:  # a permutation: disjoint indices too
        merged = sum(per_rank, [])
        assert len(set(merged)) == 100 and set(merged) <= set(range(n))


def test_no_drop_last_pads_by_wrapping():
    per_rank = shares(10, 4, seed=1, drop_last=False)
    assert [len(p) for p in per_rank] == [3] * 4
    s = DistributedWeightedSampler(10, 4, 0, seed=1, drop_last=False)
    glob = s.global_order().tolist()
    padded = glob + glob[:2]
    for r in range(4):
        assert per_rank[r] == padded[r::4]
    assert len(s) == 3


def test_order_depends_only_on_seed_and_epoch():
    a = DistributedWeightedSampler(50, 2, 1, seed=3)
    b = DistributedWeightedSampler(50, 2, 1, seed=3)
    a.set_epoch(5)
    list(a)  # iterating does not advance any state
    b.set_epoch(4)
    b.set_epoch(5)
    assert list(a) == list(b)
    b.set_epoch(6)
    assert list(b) != list(a)
    c = DistributedWeightedSampler(50, 2, 1, seed=4)
    c.set_epoch(5)
    assert list(c) != list(a)


def test_unshuffled_is_arange():
    assert shares(6, 2, shuffle=False) == [[0, 2, 4], [1, 3, 5]]


def test_weighted_frequencies_follow_weights():
    group_w = np.array([1.0, 2.0, 3.0, 4.0, 0.0])
    w = np.repeat(group_w, 200)  # 1000 samples in 5 groups
    counts = np.zeros(5)
    for epoch in range(10):
        for part in shares(1000, 2, epoch=epoch, seed=0, weights=w):
            counts += np.bincount(np.array(part) // 200, minlength=5)
    assert counts.sum() == 10 * 1000
    np.testing.assert_allclose(counts / counts.sum(), group_w / group_w.sum(), atol=0.015)
    assert counts[4] == 0


def test_start_index_resumes_exactly():
    s = DistributedWeightedSampler(40, 2, 1, seed=9, weights=np.ones(40))
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_index=7)
    assert list(s) == full[7:]
    assert len(s) == 20  # the epoch's per-rank length
    s.set_epoch(2, start_index=20)
    assert list(s) == []
    with pytest.raises(ValueError):
        s.set_epoch(2, start_index=21)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="cannot be shared by 4 ranks"):
        DistributedWeightedSampler(3, 4, 0)
    with pytest.raises(ConfigError):
        DistributedWeightedSampler(10, 2, 2)
    with pytest.raises(ValueError, match="shape"):
        DistributedWeightedSampler(10, 1, 0, weights=np.ones(9))
    with pytest.raises(ValueError, match="non-negative"):
        DistributedWeightedSampler(3, 1, 0, weights=np.array([1.0, -1.0, 1.0]))
