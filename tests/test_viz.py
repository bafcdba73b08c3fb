"""vtprune.viz: merge groups from an assignment, pictures of them, and their input validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vtprune
import vtprune.viz as viz


def _random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _patch_means(pixels: np.ndarray, patch: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    blocks = pixels.astype(np.float64).reshape(height // patch, patch, width // patch, patch, 3)
    means = blocks.mean(axis=(1, 3))
    return np.rint(np.repeat(np.repeat(means, patch, axis=0), patch, axis=1)).astype(np.uint8)


def test_groups_follow_the_assignment_exactly():
    generator = torch.Generator().manual_seed(0)
    patches = torch.randint(-1, 7, (12,), generator=generator)
    assignment = torch.cat([torch.tensor([0, 1]), patches])            # two prefix tokens
    groups = viz.merge_groups(assignment, num_prefix=2, grid=(3, 4))
    assert groups.shape == (3, 4) and groups.dtype == np.int64
    np.testing.assert_array_equal(groups.reshape(-1), patches.numpy())
    # a [1, N0] batch, a numpy array and a list give the same; a square grid is inferred
    square = np.arange(1 + 16)
    np.testing.assert_array_equal(viz.merge_groups(square[None]), square[1:].reshape(4, 4))
    np.testing.assert_array_equal(viz.merge_groups(list(square)), square[1:].reshape(4, 4))


def test_identity_assignment_gives_the_image_back():
    pixels = _random_image(12, 8)
    identity = np.arange(1 + 6)                                         # CLS + 3x2 patches of 4x4
    drawn = np.asarray(viz.draw_merges(pixels, identity, patch_size=4, border=False))
    np.testing.assert_array_equal(drawn, _patch_means(pixels, 4))       # each patch its own mean colour
    one_pixel_patches = np.arange(1 + 12 * 8)
    same = np.asarray(viz.draw_merges(pixels, one_pixel_patches, patch_size=1, border=False))
    np.testing.assert_array_equal(same, pixels)
    kept = np.asarray(viz.draw_merges(pixels, identity, patch_size=4, fill="image", border=False))
    np.testing.assert_array_equal(kept, pixels)


def test_groups_are_painted_with_their_mean_colour_and_outlined():
    pixels = _random_image(8, 8, seed=1)
    # patches (2x2 grid of 4x4): top row merged into token 1, bottom-left its own, bottom-right dropped
    assignment = np.array([0, 1, 1, 2, -1])
    drawn = np.asarray(viz.draw_merges(pixels, assignment, patch_size=4, border=False))
    top = pixels[:4].reshape(-1, 3).astype(np.float64).mean(axis=0)
    np.testing.assert_array_equal(drawn[:4], np.broadcast_to(np.rint(top).astype(np.uint8), (4, 8, 3)))
    np.testing.assert_array_equal(drawn[4:, :4], _patch_means(pixels, 4)[4:, :4])
    dropped = drawn[4:, 4:].reshape(-1, 3)
    assert (dropped[:, 0] == dropped[:, 1]).all() and (dropped[:, 1] == dropped[:, 2]).all()   # greyed
    outlined = np.asarray(viz.draw_merges(pixels, assignment, patch_size=4, border_color=(255, 0, 255)))
    magenta = (outlined == [255, 0, 255]).all(axis=-1)
    assert magenta[3, :].all() and magenta[4, :].all()                 # between the rows of groups
    assert not magenta[:3, :].any()                                    # no line inside the merged top group
    assert magenta[5:, 3].all() and magenta[5:, 4].all()               # between bottom-left and dropped


def test_image_forms_are_equivalent():
    pixels = _random_image(8, 8, seed=2)
    assignment = np.array([0, 1, 1, 2, 1])
    expected = np.asarray(viz.draw_merges(pixels, assignment, patch_size=4))
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).double() / 255
    for image in (Image.fromarray(pixels), tensor, tensor[None].float(), pixels.astype(np.float64) / 255):
        np.testing.assert_array_equal(np.asarray(viz.draw_merges(image, assignment, patch_size=4)), expected)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalised = (tensor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    unnormalised = viz.draw_merges(normalised, assignment, patch_size=4, mean=mean, std=std)
    np.testing.assert_array_equal(np.asarray(unnormalised), expected)
    inferred = viz.draw_merges(pixels, assignment)                     # patch size from image and tokens
    np.testing.assert_array_equal(np.asarray(inferred), expected)


def test_pixels_past_the_last_whole_patch_are_drawn_as_they_are():
    """384 px in 14 px patches is 27 patches and 6 px the patch embedding ignores (SigLIP so400m/14 at 384):
    the grid is drawn on the covered part, the strip is left as it was."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (10, 11, 3), dtype=np.uint8)  # 2 x 2 patches of 4 px, 2 and 3 px left over
    assignment = np.array([0, 1, 1, 2, 3])  # CLS, then patches 0 and 1 merged
    drawn = np.asarray(viz.draw_merges(pixels, assignment, patch_size=4))
    covered = np.asarray(viz.draw_merges(pixels[:8, :8].copy(), assignment, patch_size=4))
    np.testing.assert_array_equal(drawn[:8, :8], covered)
    np.testing.assert_array_equal(drawn[8:], pixels[8:])
    np.testing.assert_array_equal(drawn[:, 8:], pixels[:, 8:])
    with pytest.raises(ValueError, match="4x4 or 5x5 pixels; pass patch_size="):  # 10 // 5 is 2 as well
        viz.draw_merges(pixels, assignment)
    siglip = rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)
    tokens = np.arange(27 * 27)  # no prefix: 27 x 27 patches of 14 px, the only size that gives 729
    inferred = np.asarray(viz.draw_merges(siglip, tokens, num_prefix=0))
    np.testing.assert_array_equal(inferred, np.asarray(viz.draw_merges(siglip, tokens, num_prefix=0, patch_size=14)))
    np.testing.assert_array_equal(inferred[378:], siglip[378:])


@pytest.mark.parametrize("call, message", [
    (lambda: viz.merge_groups(np.arange(1 + 12), grid=(3, 3)), "grid 3x3 has 9 patches"),
    (lambda: viz.merge_groups(np.arange(1 + 12)), "do not form a square grid"),
    (lambda: viz.merge_groups(np.arange(5), num_prefix=-1), "num_prefix"),
    (lambda: viz.merge_groups(np.array([0, 1, -2, 3, 4])), ">= -1"),
    (lambda: viz.merge_groups(np.zeros(5, dtype=np.float32)), "integer"),
    (lambda: viz.merge_groups(torch.zeros(2, 5, dtype=torch.long)), "batch of 2"),
    (lambda: viz.draw_merges(np.zeros((8, 8, 3), np.uint8), np.arange(1 + 9), patch_size=4),
     "2x2 = 4 patches"),
    (lambda: viz.draw_merges(np.zeros((3, 8, 3), np.uint8), np.arange(1 + 4), patch_size=4),
     "smaller than one 4x4 patch"),
    (lambda: viz.draw_merges(np.zeros((8, 8, 3), np.uint8), np.arange(1 + 4), patch_size=4, grid=(4, 1)),
     "does not match the image"),
    (lambda: viz.draw_merges(np.zeros((8, 8, 3), np.uint8), np.arange(1 + 3)), "cannot infer"),
    (lambda: viz.draw_merges(np.full((8, 8, 3), 2.0), np.arange(5), patch_size=4), "[0, 1]"),
    (lambda: viz.draw_merges(np.zeros((8, 8, 4), np.uint8), np.arange(5), patch_size=4), "[H, W, 3]"),
    (lambda: viz.draw_merges(torch.zeros(2, 3, 8, 8), np.arange(5), patch_size=4), "batch of 2"),
    (lambda: viz.draw_merges(torch.zeros(8, 8, 3), np.arange(5), patch_size=4), "channels first"),
    (lambda: viz.draw_merges("image.png", np.arange(5), patch_size=4), "PIL image"),
    (lambda: viz.draw_merges(np.zeros((8, 8, 3), np.uint8), np.arange(5), patch_size=0), "patch_size"),
    (lambda: viz.draw_merges(np.zeros((8, 8, 3), np.uint8), np.arange(5), 4, fill="blur"), "fill"),
    (lambda: viz.plot_merges(np.zeros((8, 8, 3), np.uint8), []), "non-empty"),
])
def test_bad_inputs_raise_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)


def test_handle_pngs_are_written_and_readable(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                              num_classes=0).eval()                    # 4x4 grid + CLS = 17 tokens
    pixels = _random_image(64, 64, seed=3)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    handle = vtprune.apply(model, vtprune.ToMe(r=3))
    with pytest.raises(ValueError, match="run a forward"):
        viz.save_merges(tmp_path / "none.png", pixels, handle)
    with torch.no_grad():
        model(torch.cat([x, x.flip(-1)]))
    handle.remove()                                                    # the last forward stays readable
    path = viz.save_merges(tmp_path / "merges.png", x.flip(-1)[0], handle, sample=1)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (64, 64) and png.mode == "RGB"
    groups = viz.merge_groups(handle.assignment[1])
    assert np.unique(groups).size == handle.trace.final_tokens() - 1   # every final patch token appears

    figure_path = tmp_path / "compare.png"
    figure = viz.plot_merges(pixels, [("tome r=3", handle), ("raw", handle.assignment[0])], figure_path)
    assert len(figure.axes) == 3
    with Image.open(figure_path) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 0
