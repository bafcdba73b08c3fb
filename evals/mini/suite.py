"""The shipped evaluation set written out in the form the runner's tasks read (``--data mini``)."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from .data import CLASS_NAMES, eval_set

IMAGE_TASKS = ("classification", "zeroshot")


def image_folder(root: Path | str) -> Path:
    """``root/fashion-mnist-eval``: one sub-folder per class (``0_t-shirt`` ... ``9_ankle-boot``, so that
    sorted order is label order), one PNG per image (``<index>.png``, the index in the shipped set), and
    ``classnames.txt`` with the plain class names. Written once; a complete folder is reused."""
    folder = Path(root) / "fashion-mnist-eval"
    done = folder / ".complete"
    if done.exists():
        return folder
    data = eval_set()
    for label, name in enumerate(CLASS_NAMES):
        (folder / f"{label}_{name.replace(' ', '-')}").mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(data.images, data.labels)):
        name = CLASS_NAMES[label].replace(" ", "-")
        Image.fromarray(image, mode="L").save(folder / f"{label}_{name}" / f"{index:04d}.png")
    (folder / "classnames.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    temporary = done.with_suffix(".tmp")
    temporary.write_text(str(len(data)))
    os.replace(temporary, done)
    return folder


def materialise(task: str, root: Path | str) -> Path:
    """The data path for ``task`` on the shipped evaluation set, written under ``root``."""
    if task in IMAGE_TASKS:
        return image_folder(root)
    raise ValueError(f"--data mini: the shipped evaluation set has no {task!r} form yet; accepted tasks: "
                     f"{', '.join(IMAGE_TASKS)}")
