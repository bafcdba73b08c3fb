"""The open_clip VisionTransformer adapter: identity, token counts, removal, layouts, pooling, equivalence."""
import copy
from functools import partial

import pytest
import timm
import torch
from open_clip.transformer import Transformer, VisionTransformer
from torch import nn

import vtprune
from vtprune import PiToMe, ToMe

from conftest import check_already_patched_rules, check_copy_and_pickle_rules
from seeded import seeded_images, seeded_init_

CONFIG = dict(image_size=32, patch_size=8, width=64, layers=3, heads=2, mlp_ratio=2.0, output_dim=32)


def tower(seed: int = 0, **kwargs) -> VisionTransformer:
    """A tiny open_clip vision tower (16 patches + CLS, 3 blocks) in float64 with seeded weights."""
    model = VisionTransformer(**{**CONFIG, **kwargs})
    seeded_init_(model, seed)
    return model.double().eval()


def sequence_first(model: VisionTransformer) -> VisionTransformer:
    """The same tower with the old LND block layout (blocks see ``[N, B, C]``)."""
    lnd = copy.deepcopy(model)
    lnd.transformer = Transformer(CONFIG["width"], CONFIG["layers"], CONFIG["heads"], CONFIG["mlp_ratio"],
                                  batch_first=False).double().eval()
    lnd.transformer.load_state_dict(model.transformer.state_dict())
    return lnd


@pytest.fixture
def images():
    return seeded_images(4, 32)


@pytest.mark.parametrize("policy", [ToMe(r=0), PiToMe(ratio=1.0)], ids=str)
@pytest.mark.parametrize("output_tokens", [False, True])
def test_identity_policies_are_bitwise_identical(policy, output_tokens, images):
    model = tower(output_tokens=output_tokens)
    pristine = copy.deepcopy(model)
    with vtprune.applied(model, policy) as handle, torch.no_grad():
        out, reference = model(images), pristine(images)
        for a, b in zip(out if output_tokens else [out], reference if output_tokens else [reference]):
            assert torch.equal(a, b)
        assert handle.trace.tokens() == [17, 17, 17]


def test_tome_token_counts_and_protected_cls(images):
    model = tower()
    with vtprune.applied(model, ToMe(r=2)) as handle, torch.no_grad():
        model(images)
        assert handle.trace.tokens() == [15, 13, 11]
        assert torch.equal(handle.size.sum(dim=1).squeeze(-1), torch.full((4,), 17.0, dtype=torch.float64))
        assert (handle.assignment[:, 0] == 0).all()
        assert (handle.size[:, 0] == 1).all()
        assert (handle.assignment[:, 1:] > 0).all()


@pytest.mark.parametrize("policy", [ToMe(r=2), "pitome:ratio=0.8"], ids=str)
def test_remove_restores_exactly(policy, images):
    model = tower()
    pristine = copy.deepcopy(model)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    modules = list(model.modules())
    dicts_before = [set(module.__dict__) for module in modules]
    handle = vtprune.apply(model, policy)
    with torch.no_grad():
        merged = model(images)
    assert handle.trace.final_tokens() < 17
    handle.remove()
    assert [set(module.__dict__) for module in modules] == dicts_before
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(images), pristine(images))
        assert not torch.equal(merged, pristine(images))


@pytest.mark.parametrize("policy", [ToMe(r=2), ToMe(r=2, prop_attn=False), PiToMe(ratio=0.8),
                                    PiToMe.preset("clip", ratio=0.8)], ids=str)
def test_batch_invariance(policy, images):
    model = tower()
    with vtprune.applied(model, policy) as handle, torch.no_grad():
        batched = model(images)
        batch_assignment = handle.assignment.clone()
        for i in range(images.shape[0]):
            single = model(images[i:i + 1])
            torch.testing.assert_close(single[0], batched[i], atol=1e-12, rtol=0)
            assert torch.equal(handle.assignment[0], batch_assignment[i])


def _timm_twin(model: VisionTransformer) -> nn.Module:
    """A timm ViT with the open_clip tower's weights (same math: ln_pre, pre-norm blocks, ln_post, CLS, proj)."""
    twin = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                             depth=3, num_heads=2, mlp_ratio=2.0, num_classes=32, pre_norm=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-5)).double().eval()
    state = {"cls_token": model.class_embedding.view(1, 1, -1), "pos_embed": model.positional_embedding[None],
             "patch_embed.proj.weight": model.conv1.weight,
             "norm_pre.weight": model.ln_pre.weight, "norm_pre.bias": model.ln_pre.bias,
             "norm.weight": model.ln_post.weight, "norm.bias": model.ln_post.bias,
             "head.weight": model.proj.t(), "head.bias": torch.zeros(32)}
    for i, block in enumerate(model.transformer.resblocks):
        parts = {"norm1": block.ln_1, "norm2": block.ln_2, "attn.proj": block.attn.out_proj,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for name, module in parts.items():
            state[f"blocks.{i}.{name}.weight"], state[f"blocks.{i}.{name}.bias"] = module.weight, module.bias
        state[f"blocks.{i}.attn.qkv.weight"] = block.attn.in_proj_weight
        state[f"blocks.{i}.attn.qkv.bias"] = block.attn.in_proj_bias
    twin.load_state_dict({key: value.detach().double() for key, value in state.items()})
    return twin


@pytest.mark.parametrize("policy", [ToMe(r=2), ToMe(r=4, prop_attn=False), PiToMe(ratio=0.8)], ids=str)
def test_matches_the_timm_adapter_on_the_same_weights(policy, images):
    model = tower()
    twin = _timm_twin(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), twin(images), atol=1e-12, rtol=0)
    with vtprune.applied(model, policy) as ours, vtprune.applied(twin, policy) as theirs, torch.no_grad():
        out, reference = model(images), twin(images)
        assert ours.trace.tokens() == theirs.trace.tokens()
        assert torch.equal(ours.assignment, theirs.assignment)
        torch.testing.assert_close(out, reference, atol=1e-12, rtol=0)


@pytest.mark.parametrize("policy", [ToMe(r=0), ToMe(r=2), PiToMe(ratio=0.8)], ids=str)
def test_sequence_first_layout(policy, images):
    model = tower()
    lnd = sequence_first(model)
    assert not lnd.transformer.resblocks[0].attn.batch_first
    pristine = copy.deepcopy(lnd)
    with vtprune.applied(model, policy) as ours, vtprune.applied(lnd, policy) as theirs, torch.no_grad():
        out, reference = lnd(images), model(images)
        assert ours.trace.tokens() == theirs.trace.tokens()
        torch.testing.assert_close(out, reference, atol=1e-12, rtol=0)
        if policy == ToMe(r=0):
            assert torch.equal(out, pristine(images))
    assert "[N, B, C]" in " ".join(vtprune.inspect(lnd).notes)


def test_avg_pool_is_size_weighted_and_tokens_are_unmerged(images):
    model = tower(pool_type="avg", output_tokens=True)
    with vtprune.applied(model, ToMe(r=3)) as handle, torch.no_grad():
        pooled, tokens = model(images)
        assert handle.trace.final_tokens() == 8
    assert tokens.shape == (4, 16, 64)  # the full patch grid
    # the size-weighted mean of the merged tokens is the plain mean over the unmerged grid
    torch.testing.assert_close(pooled, tokens.mean(dim=1) @ model.proj, atol=1e-12, rtol=0)
    assert "size-weighted" in " ".join(vtprune.inspect(model).notes)


def test_forward_intermediates_are_unmerged(images):
    model = tower()
    with vtprune.applied(model, ToMe(r=2)) as handle, torch.no_grad():
        out = model.forward_intermediates(images, output_extra_tokens=True)
        assert handle.trace.tokens() == [15, 13, 11]
        features = model(images)
    assert [y.shape for y in out["image_intermediates"]] == [(4, 64, 4, 4)] * 3
    torch.testing.assert_close(out["image_features"], features, atol=0, rtol=0)


def test_attention_pooling_is_noted_and_runs(images):
    model = tower(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    assert "attn_pool" in " ".join(vtprune.inspect(model).notes)
    with vtprune.applied(model, ToMe(r=2)) as handle, torch.no_grad():
        assert model(images).shape == (4, 32)
        assert handle.trace.final_tokens() == 11


def test_custom_blocks_are_rejected():
    model = tower(qk_norm=True)
    with pytest.raises(ValueError, match="ResidualAttentionBlock"):
        vtprune.apply(model, ToMe(r=2))
    assert "forward" not in model.__dict__


def test_gradients_flow_in_training_mode(images):
    model = tower().train()
    with vtprune.applied(model, ToMe(r=2)) as handle:
        model(images).square().sum().backward()
        assert handle.trace.final_tokens() == 11
    grad = model.transformer.resblocks[0].attn.in_proj_weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["batch_first", "sequence_first"])
def test_caller_attn_mask_is_rejected(layout, images):
    model = tower() if layout == "batch_first" else sequence_first(tower())

    def inject(module, args, kwargs):
        return args, {**kwargs, "attn_mask": torch.zeros(17, 17, dtype=images.dtype)}

    hook = model.transformer.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        with torch.no_grad():
            assert model(images).shape == (4, 32)  # unpatched: the mask is accepted
            with vtprune.applied(model, ToMe(r=2)), pytest.raises(ValueError, match="attn_mask"):
                model(images)
    finally:
        hook.remove()


@pytest.mark.parametrize("policy", [ToMe(r=2), PiToMe(ratio=0.8)], ids=str)
def test_training_mode_gradients_reach_the_input_and_every_parameter(policy):
    model = tower().train()
    x = seeded_images(2, 32).requires_grad_(True)
    with vtprune.applied(model, policy) as handle:
        out = model(x)
        assert out.requires_grad
        out.square().sum().backward()
        assert handle.trace.final_tokens() < 17
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.transformer.resblocks[-1].mlp.c_fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_dtypes(dtype, images):
    reference_model = tower()
    model = copy.deepcopy(reference_model).to(dtype)
    with vtprune.applied(reference_model, ToMe(r=2)), torch.no_grad():
        reference = reference_model(images)
    with vtprune.applied(model, ToMe(r=2)) as handle, torch.no_grad():
        out = model(images.to(dtype))
        assert out.dtype == dtype
        assert handle.size.dtype == torch.float32
        assert handle.trace.tokens() == [15, 13, 11]
        assert handle.size.sum(1).flatten().tolist() == [17.0] * 4
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), reference, atol=1e-4, rtol=0)
    else:  # low precision may flip near-tie matches; most values must still agree closely
        assert ((out.double() - reference).abs() < 1e-1).float().mean() > 0.9


def test_no_grad_and_inference_mode(images):
    model = tower()
    with vtprune.applied(model, ToMe(r=2)) as handle:
        with torch.no_grad():
            a = model(images)
        with torch.inference_mode():
            b = model(images)
            assert handle.trace.tokens() == [15, 13, 11]
        assert b.is_inference() and torch.equal(a, b)


def test_deepcopy_of_a_patched_model_is_unpatched_and_pickle_is_refused(images):
    check_copy_and_pickle_rules(tower(), lambda model: model(images), [15, 13, 11])


def test_already_patched_raises_or_replaces(images):
    check_already_patched_rules(tower(), lambda model: model(images), [15, 13, 11])


def test_gradient_checkpointing_in_training_is_refused_clearly():
    model = tower().train()
    model.set_grad_checkpointing(True)
    with vtprune.applied(model, ToMe(r=2)):
        with pytest.raises(ValueError, match="gradient checkpointing is on"):
            model(seeded_images(2, 32))
