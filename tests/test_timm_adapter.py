"""The timm ViT adapter across the family, entry points, dtypes, grad modes and batches."""
import copy

import pytest
import torch

import vtprune
from vtprune import PiToMe, ToMe

from conftest import small_vit, tiny_vit

POLICIES = [ToMe(r=3), ToMe(r=3, prop_attn=False), PiToMe(ratio=0.8), PiToMe(ratio=0.8, metric="hidden")]


@pytest.mark.parametrize("policy", [ToMe(r=0), ToMe(r=[0, 0]), PiToMe(ratio=1.0)])
def test_identity_policies_are_bitwise_identical(policy, images64):
    model = small_vit()
    pristine = copy.deepcopy(model)
    handle = vtprune.apply(model, policy)
    with torch.no_grad():
        assert torch.equal(model(images64), pristine(images64))
    assert handle.trace.tokens() == [17, 17, 17, 17]
    assert [layer.reduced for layer in handle.trace.layers()] == ["none"] * 4
    handle.remove()


def test_token_counts_on_197_tokens(images224):
    model = tiny_vit(dtype=torch.float32)
    x = images224[:1].float()
    expected = {8: 101, 13: 41, 16: 11, (16, -1): 10, 100: 2}
    for r, final in expected.items():
        with vtprune.applied(model, ToMe(r=r)) as handle, torch.no_grad():
            model(x)
            assert handle.trace.final_tokens() == final, r
            assert handle.size.sum().item() == 197
    with vtprune.applied(model, ToMe(r=16)) as handle, torch.no_grad():
        model(x)
        assert handle.trace.tokens() == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    for ratio, final in {0.975: 151, 0.95: 111, 0.925: 82, 0.9: 60, 0.8: 17}.items():
        with vtprune.applied(model, PiToMe(ratio=ratio)) as handle, torch.no_grad():
            model(x)
            assert handle.trace.final_tokens() == final, ratio


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_batch_invariance(policy, images64):
    model = small_vit(dtype=torch.float64)
    x = images64.double()
    with vtprune.applied(model, policy) as handle, torch.no_grad():
        batched = model(x)
        batch_assignment = handle.assignment.clone()
        for i in range(x.shape[0]):
            single = model(x[i:i + 1])
            torch.testing.assert_close(single[0], batched[i], atol=1e-12, rtol=0)
            assert torch.equal(handle.assignment[0], batch_assignment[i])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 3e-2), (torch.bfloat16, 1e-1),
                                        (torch.float64, 1e-12)])
def test_dtypes(dtype, tol, images64):
    reference_model = small_vit(dtype=torch.float64)
    model = copy.deepcopy(reference_model).to(dtype)
    x = images64.double()
    with vtprune.applied(reference_model, ToMe(r=2)), torch.no_grad():
        reference = reference_model(x)
    with vtprune.applied(model, ToMe(r=2)) as handle, torch.no_grad():
        out = model(x.to(dtype))
        assert out.dtype == dtype
        assert handle.size.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert handle.trace.final_tokens() == 9
    assert torch.isfinite(out).all()
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(out.double(), reference, atol=tol, rtol=0)
    else:  # low precision may flip near-tie matches; most logits must still agree closely
        close = ((out.double() - reference).abs() < tol).float().mean()
        assert close > 0.9


def test_no_grad_and_inference_mode(images64):
    model = small_vit()
    with vtprune.applied(model, ToMe(r=2)) as handle:
        with torch.no_grad():
            a = model(images64)
        with torch.inference_mode():
            b = model(images64)
        assert torch.equal(a, b)
        assert handle.trace.final_tokens() == 9


@pytest.mark.parametrize("policy", [ToMe(r=2), PiToMe(ratio=0.8)], ids=str)
def test_training_mode_gradients_flow_through_merges(policy):
    model = small_vit(drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    with vtprune.applied(model, policy) as handle:
        out = model(x)
        out.square().sum().backward()
        assert handle.trace.final_tokens() < 17
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert model.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0


def test_layerscale_model_is_kept(images64):
    """DeiT-III (LayerScale): r=0 is exact and merging still applies ls1/ls2 (official ToMe drops them)."""
    model = small_vit("deit3_small_patch16_224", init_values=0.5)
    pristine = copy.deepcopy(model)
    with vtprune.applied(model, ToMe(r=0)), torch.no_grad():
        assert torch.equal(model(images64), pristine(images64))
    # With an enormous LayerScale the residual branches dominate; dropping them would change everything.
    with torch.no_grad():
        for block in model.blocks:
            block.ls1.gamma.fill_(0.0)
            block.ls2.gamma.fill_(0.0)
    with vtprune.applied(model, ToMe(r=4)), torch.no_grad():
        zero_branch = model.forward_features(images64)
    # gamma = 0: blocks are identities, so merged CLS equals the embedded CLS token after the final norm
    embedded = model.norm(model._pos_embed(model.patch_embed(images64)))
    torch.testing.assert_close(zero_branch[:, 0], embedded[:, 0])


def test_qk_norm_and_clip_variants(images64):
    for name, kwargs in [("vit_tiny_patch16_224", {"qk_norm": True}),
                         ("vit_base_patch16_clip_224", {}),
                         ("vit_tiny_patch16_224", {"attn_layer": "attn", "scale_attn_norm": True})]:
        model = small_vit(name, **kwargs)
        pristine = copy.deepcopy(model)
        with vtprune.applied(model, ToMe(r=0)), torch.no_grad():
            assert torch.equal(model(images64), pristine(images64)), name
        with vtprune.applied(model, ToMe(r=2)) as handle, torch.no_grad():
            out = model(images64)
            assert handle.trace.final_tokens() == 9
            assert torch.isfinite(out).all()


def test_keys_are_taken_after_k_norm(images64):
    """With q/k-norm, the ToMe metric is the normalised key that attention actually uses."""
    model = small_vit("vit_tiny_patch16_224", qk_norm=True, dtype=torch.float64)
    seen = {}
    original = ToMe.reduce

    def spy(self, view):
        if view.layer == 0:
            seen["keys"] = view.keys
        return original(self, view)

    ToMe.reduce = spy
    try:
        with vtprune.applied(model, ToMe(r=2)), torch.no_grad():
            model(images64.double())
    finally:
        ToMe.reduce = original
    block = model.blocks[0]
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(images64.double())))
        qkv = block.attn.qkv(block.norm1(tokens)).reshape(4, 17, 3, 2, 32).permute(2, 0, 3, 1, 4)
        expected = block.attn.k_norm(qkv[1]).mean(1)
    torch.testing.assert_close(seen["keys"], expected)


@pytest.mark.parametrize("class_token", [True, False])
def test_register_tokens_are_protected(class_token, images64):
    model = small_vit("vit_tiny_patch16_224", reg_tokens=4, class_token=class_token,
                      global_pool="token" if class_token else "avg")
    roles = ("cls",) * class_token + ("register",) * 4
    prefix = len(roles)
    assert vtprune.inspect(model).protected == roles
    for policy in [ToMe(r=8), PiToMe(ratio=0.5)]:
        with vtprune.applied(model, policy) as handle, torch.no_grad():
            out = model(images64)
            assignment = handle.assignment
            assert torch.equal(assignment[:, :prefix], torch.arange(prefix).expand(4, prefix))
            assert (handle.size[:, :prefix] == 1).all()
            assert handle.size.sum(1).flatten().tolist() == [16.0 + prefix] * 4
            # a prefix token never absorbs a patch token
            assert (assignment[:, prefix:] >= prefix).all()
            assert torch.isfinite(out).all()


def test_distillation_token_stays_in_place(images224):
    model = tiny_vit("deit_tiny_distilled_patch16_224", dtype=torch.float32)
    for policy in [ToMe(r=16), PiToMe(ratio=0.9)]:
        with vtprune.applied(model, policy) as handle, torch.no_grad():
            model(images224[:2].float())
            assert torch.equal(handle.assignment[:, :2], torch.tensor([[0, 1]] * 2))
            assert (handle.size[:, :2] == 1).all()
            assert (handle.assignment[:, 2:] >= 2).all()
    with vtprune.applied(model, ToMe(r=16)) as handle, torch.no_grad():
        model(images224[:1].float())
        assert handle.trace.final_tokens() == 12


def test_avg_pool_is_size_weighted(images64):
    model = small_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg", fc_norm=False)
    with vtprune.applied(model, ToMe(r=3)) as handle, torch.no_grad():
        features = model.forward_features(images64)
        pooled = model.forward_head(features, pre_logits=True)
        size = handle.size
        expected = (features * size).sum(1) / size.sum(1)
        torch.testing.assert_close(pooled, expected)
        assert not torch.allclose(pooled, features.mean(1))
        # forward() pools inside the same call and agrees with forward_features + forward_head
        torch.testing.assert_close(model(images64), model.forward_head(model.forward_features(images64)))


def test_forward_head_after_forward_features(images64):
    model = small_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    with vtprune.applied(model, PiToMe(ratio=0.7)), torch.no_grad():
        direct = model(images64)
        features = model.forward_features(images64)
        head = model.forward_head(features)
        again = model.forward_features(images64)
    torch.testing.assert_close(head, direct)
    torch.testing.assert_close(again, features)


def test_forward_head_refuses_merged_tokens_of_unknown_sizes(images64):
    model = small_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    flipped = images64.flip(-1)
    with vtprune.applied(model, ToMe(r=3)), torch.no_grad():
        features = model.forward_features(flipped)
        final, _ = model.forward_intermediates(images64)
        # the tensor forward_intermediates returned pools with its own sizes, not the flipped ones
        torch.testing.assert_close(model.forward_head(final), model(images64))
        with pytest.raises(ValueError, match="sizes are unknown"):
            model.forward_head(features.clone())
        unmerged = torch.randn(4, 16, 64)
        torch.testing.assert_close(model.forward_head(unmerged, pre_logits=True), model.fc_norm(unmerged.mean(1)))


def test_forward_intermediates_unmerged_to_the_grid(images64):
    model = small_vit()
    with vtprune.applied(model, ToMe(r=2)) as handle, torch.no_grad():
        final, intermediates = model.forward_intermediates(images64)
        features = model.forward_features(images64)
        assert handle.trace.final_tokens() == 9
        torch.testing.assert_close(final, features)
        assert [tuple(t.shape) for t in intermediates] == [(4, 64, 4, 4)] * 4
        nlc = model.forward_intermediates(images64, indices=[1, 3], output_fmt="NLC", intermediates_only=True,
                                          return_prefix_tokens=True)
        assert [tuple(t.shape) for t, _ in nlc] == [(4, 16, 64)] * 2
        assert [tuple(p.shape) for _, p in nlc] == [(4, 1, 64)] * 2
        # every patch of the last intermediate carries the value of the merged token that contains it
        last_tokens, _ = nlc[1]
        assignment = handle.assignment[:, 1:] - 1
        for b in range(4):
            for group in assignment[b].unique():
                members = last_tokens[b][assignment[b] == group]
                assert torch.equal(members, members[:1].expand_as(members))
        layers = model.get_intermediate_layers(images64, n=2, reshape=True)
        assert [tuple(t.shape) for t in layers] == [(4, 64, 4, 4)] * 2
        as_dict = model.forward_intermediates(images64, output_dict=True, return_prefix_tokens=True)
        assert set(as_dict) == {"image_intermediates", "image_intermediates_prefix", "image_features"}


def test_entry_points_one_after_another(images64):
    model = small_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    with vtprune.applied(model, ToMe(r=2)) as handle, torch.no_grad():
        model.forward_intermediates(images64[:2])
        assert handle.trace.batch_size == 2
        features = model.forward_features(images64)
        assert handle.trace.batch_size == 4 and features.shape[1] == 8
        logits = model(images64[:1])
        assert handle.trace.batch_size == 1 and logits.shape == (1, 10)


def test_caller_attention_mask_is_rejected(images64):
    model = small_vit()
    with vtprune.applied(model, ToMe(r=2)), torch.no_grad():
        with pytest.raises(ValueError, match="attn_mask"):
            model.forward_features(images64, attn_mask=torch.zeros(17, 17, dtype=torch.bool))


def test_unsupported_block_layout_raises():
    model = small_vit()
    del model.blocks[0].ls1
    with pytest.raises(ValueError, match="lacks ls1"):
        vtprune.apply(model, ToMe(r=2))
    assert vtprune.handle_of(model) is None


def test_attention_stays_on_sdpa_with_log_size_as_float_mask(images64, monkeypatch):
    """Proportional attention enters timm's fused SDPA call as an additive float mask log(size)."""
    import torch.nn.functional as F

    model = small_vit(dtype=torch.float64)
    assert all(block.attn.fused_attn for block in model.blocks)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with vtprune.applied(model, ToMe(r=2)), torch.no_grad():
        model(images64.double())
    assert len(calls) == 4 and calls[0] is None
    for layer, mask in enumerate(calls[1:], start=1):
        assert mask.dtype == torch.float64 and mask.shape == (4, 1, 1, 17 - 2 * layer)
    torch.testing.assert_close(calls[-1].exp().sum(-1).flatten(), torch.full((4,), 17.0, dtype=torch.float64))
    calls.clear()
    with vtprune.applied(model, ToMe(r=2, prop_attn=False)), torch.no_grad():
        model(images64.double())
    assert calls == [None] * 4


def test_forward_intermediates_rejects_unknown_output_format(images64):
    model = small_vit()
    with vtprune.applied(model, ToMe(r=2)), torch.no_grad():
        with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
            model.forward_intermediates(images64, output_fmt="NHWC")


def test_gradient_checkpointing_in_training_is_refused_clearly():
    model = small_vit().train()
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    with vtprune.applied(model, ToMe(r=2)):
        with pytest.raises(ValueError, match="gradient checkpointing is on.*set_grad_checkpointing\\(False\\)"):
            model(x)
        with torch.no_grad():
            assert model(x).shape == (2, 10)  # no backward, no recomputation: allowed
        model.set_grad_checkpointing(False)
        model(x).square().sum().backward()


def test_gradient_checkpointing_in_eval_mode_is_refused_too():
    """timm checkpoints its blocks whenever grad_checkpointing is set, in eval mode too (saliency maps and
    attacks take gradients of eval-mode models)."""
    model = small_vit().eval()
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    with vtprune.applied(model, ToMe(r=2)):
        with pytest.raises(ValueError, match="gradient checkpointing is on while gradients are recorded"):
            model(x)
        with torch.no_grad():
            assert model(x).shape == (2, 10)


@pytest.mark.parametrize("policy, minimum", [(ToMe(r=2), 0.9), (PiToMe(ratio=0.8), 0.5)], ids=str)
def test_bfloat16_matching_runs_in_float32(policy, minimum):
    """Scores are computed in float32 for half-precision models, so most bf16 merge decisions equal the
    fp32 ones (with bf16 scores PiToMe agreed on 3 of 16 samples of this seeded model, now on 10)."""
    model32 = small_vit()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with vtprune.applied(model32, policy) as handle, torch.no_grad():
        model32(x)
        reference = handle.assignment.clone()
    with vtprune.applied(model16, policy) as handle, torch.no_grad():
        model16(x.bfloat16())
        agreement = (handle.assignment == reference).all(1).float().mean().item()
    assert agreement >= minimum


def test_a_pool_that_cannot_weigh_merged_tokens_is_refused():
    """timm's 'prr' pool (parameter-free self-attention, then token or mean) has no way to take token sizes."""
    model = small_vit(global_pool="prr")
    with pytest.raises(ValueError, match="AttentionPoolPrr \\(global_pool='prr'\\).*'token', 'avg', 'avgmax', 'max', 'map'"):
        vtprune.apply(model, ToMe(r=2))
    assert vtprune.handle_of(model) is None
