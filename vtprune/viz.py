"""Pictures of token merging: which image patches ended up in the same token, and which were dropped.

After a forward of a patched model, ``handle.assignment[b, i]`` is the index of the final token that
contains original token ``i`` of sample ``b`` (``-1`` = dropped); the first ``num_prefix`` original
tokens are the prefix tokens (CLS, distillation, registers), the rest are the image patches in raster
order. This module turns that map into an image, in the spirit of ToMe's visualisation (Bolya et al.,
ICLR 2023, Fig. 4): every group of merged patches is painted with its mean colour and outlined, and
dropped patches are shown greyed out. Written from that description only.

    import vtprune, vtprune.viz
    handle = vtprune.apply(model, vtprune.ToMe(r=16))
    model(x)                                   # x: the [1, 3, 224, 224] tensor made from `image`
    vtprune.viz.save_merges("merges.png", image, handle)

Images may be given as

* a ``PIL.Image.Image`` (any mode; converted to RGB),
* a ``numpy`` array ``[H, W, 3]`` or ``[H, W]``: ``uint8`` in 0..255, or floating point in [0, 1],
* a ``torch`` tensor ``[3, H, W]`` or ``[1, 3, H, W]``: floating point in [0, 1] (what torchvision's
  ``ToTensor`` gives) or ``uint8``. A tensor normalised for the model (e.g. ImageNet mean/std) can be
  passed with ``mean=`` and ``std=``, which undo the normalisation first (``x * std + mean``).

The image must be the one the model saw: ``H`` and ``W`` equal to the patch grid times the patch size.
Nothing here imports a host library; it needs numpy and pillow, and matplotlib for :func:`plot_merges`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["draw_merges", "merge_groups", "plot_merges", "save_merges", "to_rgb_array"]

DROPPED = -1
_DEFAULT_BORDER = (20, 20, 20)
_DROPPED_GREY = 128


# --- inputs ---------------------------------------------------------------------------------------

def to_rgb_array(image: Any, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> np.ndarray:
    """``image`` as an ``[H, W, 3]`` ``uint8`` array (see the module docstring for accepted forms).

    ``mean``/``std`` (per channel, in the [0, 1] scale) undo a normalisation of a float tensor or array.
    Raises :class:`ValueError` naming the problem for any other shape, dtype or range.
    """
    if isinstance(image, Image.Image):
        if mean is not None or std is not None:
            raise ValueError("mean/std only apply to float tensors or arrays, not to a PIL image")
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dim() == 4:
            if tensor.shape[0] != 1:
                raise ValueError(f"image tensor has a batch of {tensor.shape[0]}; pass one image, e.g. x[0]")
            tensor = tensor[0]
        if tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be [3, H, W] or [1, 3, H, W] (channels first), "
                             f"got shape {tuple(image.shape)}")
        if tensor.dtype == torch.bool or tensor.is_complex():
            raise ValueError(f"an image tensor must be floating point in [0, 1] or uint8, got {tensor.dtype}")
        array = tensor.permute(1, 2, 0)
        array = array.numpy() if array.dtype == torch.uint8 else array.to(torch.float64).numpy()
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3):
            raise ValueError(f"an image array must be [H, W, 3] or [H, W] (channels last), got shape {image.shape}")
    else:
        raise ValueError("image must be a PIL image, an [H, W, 3] numpy array or a [3, H, W] torch tensor; "
                         f"got {type(image).__name__}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.dtype == np.uint8:
        if mean is not None or std is not None:
            raise ValueError("mean/std only apply to floating-point images, not uint8")
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"an image must be uint8 (0..255) or floating point in [0, 1], got dtype {array.dtype}")
    array = array.astype(np.float64)
    if mean is not None or std is not None:
        mean_arr = np.asarray(mean if mean is not None else (0.0, 0.0, 0.0), dtype=np.float64).reshape(-1)
        std_arr = np.asarray(std if std is not None else (1.0, 1.0, 1.0), dtype=np.float64).reshape(-1)
        if mean_arr.size not in (1, 3) or std_arr.size not in (1, 3):
            raise ValueError("mean and std must have 1 or 3 entries (one per channel)")
        array = array * std_arr + mean_arr
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"a floating-point image must be in [0, 1] (got values in [{low:.3g}, {high:.3g}]); "
                         "pass mean= and std= to undo a normalisation, or scale it to [0, 1] first")
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


def _as_assignment(assignment: Any, sample: int | None = None) -> np.ndarray:
    """One sample's assignment as a 1-D ``int64`` array (validated)."""
    if isinstance(assignment, torch.Tensor):
        if assignment.is_floating_point() or assignment.is_complex() or assignment.dtype == torch.bool:
            raise ValueError(f"assignment must be an integer tensor (handle.assignment), got {assignment.dtype}")
        array = assignment.detach().cpu().numpy()
    else:
        array = np.asarray(assignment)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
            raise ValueError(f"assignment must hold integers (final-token index, -1 = dropped), "
                             f"got dtype {array.dtype}")
    if array.ndim == 2:
        if sample is None:
            if array.shape[0] != 1:
                raise ValueError(f"assignment has a batch of {array.shape[0]} samples; pass one row "
                                 "(assignment[i]) or sample=i")
            sample = 0
        if not -array.shape[0] <= sample < array.shape[0]:
            raise ValueError(f"sample={sample} is out of range for a batch of {array.shape[0]}")
        array = array[sample]
    if array.ndim != 1:
        raise ValueError(f"assignment must be [N0] or [B, N0], got shape {array.shape}")
    if array.size == 0:
        raise ValueError("assignment is empty")
    array = array.astype(np.int64)
    if array.min() < DROPPED:
        raise ValueError(f"assignment values must be >= -1 (-1 = dropped), found {int(array.min())}")
    return array


def _check_prefix(num_prefix: Any) -> int:
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, (int, np.integer)) or num_prefix < 0:
        raise ValueError(f"num_prefix must be an int >= 0 (CLS + distillation + register tokens), got {num_prefix!r}")
    return int(num_prefix)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be a positive int or a pair (height, width) of them, got {value!r}")
    if min(pair) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


# --- groups ---------------------------------------------------------------------------------------

def merge_groups(assignment: Any, num_prefix: int = 1, grid: int | Sequence[int] | None = None) -> np.ndarray:
    """The group id of every image patch, as an ``[grid_h, grid_w]`` ``int64`` array.

    ``assignment``: one sample's ``[N0]`` assignment (or a ``[1, N0]`` batch), as in
    ``handle.assignment[b]``. The first ``num_prefix`` entries (prefix tokens) are skipped; the group id
    of a patch is exactly its assignment value, i.e. the index of the final token that contains it, so
    patches with equal ids were merged together, and ``-1`` marks a dropped patch.
    ``grid``: ``(grid_h, grid_w)`` or one int for a square grid; ``None`` infers a square grid.
    Raises :class:`ValueError` when the number of patches does not fit the grid.
    """
    values = _as_assignment(assignment)
    num_prefix = _check_prefix(num_prefix)
    num_patches = values.size - num_prefix
    if num_patches <= 0:
        raise ValueError(f"assignment has {values.size} entries, not more than num_prefix={num_prefix}")
    if grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patch tokens ({values.size} entries - {num_prefix} prefix) do not form "
                             "a square grid; pass grid=(grid_h, grid_w), or check num_prefix")
        grid_h, grid_w = side, side
    else:
        grid_h, grid_w = _pair(grid, "grid")
        if grid_h * grid_w != num_patches:
            raise ValueError(f"grid {grid_h}x{grid_w} has {grid_h * grid_w} patches but the assignment has "
                             f"{num_patches} patch tokens ({values.size} entries - {num_prefix} prefix); "
                             "check grid and num_prefix")
    return values[num_prefix:].reshape(grid_h, grid_w).copy()


def _boundaries(ids: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of a change of id (lines ``2 * width`` wide, centred on the edge)."""
    mask = np.zeros(ids.shape, dtype=bool)
    for shift in range(1, width + 1):
        vertical = ids[shift:, :] != ids[:-shift, :]
        horizontal = ids[:, shift:] != ids[:, :-shift]
        mask[shift:, :] |= vertical
        mask[:-shift, :] |= vertical
        mask[:, shift:] |= horizontal
        mask[:, :-shift] |= horizontal
    return mask


def draw_merges(image: Any, assignment: Any, patch_size: int | Sequence[int] | None = None, num_prefix: int = 1,
                grid: int | Sequence[int] | None = None, *, fill: str = "mean", border: bool = True,
                border_width: int = 1, border_color: Sequence[int] = _DEFAULT_BORDER,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Image.Image:
    """Paint the merge groups of one image; returns an RGB ``PIL.Image`` of the image's size.

    Every group of patches that ended in the same token is filled with its mean colour
    (``fill="mean"``; ``fill="image"`` keeps the pixels) and outlined in ``border_color``
    (``border=False`` to omit the outlines). Dropped patches (assignment ``-1``) are greyed out.
    ``patch_size``: int or ``(ph, pw)``; ``None`` infers square patches from the image size and the
    number of patch tokens. ``grid`` defaults to the image size divided by the patch size.
    ``mean``/``std`` undo a normalisation of a float image (see :func:`to_rgb_array`).

    With an identity assignment (no merges) and ``border=False`` the result is the image with each
    patch replaced by its mean colour: with ``patch_size=1`` that is the image itself.
    Raises :class:`ValueError` when image, patch size, grid and assignment do not fit together.
    """
    if fill not in ("mean", "image"):
        raise ValueError(f"fill must be 'mean' or 'image', got {fill!r}")
    if isinstance(border_width, bool) or not isinstance(border_width, int) or border_width < 1:
        raise ValueError(f"border_width must be an int >= 1, got {border_width!r}")
    colour = np.asarray(border_color)
    if colour.shape != (3,) or colour.min() < 0 or colour.max() > 255:
        raise ValueError(f"border_color must be an (r, g, b) triple in 0..255, got {border_color!r}")
    pixels = to_rgb_array(image, mean=mean, std=std)
    height, width = pixels.shape[:2]
    values = _as_assignment(assignment)
    num_prefix = _check_prefix(num_prefix)
    if patch_size is None:
        patch_h, patch_w = _infer_patch_size(height, width, values.size - num_prefix, num_prefix)
    else:
        patch_h, patch_w = _pair(patch_size, "patch_size")
    image_grid = (height // patch_h, width // patch_w)
    if not image_grid[0] or not image_grid[1]:
        raise ValueError(f"image of {height}x{width} pixels is smaller than one {patch_h}x{patch_w} patch; pass the "
                         "image exactly as the model saw it (after resize and crop)")
    if grid is not None and _pair(grid, "grid") != image_grid:
        raise ValueError(f"grid {tuple(_pair(grid, 'grid'))} does not match the image: {height}x{width} pixels in "
                         f"{patch_h}x{patch_w} patches is a {image_grid[0]}x{image_grid[1]} grid")
    num_patches = values.size - num_prefix
    if num_patches != image_grid[0] * image_grid[1]:
        raise ValueError(f"the image has {image_grid[0]}x{image_grid[1]} = {image_grid[0] * image_grid[1]} patches "
                         f"of {patch_h}x{patch_w} pixels, but the assignment has {values.size} entries - "
                         f"{num_prefix} prefix = {num_patches} patch tokens; check patch_size, num_prefix and "
                         "that the image is the model's input")
    groups = merge_groups(values, num_prefix, image_grid)
    pixel_groups = np.repeat(np.repeat(groups, patch_h, axis=0), patch_w, axis=1)
    # a patch embedding ignores the pixels past the last whole patch (384 px in 14 px patches: 27, 6 px left);
    # they are drawn as they are
    covered = (image_grid[0] * patch_h, image_grid[1] * patch_w)
    whole = pixels
    pixels = pixels[:covered[0], :covered[1]]

    out = pixels.astype(np.float64)
    if fill == "mean":
        flat_ids = pixel_groups.reshape(-1)
        kept = flat_ids >= 0
        labels, inverse = np.unique(flat_ids[kept], return_inverse=True)
        flat = out.reshape(-1, 3)
        if labels.size:
            sums = np.zeros((labels.size, 3))
            np.add.at(sums, inverse, flat[kept])
            counts = np.bincount(inverse, minlength=labels.size)[:, None]
            flat[kept] = (sums / counts)[inverse]
        out = flat.reshape(out.shape)
    dropped = pixel_groups < 0
    if dropped.any():
        luminance = out[dropped] @ np.array([0.299, 0.587, 0.114])
        out[dropped] = (0.5 * luminance + 0.5 * _DROPPED_GREY)[:, None]
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if border:
        out[_boundaries(pixel_groups, border_width)] = colour.astype(np.uint8)
    drawn = np.array(whole, dtype=np.uint8, copy=True)
    drawn[:covered[0], :covered[1]] = out
    return Image.fromarray(drawn)


def _infer_patch_size(height: int, width: int, num_patches: int, num_prefix: int) -> tuple[int, int]:
    if num_patches > 0:
        # every square patch size giving that many patches; the grid may leave a strip uncovered
        fits = [side for side in range(1, min(height, width) + 1) if (height // side) * (width // side) == num_patches]
        exact = [side for side in fits if height % side == 0 and width % side == 0]
        if len(exact) == 1 or len(fits) == 1:
            side = exact[0] if len(exact) == 1 else fits[0]
            return side, side
        if fits:
            raise ValueError(f"a {height}x{width} image splits into {num_patches} square patches of "
                             f"{' or '.join(f'{side}x{side}' for side in fits)} pixels; pass patch_size=")
    raise ValueError(f"cannot infer a square patch size: a {height}x{width} image does not split into "
                     f"{num_patches} square patches (assignment entries - num_prefix={num_prefix}); "
                     "pass patch_size= (and check num_prefix, and that the image is the model's input)")


# --- handles --------------------------------------------------------------------------------------

def _from_handle(handle: Any, sample: int) -> tuple[np.ndarray, int]:
    """``(assignment row, num_prefix)`` from a :class:`vtprune.Handle` after a forward."""
    assignment = getattr(handle, "assignment", None)
    if assignment is None:
        raise ValueError("the handle has no assignment yet: run a forward of the patched model first")
    num_prefix = len(handle.adapter.inspect(handle.model).protected)
    return _as_assignment(assignment, sample), num_prefix


def _is_handle(value: Any) -> bool:
    return hasattr(value, "assignment") and hasattr(value, "adapter") and hasattr(value, "model")


def save_merges(path: str | Path, image: Any, handle: Any, sample: int = 0, **kwargs: Any) -> Path:
    """Draw the merges of sample ``sample`` of ``handle``'s last forward onto ``image`` and save a PNG.

    ``image`` is that sample's input (see the module docstring); the number of prefix tokens comes
    from the handle's adapter and the patch size is inferred unless ``patch_size=`` is given. Other
    keyword arguments go to :func:`draw_merges`. Returns the path written.
    """
    assignment, num_prefix = _from_handle(handle, sample)
    kwargs.setdefault("num_prefix", num_prefix)
    picture = draw_merges(image, assignment, **kwargs)
    path = Path(path)
    picture.save(path, format="PNG")
    return path


def plot_merges(image: Any, panels: Sequence[tuple[str, Any]], path: str | Path | None = None, *,
                sample: int = 0, show_input: bool = True, num_prefix: int | None = None,
                ncols: int | None = None, panel_size: float = 3.0, dpi: int = 100, **kwargs: Any):
    """Side-by-side figure comparing merges, e.g. of several policies on the same image.

    ``panels``: ``[(title, handle_or_assignment), ...]``; a handle contributes sample ``sample`` of its
    last forward (and its own number of prefix tokens), an assignment ``[N0]`` or ``[B, N0]`` its row
    ``sample`` with ``num_prefix`` prefix tokens (default 1). Each title gets the number of tokens the
    patches ended in. ``show_input`` adds the input image as the first panel. Other keyword arguments
    go to :func:`draw_merges`. Saves a PNG to ``path`` if given; returns the ``matplotlib`` Figure
    (built without pyplot, so no window opens and no global figure is left behind).
    """
    from matplotlib.figure import Figure

    if isinstance(panels, (str, bytes)) or not isinstance(panels, Sequence) or not panels:
        raise ValueError("panels must be a non-empty list of (title, handle_or_assignment) pairs")
    pixels = to_rgb_array(image, mean=kwargs.pop("mean", None), std=kwargs.pop("std", None))
    pictures: list[tuple[str, np.ndarray]] = []
    if show_input:
        pictures.append(("input", pixels))
    for index, panel in enumerate(panels):
        if not isinstance(panel, (tuple, list)) or len(panel) != 2:
            raise ValueError(f"panel {index} must be a (title, handle_or_assignment) pair, got {panel!r}")
        title, source = panel
        if _is_handle(source):
            assignment, prefix = _from_handle(source, sample)
            prefix = prefix if num_prefix is None else num_prefix
        else:
            assignment = _as_assignment(source, sample)
            prefix = 1 if num_prefix is None else num_prefix
        picture = draw_merges(pixels, assignment, num_prefix=prefix, **kwargs)
        tokens = np.unique(assignment[prefix:][assignment[prefix:] >= 0]).size
        pictures.append((f"{title}\n{tokens} patch tokens", np.asarray(picture)))

    columns = ncols or len(pictures)
    rows = -(-len(pictures) // columns)
    figure = Figure(figsize=(panel_size * columns, (panel_size + 0.4) * rows), dpi=dpi, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (title, picture) in zip(axes.flat, pictures):
        axis.imshow(picture, interpolation="nearest")
        axis.set_title(title, fontsize=9)
    if path is not None:
        figure.savefig(Path(path), format="png", bbox_inches="tight", pad_inches=0.05)
    return figure

