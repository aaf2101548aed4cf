"""NonIIDSampler: equal, disjoint, skewed, deterministic shards."""

from __future__ import annotations

import pytest
import torch

from lightning_localsgd import NonIIDSampler
from lightning_localsgd.data.samplers import _rounded_counts

LABELS = torch.arange(1000) % 10


def shards(scheme: str, world: int = 4, **kwargs) -> list[list[int]]:
    return [list(NonIIDSampler(LABELS, num_replicas=world, rank=r, scheme=scheme, **kwargs)) for r in range(world)]


@pytest.mark.parametrize("scheme", ["label_sorted", "dirichlet", "iid"])
def test_shards_are_equal_sized_and_disjoint(scheme):
    parts = shards(scheme, world=3)
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == 1000 // 3
    assert len(set().union(*map(set, parts))) == sum(len(p) for p in parts)


def test_label_sorted_gives_each_rank_few_classes():
    for rank, part in enumerate(shards("label_sorted", world=5)):
        assert set(LABELS[part].tolist()) == {2 * rank, 2 * rank + 1}  # rank r: the r-th block of sorted labels


def test_label_sorted_breaks_ties_within_a_class_by_the_seed():
    # 3 ranks of 333: class 3 (sorted positions 300..399) is cut between ranks 0 and 1.
    a, b = (shards("label_sorted", world=3, seed=seed) for seed in (1, 2))
    for part_a, part_b in zip(a, b):
        assert set(LABELS[part_a].tolist()) == set(LABELS[part_b].tolist())  # the same classes for either seed ...
    assert set(a[0]) != set(b[0])  # ... but which samples of the class that is cut go where follows the seed


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def mean_classes(alpha):
        return sum(len(set(LABELS[p].tolist())) for p in shards("dirichlet", alpha=alpha)) / 4

    def top_class_share(alpha):
        parts = shards("dirichlet", alpha=alpha)
        return sum(torch.bincount(LABELS[p], minlength=10).max().item() / len(p) for p in parts) / 4

    # A class has 100 samples and a shard 250, so no class can exceed 40 % of a shard.
    assert top_class_share(0.05) > 0.3 > 0.15 > top_class_share(100.0)
    assert mean_classes(0.05) <= 5 and mean_classes(100.0) == 10


def test_split_depends_on_the_seed_and_order_on_the_epoch():
    a = NonIIDSampler(LABELS, num_replicas=2, rank=0, scheme="dirichlet", seed=1)
    b = NonIIDSampler(LABELS, num_replicas=2, rank=0, scheme="dirichlet", seed=1)
    c = NonIIDSampler(LABELS, num_replicas=2, rank=0, scheme="dirichlet", seed=2)
    assert list(a) == list(b) and set(a) != set(c)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)


def test_without_shuffle_the_order_is_fixed():
    s = NonIIDSampler(LABELS, num_replicas=2, rank=1, shuffle=False)
    first = list(s)
    s.set_epoch(3)
    assert list(s) == first
    # Rank 1 of 2 holds the upper half of the label-sorted data (labels 5..9), in label order.
    assert sorted(first) == [i for i in range(1000) if LABELS[i] >= 5]
    assert LABELS[first].tolist() == sorted(LABELS[first].tolist())


def test_dirichlet_counts_are_the_largest_remainder_rounding_of_the_proportions():
    proportions = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    # 7 x: (0.7, 4.2, 2.1); floors (0, 4, 2) leave 1, which goes to the largest remainder (0.7).
    assert _rounded_counts(proportions, 7).tolist() == [1, 4, 2]
    # 9 x: (0.9, 5.4, 2.7); floors (0, 5, 2) leave 2, for the two largest remainders (0.9 and 0.7).
    assert _rounded_counts(proportions, 9).tolist() == [1, 5, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"scheme": "sorted"}, "scheme"), ({"scheme": "dirichlet", "alpha": 0}, "alpha")]
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NonIIDSampler(LABELS, num_replicas=2, rank=0, **kwargs)


def test_single_process_without_a_process_group_gets_everything():
    assert len(NonIIDSampler(LABELS)) == 1000
