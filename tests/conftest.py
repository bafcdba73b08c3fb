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


@pytest.fixture
def images224():
    return seeded_images(4, 224)


@pytest.fixture
def images64():
    return seeded_images(4, 64, dtype=torch.float32)
