import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from seeded import seeded_init_, seeded_images  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_vit(name: str = "deit_tiny_patch16_224", seed: int = 0, dtype=torch.float64, **kwargs) -> torch.nn.Module:
    """A timm ViT with deterministic random weights (never downloaded), in eval mode."""
    model = timm.create_model(name, pretrained=False, **kwargs)
    seeded_init_(model, seed)
    return model.to(dtype).eval()


def small_vit(name: str = "vit_tiny_patch16_224", dtype=torch.float32, **kwargs) -> torch.nn.Module:
    """A fast ViT: 64x64 images (16 patches + prefix), 4 blocks, width 64."""
    config = dict(img_size=64, depth=4, embed_dim=64, num_heads=2, num_classes=10)
    config.update(kwargs)
    return tiny_vit(name, dtype=dtype, **config)


def build_tiny_llava(seed: int = 0, *, vision_layers: int = 2, image_size: int = 32, patch_size: int = 8,
                     vision: str = "clip", attn: str = "sdpa", dtype=torch.float32, text_layers: int = 2,
                     text_model: str = "llama"):
    """A tiny HF LlavaForConditionalGeneration from configs (Llama 2 layers with GQA, vocab 128, image token 127).

    Default: CLIP with 2 layers, 32 px images in 8 px patches, 16 image tokens per image. ``vision="siglip"``
    uses a SigLIP tower (no CLS; strategy "full"). ``vision_layers=24, image_size=336, patch_size=14`` is
    LLaVA-1.5's tower geometry (577 tokens, 576 image tokens).
    """
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              MistralConfig, Qwen2Config, SiglipVisionConfig)

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
                 image_size=image_size, patch_size=patch_size)
    vision_config = CLIPVisionConfig(**tower) if vision == "clip" else SiglipVisionConfig(**tower)
    text_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[text_model]
    text = text_class(hidden_size=64, intermediate_size=96, num_hidden_layers=text_layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048)
    strategy = "default" if vision == "clip" else "full"
    tokens = (image_size // patch_size) ** 2
    config = LlavaConfig(vision_config=vision_config, text_config=text, image_token_index=127,
                         image_seq_length=tokens, vision_feature_select_strategy=strategy)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model.to(dtype)


def check_already_patched_rules(model: torch.nn.Module, run, expected_tokens: list[int]) -> None:
    """Applying twice raises AlreadyPatchedError naming the fixes; replace=True swaps the policy."""
    import vtprune

    first = vtprune.apply(model, vtprune.ToMe(r=1))
    with pytest.raises(vtprune.AlreadyPatchedError, match="vtprune.remove\\(model\\).*replace=True"):
        vtprune.apply(model, vtprune.ToMe(r=2))
    assert vtprune.handle_of(model) is first and not first.removed
    second = vtprune.apply(model, vtprune.ToMe(r=2), replace=True)
    assert first.removed and not second.removed
    with torch.no_grad():
        run(model)
    assert second.trace.tokens() == expected_tokens
    second.remove()


def check_copy_and_pickle_rules(model: torch.nn.Module, run, expected_tokens: list[int]) -> torch.Tensor:
    """deepcopy of a patched model is unpatched and re-patchable; pickling a patched model is refused;
    after remove() it pickles and restores the original. ``run(model)`` returns the output to compare.
    Returns the merged output of the re-patched copy."""
    import copy
    import pickle

    import vtprune

    pristine = copy.deepcopy(model)
    handle = vtprune.apply(model, vtprune.ToMe(r=2))
    clone = copy.deepcopy(model)
    assert vtprune.handle_of(clone) is None
    with torch.no_grad():
        assert torch.equal(run(clone), run(pristine))
        clone_handle = vtprune.apply(clone, vtprune.ToMe(r=2))  # the copy can be patched again
        merged = run(clone)
        assert clone_handle.trace.tokens() == expected_tokens
        assert handle.trace is None  # the original's trace is its own
        assert torch.equal(run(model), merged) and not torch.equal(merged, run(pristine))
    with pytest.raises(TypeError, match="cannot be pickled; call handle.remove"):
        pickle.dumps(model)
    handle.remove()
    clone_handle.remove()
    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(run(restored), run(pristine))
    return merged


@pytest.fixture
def images224():
    return seeded_images(4, 224)


@pytest.fixture
def images64():
    return seeded_images(4, 64, dtype=torch.float32)


def build_tiny_llava_next(seed: int = 0, *, vision_layers: int = 4, dtype=torch.float64, text_layers: int = 2):
    """A tiny HF LlavaNextForConditionalGeneration: CLIP 4 layers at 32 px / patch 8 (16 patches per crop),
    anyres grid pinpoints 32x64, 64x32 and 64x64 (base image + up to 4 tiles), image token 127."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=text_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=127,
                             image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.image_newline.normal_()
    return model.to(dtype)
