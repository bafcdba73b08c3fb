"""The pure functions: matching, merging, source maps."""
import torch

from vtprune.matching import bipartite_soft_matching, pitome_matching, pitome_removed_count
from vtprune.reduction import (MergePlan, assignment_to_source, merge_weighted, unmerge, update_assignment)


def unit(*vectors):
    return torch.nn.functional.normalize(torch.tensor(vectors, dtype=torch.float64), dim=-1)[None]


def test_bipartite_matching_merges_the_most_similar_pairs():
    # tokens: 0 cls | 1 x | 2 x' (~x) | 3 y | 4 z | 5 y' (~y)
    metric = unit([1, 0, 0, 0], [0, 1, 0, 0], [0, 0.99, 0.1, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0.05, 1, 0])
    plan = bipartite_soft_matching(metric, r=1, num_protected=1)
    # A = {0 cls, 2 x', 4 z}, B = {1 x, 3 y, 5 y'}; the best edge is x' -> x (0.99)
    assert plan.keep.tolist() == [[0, 4, 1, 3, 5]]  # [cls, unmerged A, B]
    assert plan.src.tolist() == [[2]] and plan.dst.tolist() == [[2]]  # x' merged into x (output slot 2)
    plan = bipartite_soft_matching(metric, r=2, num_protected=1)
    assert plan.keep.tolist() == [[0, 1, 3, 5]]
    assert plan.src.tolist() == [[2, 4]] and plan.dst.tolist() == [[1, 1]]  # z's best (all 0) is B's first
    assert bipartite_soft_matching(metric, r=0) is None
    assert bipartite_soft_matching(metric[:, :1], r=4, num_protected=1) is None


def test_cap_and_protection():
    metric = torch.randn(3, 11, 8, generator=torch.Generator().manual_seed(0))
    plan = bipartite_soft_matching(metric, r=100, num_protected=3)
    assert plan.src.shape == (3, 4)  # (11 - 3) // 2
    assert plan.keep.shape == (3, 7)
    assert torch.equal(plan.keep[:, :3], torch.arange(3).expand(3, 3))
    assert (plan.src >= 3).all() and (plan.dst >= 3).all()
    merged = set(plan.src.flatten().tolist())
    assert not merged & {0, 1, 2}


def test_merge_weighted_is_a_size_weighted_mean():
    x = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]], dtype=torch.float64)
    size = torch.tensor([[[1.0], [3.0], [1.0], [2.0]]], dtype=torch.float64)
    plan = MergePlan(keep=torch.tensor([[0, 1]]), src=torch.tensor([[2, 3]]), dst=torch.tensor([[1, 1]]))
    out, new_size = merge_weighted(x, size, plan)
    assert new_size.flatten().tolist() == [1.0, 6.0]
    assert out.flatten().tolist() == [1.0, (3 * 3 + 5 * 1 + 7 * 2) / 6]


def test_assignment_source_and_unmerge():
    plan = MergePlan(keep=torch.tensor([[0, 3, 1]]), src=torch.tensor([[2]]), dst=torch.tensor([[2]]))
    assignment = update_assignment(torch.arange(5)[None], plan, 5)
    assert assignment.tolist() == [[0, 2, 2, 1, -1]]  # token 4 was dropped
    source = assignment_to_source(assignment, 3)
    assert source.tolist() == [[[1, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]]
    tokens = torch.tensor([[[10.0], [20.0], [30.0]]])
    assert unmerge(tokens, assignment).flatten().tolist() == [10.0, 30.0, 30.0, 20.0, 0.0]
    second = MergePlan(keep=torch.tensor([[0, 2]]), src=torch.tensor([[1]]), dst=torch.tensor([[1]]))
    assert update_assignment(assignment, second, 3).tolist() == [[0, 1, 1, 1, -1]]


def test_pitome_counts_use_floor_of_t_minus_t_ratio():
    assert pitome_removed_count(10, 0.9) == 1  # floor(10 * (1 - 0.9)) would give 0
    assert pitome_removed_count(196, 0.9) == 19
    assert pitome_removed_count(196, 1.0) == 0


def test_pitome_matching_keeps_low_energy_tokens():
    generator = torch.Generator().manual_seed(0)
    cluster = torch.randn(1, 1, 16, generator=generator, dtype=torch.float64)
    background = cluster + 0.01 * torch.randn(1, 8, 16, generator=generator, dtype=torch.float64)
    outliers = torch.randn(1, 4, 16, generator=generator, dtype=torch.float64)
    metric = torch.cat([torch.randn(1, 1, 16, dtype=torch.float64), background, outliers], dim=1)
    plan = pitome_matching(metric, r=4, margin=0.5, num_protected=1, bsm=False)
    merged = set(plan.src.flatten().tolist()) | set(plan.keep[0, -4:].tolist())
    assert merged <= set(range(1, 9))  # only background tokens (1..8) take part in merges
    assert set(plan.keep[0, 1:5].tolist()) == {9, 10, 11, 12}  # the outliers are protected
    assert pitome_matching(metric, r=100, margin=0.5, num_protected=1).src.shape == (1, 6)  # capped at T//2
    assert pitome_matching(metric, r=0, margin=0.5) is None
