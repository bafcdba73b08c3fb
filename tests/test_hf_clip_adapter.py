"""The transformers CLIP / SigLIP vision adapter (tiny configs, seeded float64 weights, sdpa and eager)."""
import copy

import pytest
import torch

import vtprune
from vtprune import PiToMe, ToMe
from vtprune.reduction import unmerge

from oracles import _combine, _tome_destinations
from conftest import check_already_patched_rules, check_copy_and_pickle_rules
from seeded import seeded_images, seeded_init_

IMPLS = ["sdpa", "eager"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=32,
            patch_size=8)


def tiny_tower(kind: str = "clip", impl: str = "sdpa", seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    cls, config = ((CLIPVisionModel, CLIPVisionConfig) if kind == "clip" else (SiglipVisionModel, SiglipVisionConfig))
    model = cls._from_config(config(**TINY), attn_implementation=impl)
    seeded_init_(model, seed)
    return model.double().eval()


@pytest.fixture(scope="module")
def images():
    return seeded_images(3, 32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("policy", [ToMe(r=0), PiToMe(ratio=1.0)], ids=str)
def test_identity_policies_are_bitwise_identical(kind, impl, policy, images):
    model = tiny_tower(kind, impl)
    pristine = copy.deepcopy(model)
    with vtprune.applied(model, policy) as handle, torch.no_grad():
        out, ref = model(images), pristine(images)
        assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
        if ref.pooler_output is not None:
            assert torch.equal(out.pooler_output, ref.pooler_output)
        assert handle.trace.tokens() == [17 if kind == "clip" else 16] * 3
    assert model.config._attn_implementation == impl


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind, counts", [("clip", [15, 13, 11]), ("siglip", [14, 12, 10])])
def test_tome_token_counts_and_remove(kind, counts, impl, images):
    model = tiny_tower(kind, impl)
    pristine = copy.deepcopy(model)
    with torch.no_grad():
        reference = pristine(images).last_hidden_state
        handle = vtprune.apply(model, ToMe(r=2))
        out = model(images)
        assert handle.trace.tokens() == counts
        assert out.last_hidden_state.shape[1] == counts[-1]
        assert handle.size.sum(1).flatten().tolist() == [counts[0] + 2] * 3
        handle.remove()
        assert not any(name == "forward" for m in model.modules() for name in vars(m))
        assert torch.equal(model(images).last_hidden_state, reference)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_batch_invariance(kind, impl, images):
    model = tiny_tower(kind, impl)
    with vtprune.applied(model, ToMe(r=3)) as handle, torch.no_grad():
        batched = model(images)
        assignment = handle.assignment.clone()
        for i in range(images.shape[0]):
            single = model(images[i:i + 1])
            torch.testing.assert_close(single.last_hidden_state[0], batched.last_hidden_state[i], atol=1e-12, rtol=0)
            if batched.pooler_output is not None:
                torch.testing.assert_close(single.pooler_output[0], batched.pooler_output[i], atol=1e-12, rtol=0)
            assert torch.equal(handle.assignment[0], assignment[i])


def test_clip_cls_is_protected_and_pooler_is_post_layernorm_of_cls(images):
    model = tiny_tower("clip")
    with vtprune.applied(model, ToMe(r=4)) as handle, torch.no_grad():
        out = model(images)
        assert torch.all(handle.assignment[:, 0] == 0)
        assert torch.all(handle.size[:, 0, 0] == 1)
        assert torch.equal(out.pooler_output, model.post_layernorm(out.last_hidden_state[:, 0]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("policy", [PiToMe(ratio=0.8), PiToMe(ratio=0.8, metric="hidden"),
                                    PiToMe.preset("clip", ratio=0.8)], ids=str)
def test_pitome_runs(kind, impl, policy, images):
    model = tiny_tower(kind, impl)
    with vtprune.applied(model, policy) as handle, torch.no_grad():
        out = model(images)
    tokens = handle.trace.tokens()
    assert tokens[-1] < tokens[0] and out.last_hidden_state.shape[1] == tokens[-1]
    assert torch.isfinite(out.last_hidden_state).all()


def _functional_tome(model, images, r, has_cls):
    """ToMe on a CLIP/SigLIP tower written from its weights: explicit softmax attention, log-size bias."""
    x = model.embeddings(images)
    if hasattr(model, "pre_layrnorm"):
        x = model.pre_layrnorm(x)
    batch, n0, _ = x.shape
    size = torch.ones(batch, n0, dtype=x.dtype)
    for layer in model.encoder.layers:
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        q, k, v = (proj(h).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        logits = q @ k.transpose(-1, -2) * attn.scale + size.log()[:, None, None, :]
        out = (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = x + attn.out_proj(out)
        plan = _tome_destinations(k.mean(1), r, has_cls, False)
        if plan is not None:
            x, size = _combine(x, size, *plan)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x if hasattr(model, "pre_layrnorm") else model.post_layernorm(x)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tome_matches_functional_computation(kind, impl, images):
    model = tiny_tower(kind, impl)
    with torch.no_grad():
        expected = _functional_tome(model, images, 2, kind == "clip")
        with vtprune.applied(model, ToMe(r=2)):
            out = model(images).last_hidden_state
    # HF's eager attention takes its softmax in float32 even for float64 models
    torch.testing.assert_close(out, expected, atol=1e-10 if impl == "sdpa" else 1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_output_hidden_states_are_unmerged(kind, images):
    model = tiny_tower(kind)
    pristine = copy.deepcopy(model)
    with vtprune.applied(model, ToMe(r=2)) as handle, torch.no_grad():
        out = model(images, output_hidden_states=True)
        ref = pristine(images, output_hidden_states=True)
        n0 = 17 if kind == "clip" else 16
        assert [h.shape[1] for h in out.hidden_states] == [n0] * 4
        assert torch.equal(out.hidden_states[0], ref.hidden_states[0])
        if kind == "clip":  # CLIP's last hidden state is the encoder output itself
            assert torch.equal(out.hidden_states[-1], unmerge(out.last_hidden_state, handle.assignment))
        as_tuple = model(images, output_hidden_states=True, return_dict=False)
        hidden = [item for item in as_tuple if isinstance(item, tuple)][0]
        assert [h.shape[1] for h in hidden] == [n0] * 4
        assert torch.equal(hidden[-1], out.hidden_states[-1])


def test_inspect_and_clip_model_wrapper():
    from transformers import CLIPConfig, CLIPModel

    report = vtprune.inspect(tiny_tower("clip"))
    assert report.adapter == "hf-clip-vision" and report.protected == ("cls",)
    assert report.sites["vision"] == ("encoder.layers.0", "encoder.layers.1", "encoder.layers.2")
    assert set(report.signals) == {"keys", "qkv", "hidden"}
    siglip = vtprune.inspect(tiny_tower("siglip"))
    assert siglip.protected == () and any("weighs merged tokens by size" in note for note in siglip.notes)

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(vision_config=TINY, text_config=text)).eval()
    with pytest.raises(TypeError, match="model.vision_model"):
        vtprune.apply(clip, ToMe(r=2))
    with pytest.raises(TypeError, match="model.vision_model"):
        vtprune.inspect(clip)
    images = seeded_images(2, 32, dtype=torch.float32)
    with vtprune.applied(clip.vision_model, ToMe(r=2)) as handle, torch.no_grad():
        features = clip.get_image_features(pixel_values=images)
        assert handle.trace.tokens() == [15, 13, 11]
    embeds = features if isinstance(features, torch.Tensor) else features.pooler_output
    assert embeds.shape == (2, clip.projection_dim)


def test_caller_attention_mask_is_rejected(images):
    model = tiny_tower("clip")
    with vtprune.applied(model, ToMe(r=2)), pytest.raises(ValueError, match="attention_mask"):
        x = model.embeddings(images)
        vtprune.handle_of(model)._runtime.entry(model.encoder.layers[0])(x, torch.zeros(3, 1, 17, 17,
                                                                                         dtype=x.dtype))


def _inject_attention_mask(model, mask):
    """A caller-supplied attention_mask reaching the encoder layers (as a wrapper passing one would)."""
    def hook(module, args, kwargs):
        return args, {**kwargs, "attention_mask": mask}

    return model.encoder.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_caller_attention_mask_through_the_encoder_is_rejected(kind, images):
    model = tiny_tower(kind)
    n0 = 17 if kind == "clip" else 16
    hook = _inject_attention_mask(model, torch.zeros(3, 1, n0, n0, dtype=images.dtype))
    try:
        with torch.no_grad():
            model(images)  # unpatched: the mask is accepted
            with vtprune.applied(model, ToMe(r=2)), pytest.raises(ValueError, match="attention_mask"):
                model(images)
            with vtprune.applied(model, ToMe(r=0)), pytest.raises(ValueError, match="attention_mask"):
                model(images)  # refused even when nothing would be merged
    finally:
        hook.remove()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("policy", [ToMe(r=2), PiToMe(ratio=0.8)], ids=str)
def test_training_mode_gradients_flow_through_merges(kind, policy):
    model = tiny_tower(kind).train()
    x = seeded_images(2, 32).requires_grad_(True)
    with vtprune.applied(model, policy) as handle:
        out = model(x)
        assert model.training and out.last_hidden_state.requires_grad
        (out.last_hidden_state.square().sum() + out.pooler_output.square().sum()).backward()
        assert handle.trace.final_tokens() < (17 if kind == "clip" else 16)
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.encoder.layers[-1].mlp.fc1.weight.grad.abs().sum() > 0
    assert model.encoder.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_dtypes(kind, dtype, images):
    reference_model = tiny_tower(kind)
    model = copy.deepcopy(reference_model).to(dtype)
    with vtprune.applied(reference_model, ToMe(r=2)) as reference_handle, torch.no_grad():
        # compared per original token (unmerged): a low-precision tie flip may reorder merged rows
        reference = unmerge(reference_model(images).last_hidden_state, reference_handle.assignment)
    with vtprune.applied(model, ToMe(r=2)) as handle, torch.no_grad():
        out = model(images.to(dtype))
        assert out.last_hidden_state.dtype == dtype and out.pooler_output.dtype == dtype
        assert handle.size.dtype == torch.float32
        assert handle.trace.tokens() == ([15, 13, 11] if kind == "clip" else [14, 12, 10])
        assert handle.size.sum(1).flatten().tolist() == [17.0 if kind == "clip" else 16.0] * 3
        full = unmerge(out.last_hidden_state, handle.assignment).double()
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    if dtype == torch.float32:
        torch.testing.assert_close(full, reference, atol=1e-4, rtol=0)
    elif kind == "clip":  # low precision may flip near-tie matches; most values must still agree closely
        assert ((full - reference).abs() < 1e-1).float().mean() > 0.9
    # (SigLIP, no CLS, in bf16: about half the tokens' merge groups differ from float64 on these seeded
    # weights, so only finiteness, dtypes and conservation of size are asserted there)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_no_grad_and_inference_mode(kind, images):
    model = tiny_tower(kind)
    with vtprune.applied(model, ToMe(r=2)) as handle:
        with torch.no_grad():
            a = model(images)
        with torch.inference_mode():
            b = model(images)
            assert handle.trace.tokens() == ([15, 13, 11] if kind == "clip" else [14, 12, 10])
        assert b.last_hidden_state.is_inference()
        assert torch.equal(a.last_hidden_state, b.last_hidden_state)
        assert torch.equal(a.pooler_output, b.pooler_output)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_deepcopy_of_a_patched_model_is_unpatched_and_pickle_is_refused(kind, images):
    expected = [15, 13, 11] if kind == "clip" else [14, 12, 10]
    merged = check_copy_and_pickle_rules(tiny_tower(kind), lambda model: model(images).last_hidden_state, expected)
    assert merged.shape[1] == expected[-1]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_already_patched_raises_or_replaces(kind, images):
    check_already_patched_rules(tiny_tower(kind), lambda model: model(images),
                                [15, 13, 11] if kind == "clip" else [14, 12, 10])


def test_gradient_checkpointing_in_training_is_refused_clearly():
    model = tiny_tower("clip").train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    with vtprune.applied(model, ToMe(r=2)):
        with pytest.raises(ValueError, match="activation_checkpointing_disable"):
            model(pixel_values=seeded_images(2, 32))


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention"])
def test_attention_kernels_that_cannot_take_the_size_bias_are_refused(implementation):
    """FlashAttention reads a float mask as 0/1 padding and flex attention wants a BlockMask, so ToMe's
    proportional attention (an additive log(size) mask) is refused on them at apply, naming what works."""
    model = tiny_tower("clip")
    model.config._attn_implementation = implementation  # as from_pretrained(..., attn_implementation=...) sets it
    with pytest.raises(ValueError, match=f"attn_implementation='{implementation}'.*'eager', 'sdpa'.*set_attn_impl"):
        vtprune.apply(model, ToMe(r=2))
    assert vtprune.handle_of(model) is None
    vtprune.apply(model, ToMe(r=2, prop_attn=False)).remove()  # no mask to pass: accepted
