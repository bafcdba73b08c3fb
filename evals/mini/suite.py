"""The shipped evaluation set written out in the form the runner's tasks read (``--data mini``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from PIL import Image

from ..results import write_atomic
from .data import CLASS_NAMES, eval_set
from .text import retrieval_gallery

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
    write_atomic(done, str(len(data)))
    return folder


def _jsonl_once(path: Path, lines: Callable[[Path], list[dict]]) -> Path:
    """Write ``lines(folder)`` (which also writes its images into ``folder``) as JSONL at ``path``, unless a
    complete file is there already (it is renamed into place only once whole)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, "".join(json.dumps(line) + "\n" for line in lines(path.parent)))
    return path


def retrieval_jsonl(root: Path | str) -> Path:
    """``root/fashion-mnist-retrieval/gallery.jsonl``: the attribute gallery of the shipped set
    (:func:`vtprune.evals.mini.text.retrieval_gallery`: one image per class, brightness and size
    combination present, three captions each), images beside it."""
    def lines(folder: Path) -> list[dict]:
        data, out = eval_set(), []
        for index, captions in retrieval_gallery(data.images, data.labels):
            Image.fromarray(data.images[index], mode="L").save(folder / f"{index:04d}.png")
            out.append({"image": f"{index:04d}.png", "captions": list(captions)})
        return out

    return _jsonl_once(Path(root) / "fashion-mnist-retrieval" / "gallery.jsonl", lines)


VQA_QUESTIONS, VQA_SEED = 600, 1


def vqa_jsonl(root: Path | str) -> Path:
    """``root/fashion-mnist-grids/questions.jsonl``: mini-llava's held-out questions (600, the three kinds in
    turn, :func:`vtprune.evals.mini.grids.questions` with seed 1) on 2x2 grids of the shipped images, one
    PNG per question beside it; ``category`` is ``"grid <kind>"`` (not an MME subtask name)."""
    from .grids import compose, questions

    def lines(folder: Path) -> list[dict]:
        data, out = eval_set(), []
        for index, item in enumerate(questions(data.labels, VQA_QUESTIONS, VQA_SEED)):
            Image.fromarray(compose(data.images, item.items), mode="L").save(folder / f"{index:04d}.png")
            out.append({"question_id": index, "image": f"{index:04d}.png", "question": item.question,
                        "answers": [item.answer], "category": f"grid {item.kind}"})
        return out

    return _jsonl_once(Path(root) / "fashion-mnist-grids" / "questions.jsonl", lines)


FORMS = {"classification": image_folder, "zeroshot": image_folder, "retrieval": retrieval_jsonl, "vqa": vqa_jsonl}


def materialise(task: str, root: Path | str) -> Path:
    """The data path for ``task`` on the shipped evaluation set, written under ``root``."""
    if task not in FORMS:
        raise ValueError(f"--data mini: the shipped evaluation set has no {task!r} form yet; accepted tasks: "
                         f"{', '.join(FORMS)}")
    return FORMS[task](root)
