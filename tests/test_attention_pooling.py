"""Attention pooling over merged tokens is size-aware: with log(size) added to its keys, pooling merged
tokens equals pooling the original tokens they stand for (each merged token repeated size times)."""
import pytest
import torch

import vtprune
from conftest import tiny_vit


def expand_by_size(tokens: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Every token repeated as many times as it has patches (one sample)."""
    return tokens.repeat_interleave(size.round().long().flatten(), dim=0)


@pytest.mark.parametrize("policy", [vtprune.ToMe(r=4), vtprune.PiToMe(ratio=0.8)], ids=str)
def test_timm_map_pooling(policy):
    model = tiny_vit("vit_tiny_patch16_224", img_size=64, depth=4, embed_dim=64, num_heads=2, num_classes=10,
                     global_pool="map")
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), vtprune.applied(model, policy) as handle:
        features = model.forward_features(images)
        pooled = model.pool(features)
        size = handle.size
    assert features.shape[1] < 17 and float(size.max()) > 1
    prefix = model.num_prefix_tokens
    for b in range(2):
        expanded = expand_by_size(features[b, prefix:], size[b, prefix:])[None]
        with torch.no_grad():
            expected = model.attn_pool(expanded)
        torch.testing.assert_close(pooled[b:b + 1], expected, rtol=0, atol=1e-12)
    with torch.no_grad():
        unweighted = model.attn_pool(features[:, prefix:])
    assert not torch.allclose(unweighted, pooled)  # the sizes did change the pooling


def test_siglip_head():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = SiglipVisionModel(config).double().eval()
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vtprune.applied(model, vtprune.ToMe(r=3)) as handle:
        out = model(pixel_values=pixels)
        size = handle.size
    assert out.last_hidden_state.shape[1] == 7 and float(size.max()) > 1  # 16 -> 13 -> 10 -> 7, merged
    head = model.vision_model.head if hasattr(model, "vision_model") else model.head
    for b in range(2):
        expanded = expand_by_size(out.last_hidden_state[b], size[b])[None]
        with torch.no_grad():
            expected = head(expanded)
        torch.testing.assert_close(out.pooler_output[b:b + 1], expected, rtol=0, atol=1e-12)


def test_open_clip_attentional_pooler():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_ratio=2.0,
                              output_dim=16, attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2,
                              output_tokens=True).double().eval()
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    seen = {}
    hook = model.attn_pool.register_forward_hook(lambda module, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad(), vtprune.applied(model, vtprune.ToMe(r=3)) as handle:
        model(pixels)
        size = handle.size
    hook.remove()
    assert seen["x"].shape[1] < 17
    for b in range(2):
        expanded = expand_by_size(seen["x"][b], size[b])[None]
        with torch.no_grad():
            expected = model.attn_pool(expanded)
        torch.testing.assert_close(seen["out"][b:b + 1], expected, rtol=0, atol=1e-12)
