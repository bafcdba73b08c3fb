"""Fashion-MNIST for vtprune-mini: the IDX reader, the class names, and the held-out evaluation set shipped
with the package (test-split images only; the training split is never shipped).

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017; MIT licence): 28x28 grey images of 10 clothing classes,
60 000 for training and 10 000 for testing. On Debian/Ubuntu ``apt-get install dataset-fashion-mnist``
puts the four IDX files in :data:`DEFAULT_ROOT`; elsewhere give the directory that holds them.
"""
from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
EVAL_SET = Path(__file__).with_name("assets") / "fashion_mnist_eval.npz"
EVAL_SIZE = 2000  # per-class balanced: 200 test images of each class
EVAL_SEED = 0


@dataclass(frozen=True)
class Split:
    """Images ``[N, 28, 28]`` uint8 and labels ``[N]`` int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's format: magic ``0x0000 type ndim``, big-endian sizes, then the data), plain or
    ``.gz``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        data = stream.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()}; expected 000008xx)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + math.prod(shape):
        raise ValueError(f"{path} holds {len(data)} bytes, but its header (shape {shape}) needs "
                         f"{header + math.prod(shape)}: the file is truncated or damaged")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_split(split: str, root: Path | str = DEFAULT_ROOT) -> Split:
    """The ``train`` or ``test`` split from the IDX files in ``root`` (``.gz`` or not)."""
    if split not in FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; accepted: {', '.join(FILES)}")
    root = Path(root)
    arrays = []
    for name in FILES[split]:
        candidates = [root / f"{name}.gz", root / name]
        path = next((candidate for candidate in candidates if candidate.exists()), None)
        if path is None:
            raise FileNotFoundError(f"Fashion-MNIST file {name}(.gz) not found in {root}; install it with "
                                    "`apt-get install dataset-fashion-mnist` or pass the directory holding the "
                                    "four IDX files")
        arrays.append(read_idx(path))
    return Split(images=arrays[0].copy(), labels=arrays[1].astype(np.int64))


def eval_indices(labels: np.ndarray, per_class: int = EVAL_SIZE // 10, seed: int = EVAL_SEED) -> np.ndarray:
    """The test-split indices of the shipped evaluation set: ``per_class`` of each class, drawn with
    ``seed``, in ascending order."""
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == label), per_class, replace=False) for label in range(10)]
    return np.sort(np.concatenate(chosen))


def write_eval_set(root: Path | str = DEFAULT_ROOT, path: Path = EVAL_SET) -> Path:
    """Build the shipped evaluation set from the test split (what ``assets/fashion_mnist_eval.npz`` holds)."""
    test = load_split("test", root)
    indices = eval_indices(test.labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=test.images[indices], labels=test.labels[indices], test_indices=indices)
    return path


def eval_set() -> Split:
    """The shipped held-out evaluation set (2 000 Fashion-MNIST test images, 200 per class)."""
    with np.load(EVAL_SET) as data:
        return Split(images=data["images"], labels=data["labels"].astype(np.int64))
