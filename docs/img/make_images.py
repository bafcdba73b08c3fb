"""Regenerate the pictures in docs/img/ (python docs/img/make_images.py; about 10 s on a CPU).

The ViT has *random* weights (seeded, pretrained=False: nothing is downloaded), so its keys carry no
semantics: merges follow regions here only because patches of one flat colour get near-identical keys
(they differ only by the random position embedding). With trained weights, merges also follow object
parts and textures. timm's random initialisation can change between releases, so regenerated pictures
may differ in detail.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image, ImageDraw

import vtprune
import vtprune.viz

HERE = Path(__file__).resolve().parent


def scene(size: int = 224) -> Image.Image:
    """A drawn scene: flat sky and grass, a sun, a house with a roof and a door, a tree."""
    image = Image.new("RGB", (size, size), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 150, size, size], fill=(90, 160, 70))
    draw.ellipse([160, 18, 204, 62], fill=(250, 215, 60))
    draw.rectangle([40, 100, 120, 170], fill=(190, 60, 50))
    draw.polygon([(30, 100), (80, 58), (130, 100)], fill=(110, 60, 40))
    draw.rectangle([70, 130, 90, 170], fill=(70, 45, 30))
    draw.rectangle([150, 110, 160, 175], fill=(100, 70, 40))
    draw.ellipse([132, 80, 178, 125], fill=(40, 110, 45))
    return image


def main() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    image = scene()
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    x = ((pixels - 0.5) / 0.5)[None]                    # the model's normalisation: mean = std = 0.5
    panels = []
    with torch.no_grad():
        for spec in ("tome:r=8", "tome:r=16", "pitome:ratio=0.9"):
            with vtprune.applied(model, spec) as handle:
                model(x)
            panels.append((spec, handle))               # the last forward stays readable after removal
    vtprune.viz.plot_merges(image, panels, HERE / "merges.png")
    vtprune.viz.save_merges(HERE / "merges_tome_r16.png", image, panels[1][1])


if __name__ == "__main__":
    main()
