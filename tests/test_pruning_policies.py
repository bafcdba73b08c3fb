"""FlowCut, VisionZip, RandomKeep and Pool2d as policies: arguments, spec round trips, the pure functions,
and FlowCut on stand-alone CLIP/SigLIP towers."""
import math

import pytest
import torch
import torch.nn.functional as F

import vtprune
from conftest import small_vit
from vtprune.methods.baselines import pool_plan
from vtprune.methods.flowcut import adaptive_prune_count
from vtprune.methods.visionzip import split_budget
from vtprune.reduction import merge_weighted

POLICIES = [vtprune.FlowCut(keep=64), vtprune.FlowCut(keep=32, interval=3, history=0.6),
            vtprune.VisionZip(), vtprune.VisionZip(keep=128), vtprune.VisionZip(dominant=20, contextual=0),
            vtprune.RandomKeep(keep=64, seed=3), vtprune.Pool2d(keep=144)]


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_spec_and_dict_round_trips(policy):
    assert vtprune.make_policy(policy.to_spec()) == policy
    assert vtprune.Policy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize("make,message", [
    (lambda: vtprune.FlowCut(keep=0), "keep must be an integer >= 1"),
    (lambda: vtprune.FlowCut(interval=0), "interval must be an integer >= 1"),
    (lambda: vtprune.FlowCut(history=1.0), "history must be in \\[0.0, 1.0\\)"),
    (lambda: vtprune.VisionZip(dominant=54), "give both dominant and contextual, or keep alone"),
    (lambda: vtprune.VisionZip(dominant=54, contextual=10, keep=60), "keep=60 but dominant \\+ contextual = 64"),
    (lambda: vtprune.VisionZip(dominant=0, contextual=10), "dominant must be an integer >= 1"),
    (lambda: vtprune.RandomKeep(keep=0), "keep must be an integer >= 1"),
    (lambda: vtprune.RandomKeep(seed=-1), "seed must be an integer >= 0"),
    (lambda: vtprune.Pool2d(keep=10), "keep must be a square number"),
])
def test_bad_arguments_name_what_is_accepted(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_visionzip_budget_splits_are_the_papers():
    assert [split_budget(keep) for keep in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert (vtprune.VisionZip(keep=64).dominant, vtprune.VisionZip(keep=64).contextual) == (54, 10)


def test_adaptive_prune_count_by_hand():
    uniform = torch.full((1, 100), 0.01, dtype=torch.float64)
    assert adaptive_prune_count(uniform, 4, 20) == 0  # maximal entropy: nothing pruned
    peaked = torch.tensor([[0.5] + [0.5 / 99] * 99], dtype=torch.float64)
    prob = peaked[0] / peaked[0].sum()
    ratio = float(-(prob * prob.log()).sum()) / math.log(100)
    expected = round((100 - 20) / math.sqrt(4) * (1 - ratio ** 2))
    assert adaptive_prune_count(peaked, 4, 20) == expected and expected > 0
    assert adaptive_prune_count(torch.cat([uniform, peaked]), 4, 20) == expected  # max over the batch


def test_pool_plan_is_average_pooling():
    grid = torch.randn(2, 36, 5, dtype=torch.float64)
    tokens = torch.cat([torch.randn(2, 1, 5, dtype=torch.float64), grid], dim=1)  # a CLS in front
    plan = pool_plan((6, 6), (2, 2), 1, 2, tokens.device)
    pooled, size = merge_weighted(tokens, torch.ones(2, 37, 1, dtype=torch.float64), plan)
    expected = F.avg_pool2d(grid.view(2, 6, 6, 5).permute(0, 3, 1, 2), 3).flatten(2).transpose(1, 2)
    assert torch.equal(pooled[:, 0], tokens[:, 0])
    torch.testing.assert_close(pooled[:, 1:], expected, rtol=0, atol=1e-12)
    assert size[:, 1:].flatten().tolist() == [9.0] * 8


def test_random_keep_is_seeded_and_ignores_the_global_generator():
    policy = vtprune.RandomKeep(keep=10, seed=1)
    first = policy.positions(576)
    torch.manual_seed(123)
    torch.rand(7)  # moves the global generator, which the policy must not read
    assert torch.equal(first, vtprune.RandomKeep(keep=10, seed=1).positions(576))
    assert not torch.equal(policy.positions(576), vtprune.RandomKeep(keep=10, seed=2).positions(576))
    assert bool((policy.positions(576).diff() > 0).all())


def test_policies_outside_their_adapters_are_refused_clearly():
    with pytest.raises(ValueError, match="needs signals \\['qkv'\\] that adapter 'timm-vit' does not offer"):
        vtprune.apply(small_vit(), vtprune.FlowCut(keep=4))


def clip_tower(kind: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=24, num_attention_heads=2,
                  image_size=336, patch_size=14)
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**config)) if kind == "clip" else SiglipVisionModel(
        SiglipVisionConfig(**config))
    return model.double().eval()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_flowcut_on_a_stand_alone_tower_cuts_before_the_last_layer(kind):
    model = clip_tower(kind)
    pixels = torch.randn(2, 3, 336, 336, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prefix = 1 if kind == "clip" else 0
    with torch.no_grad(), vtprune.applied(model, vtprune.FlowCut(keep=100)) as handle:
        out = model(pixel_values=pixels, output_hidden_states=True)
    layers = handle.trace.layers("vision")
    assert layers[22].tokens_out == 100 + prefix and layers[23].tokens_in == 100 + prefix  # L_rem = 22 - layer
    assert out.last_hidden_state.shape[1] == 100 + prefix
    assert all(state.shape[1] == 576 + prefix for state in out.hidden_states)  # unmerged to every token
    pruned_at = {layer.layer for layer in layers if layer.tokens_out < layer.tokens_in}
    assert pruned_at <= set(range(0, 23, 2)) and 22 in pruned_at


def test_post_placement_is_refused_where_the_adapter_has_no_post_point_and_runs_on_hf_towers():
    policy = vtprune.PiToMe.preset("clip_hf", ratio=0.9)
    with pytest.raises(ValueError, match="placement 'post', but adapter 'timm-vit' offers 'mid'"):
        vtprune.apply(small_vit(), policy)
    model = clip_tower("clip")
    pixels = torch.randn(1, 3, 336, 336, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vtprune.applied(model, policy) as handle:
        out = model(pixel_values=pixels, output_hidden_states=True)
    assert handle.trace.tokens_in()[1:] == handle.trace.tokens()[:-1]  # each layer runs on what the last left
    assert out.last_hidden_state.shape[1] == policy.token_schedule(577, 24, 1)[-1][0] - math.floor(
        (policy.token_schedule(577, 24, 1)[-1][0] - 1) * 0.1)
    assert all(state.shape[1] == 577 for state in out.hidden_states)
