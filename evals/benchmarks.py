"""Converters from the public benchmark files to the JSONL files the eval tasks read (``vtprune prepare``).

LLaVA's eval question files (haotian-liu/LLaVA ``playground/data/eval/...``, from its ``eval.zip``) hold the
questions and prompts only; the answers live in each benchmark's own annotation files. Each function here
joins the two and returns the items of the task's JSONL, with ``"image"`` relative to the benchmark's image
folder (as LLaVA's ``--image-folder`` takes it); :func:`place_images` makes the paths relative to the output
file (or absolute) and counts the images that are missing; :func:`write_jsonl` writes the file.

VQA items (the ``vqa`` task): ``{"question_id", "image", "question", "answers", ["choices"], ["category"]}``.
The question is LLaVA's prompt text verbatim (its ``"text"``, including lines such as ``Answer the question
using a single word or phrase.`` and TextVQA's ``Reference OCR token: ...``), so the model sees LLaVA's prompts.
Retrieval items (the ``retrieval`` task): ``{"image", "captions"}``.

Every function raises :class:`FormatError` (a ``ValueError``) with one line naming the file, the entry and
the form that was expected, or ``FileNotFoundError`` for a missing file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

LETTERS = "ABCDEFGHIJ"
SINGLE_WORD = "Answer the question using a single word or phrase."
MME_SUFFIX = "Please answer yes or no."
OCR_PREFIX = "Reference OCR token:"


class FormatError(ValueError):
    """A benchmark file that is not in the expected form."""


def _existing(path: Path, what: str, directory: bool = False) -> Path:
    path = Path(path)
    if directory and not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; expected {what}")
    if not directory and not path.is_file():
        raise FileNotFoundError(f"{path} is not a file; expected {what}")
    return path


def read_json(path: Path, what: str) -> Any:
    """The JSON document at ``path`` (``what`` names the expected file in the errors)."""
    path = _existing(path, what)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FormatError(f"{path} is not JSON ({error}); expected {what}") from None


def read_jsonl(path: Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-empty line of the JSONL file at ``path``."""
    path = _existing(path, what)
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise FormatError(f"{path}:{number} is not a JSON object; expected {what}") from None
        if not isinstance(item, dict):
            raise FormatError(f"{path}:{number} is not a JSON object; expected {what}")
        items.append((number, item))
    return items


def _llava_questions(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """LLaVA's question lines: ``{"question_id", "image", "text", ["category"]}`` (``model_vqa_loader.py``)."""
    shape = 'LLaVA\'s question JSONL, one {"question_id": ..., "image": ..., "text": ...} per line'
    lines = read_jsonl(path, shape)
    for number, item in lines:
        if not all(key in item for key in ("question_id", "image", "text")):
            raise FormatError(f"{path}:{number} has keys {sorted(item)}; expected {shape}")
    if not lines:
        raise FormatError(f"{path} is empty; expected {shape}")
    return lines


def gqa(questions: Path, answers: Path) -> list[dict[str, Any]]:
    """GQA test-dev balanced. ``questions``: LLaVA's ``llava_gqa_testdev_balanced.jsonl`` (``{"question_id":
    "201307251", "image": "n161313.jpg", "text": "...?\\nAnswer the question using a single word or phrase.",
    "category": "default"}``). ``answers``: GQA's ``testdev_balanced_questions.json`` (questions1.2), a JSON
    object ``{question id: {"imageId", "question", "answer", "fullAnswer", "isBalanced", ...}}``.
    Items: the question id, LLaVA's image and text, ``answers: [answer]``; images under GQA's ``images/``."""
    shape = "GQA's {tier}_questions.json: {question id: {\"question\", \"answer\", \"imageId\", ...}}"
    table = read_json(answers, shape)
    if not isinstance(table, dict):
        raise FormatError(f"{answers} holds a JSON {type(table).__name__}; expected {shape}")
    items = []
    for number, line in _llava_questions(questions):
        entry = table.get(str(line["question_id"]))
        if entry is None:
            raise FormatError(f"{questions}:{number}: question {line['question_id']} is not in {answers}; expected "
                              "the GQA questions file of the same split (testdev_balanced_questions.json)")
        if not isinstance(entry, dict) or "answer" not in entry:
            raise FormatError(f"{answers}: question {line['question_id']} has no \"answer\"; expected {shape}")
        items.append({"question_id": str(line["question_id"]), "image": line["image"], "question": line["text"],
                      "answers": [str(entry["answer"])]})
    return items


def _pope_files(answers: Sequence[Path]) -> dict[str, Path]:
    """``{split: file}`` from POPE annotation files or folders holding them (``coco_pope_<split>.json``)."""
    files: list[Path] = []
    for path in map(Path, answers):
        if path.is_dir():
            found = sorted(path.glob("*_pope_*.json"))
            if not found:
                raise FileNotFoundError(f"{path} holds no *_pope_<split>.json file; expected POPE's output/coco "
                                        "folder (coco_pope_adversarial.json, coco_pope_popular.json, "
                                        "coco_pope_random.json)")
            files += found
        else:
            files.append(_existing(path, "a POPE annotation file such as coco_pope_random.json"))
    splits: dict[str, Path] = {}
    for path in files:
        if "_pope_" not in path.stem:
            raise FormatError(f"{path}: expected a POPE annotation file named <dataset>_pope_<split>.json")
        split = path.stem.split("_pope_", 1)[1]
        if split in splits:
            raise FormatError(f"two POPE files for split {split!r}: {splits[split]} and {path}")
        splits[split] = path
    return splits


def pope(questions: Path, answers: Sequence[Path]) -> list[dict[str, Any]]:
    """POPE on COCO val2014. ``questions``: LLaVA's ``llava_pope_test.jsonl`` (``{"question_id": 1, "image":
    "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?\\nAnswer the question using a
    single word or phrase.", "category": "adversarial"}``; 3000 adversarial, 2910 random, 3000 popular).
    ``answers``: POPE's ``coco_pope_<split>.json`` files (JSON lines ``{"question_id", "image", "text",
    "label": "yes"|"no"}``) or the folder holding them. Joined as LLaVA's ``eval_pope.py`` joins them: the
    questions of each split in file order against the lines of that split's file in order; the image and
    the question (the first line of LLaVA's text) must agree. Items: ``answers: [label]``, ``category``: the
    split; only the splits given are converted. Images: COCO ``val2014/``."""
    splits = _pope_files(answers)
    by_split: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for number, line in _llava_questions(questions):
        by_split.setdefault(line.get("category"), []).append((number, line))
    items = []
    for split, path in splits.items():
        if split not in by_split:
            raise FormatError(f"{path}: split {split!r} has no questions in {questions} (its categories: "
                              f"{', '.join(sorted(map(str, by_split)))})")
        labels = read_jsonl(path, 'POPE JSON lines {"question_id", "image", "text", "label"}')
        if len(labels) != len(by_split[split]):
            raise FormatError(f"{path} has {len(labels)} questions but {questions} has {len(by_split[split])} of "
                              f"category {split!r}; expected the POPE files LLaVA's questions were made from")
        for (number, line), (label_number, label) in zip(by_split[split], labels):
            if label.get("label") not in ("yes", "no"):
                raise FormatError(f"{path}:{label_number}: label {label.get('label')!r}; expected \"yes\" or \"no\"")
            if label.get("image") != line["image"] or label.get("text") != line["text"].split("\n")[0]:
                raise FormatError(f"{path}:{label_number} ({label.get('image')}: {label.get('text')!r}) does not "
                                  f"match {questions}:{number} ({line['image']}: {line['text'].splitlines()[0]!r}); "
                                  "expected the same questions in the same order")
            items.append({"question_id": line["question_id"], "image": line["image"], "question": line["text"],
                          "answers": [label["label"]], "category": split})
    return items


def textvqa(questions: Path, answers: Path) -> list[dict[str, Any]]:
    """TextVQA val. ``questions``: LLaVA's ``llava_textvqa_val_v051_ocr.jsonl`` (``{"question_id": image id,
    "image": "<image id>.jpg", "text": "question\\nReference OCR token: ...\\nAnswer the question using a single
    word or phrase."}``). ``answers``: ``TextVQA_0.5.1_val.json`` (``{"data": [{"question_id", "image_id",
    "question", "answers": [10 answers], ...}]}``). Joined as LLaVA's ``eval_textvqa.py`` joins them, on (image
    id, lower-cased question), the question being the first line of LLaVA's text that is not the OCR line.
    Items: TextVQA's question id (LLaVA's repeats the image id), LLaVA's text with its OCR tokens, the 10
    answers. Images: TextVQA's ``train_images/`` (the val images are among them)."""
    shape = 'TextVQA_0.5.1_val.json: {"data": [{"question_id", "image_id", "question", "answers"}, ...]}'
    document = read_json(answers, shape)
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        raise FormatError(f"{answers} has no \"data\" list; expected {shape}")
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or not all(key in entry for key in ("image_id", "question", "answers")):
            raise FormatError(f"{answers}: data[{index}] lacks image_id/question/answers; expected {shape}")
        table[(str(entry["image_id"]), entry["question"].lower())] = entry  # the last of a repeated key wins
    items = []
    for number, line in _llava_questions(questions):
        question = next((text for text in line["text"].split("\n") if not text.startswith(OCR_PREFIX)), "")
        entry = table.get((str(line["question_id"]), question.lower()))
        if entry is None:
            raise FormatError(f"{questions}:{number}: image {line['question_id']} question {question!r} is not in "
                              f"{answers}; expected TextVQA_0.5.1_val.json")
        items.append({"question_id": str(entry.get("question_id", f"{line['question_id']}:{number}")),
                      "image": line["image"], "question": line["text"], "answers": [str(a) for a in entry["answers"]]})
    return items


def _mme_truth(root: Path) -> dict[tuple[str, str, str], str]:
    """``{(subtask, txt name, question): "Yes"|"No"}`` from MME_Benchmark_release_version: per subtask folder,
    ``questions_answers_YN/<image stem>.txt`` when it has ``images/``, else ``<image stem>.txt`` beside the
    images; each line ``question<TAB>answer`` (LLaVA's ``convert_answer_to_mme.py``)."""
    root = _existing(root, "MME_Benchmark_release_version (one folder per subtask)", directory=True)
    truth: dict[tuple[str, str, str], str] = {}
    for folder in sorted(entry for entry in root.iterdir() if entry.is_dir()):
        answers = folder / "questions_answers_YN" if (folder / "images").is_dir() else folder
        for path in sorted(answers.glob("*.txt")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.strip().split("\t")
                if len(fields) != 2:
                    raise FormatError(f"{path}:{number}: expected 'question<TAB>Yes|No', got {line[:80]!r}")
                truth[(folder.name, path.name, fields[0])] = fields[1]
    if not truth:
        raise FormatError(f"{root} holds no subtask folder with question files; expected MME_Benchmark_release_version "
                          "with existence/*.txt, artwork/questions_answers_YN/*.txt, ...")
    return truth


def mme(questions: Path, answers: Path) -> list[dict[str, Any]]:
    """MME. ``questions``: LLaVA's ``llava_mme.jsonl`` (``{"question_id": "artwork/images/14777.jpg", "image":
    the same, "text": "...?\\nAnswer the question using a single word or phrase.", "category": "artwork"}``; two
    questions per image). ``answers``: the ``MME_Benchmark_release_version`` folder (see :func:`_mme_truth`).
    Joined as LLaVA's ``convert_answer_to_mme.py`` joins them: subtask = the question id's first part, file
    = the image name's stem + ``.txt``, question = LLaVA's text without the single-word instruction plus
    ``" Please answer yes or no."`` (or with two spaces before it). Items: question id ``"<image>:<n>"``,
    ``answers: ["Yes"|"No"]``, ``category``: the subtask. Images: the same folder."""
    truth = _mme_truth(Path(answers))
    seen: dict[str, int] = {}
    items = []
    for number, line in _llava_questions(questions):
        identifier = str(line["question_id"])
        subtask, name = identifier.split("/")[0], identifier.split("/")[-1].split(".")[0] + ".txt"
        prompt = line["text"].replace(SINGLE_WORD, "").strip()
        keys = [(subtask, name, prompt)] if MME_SUFFIX in prompt else [
            (subtask, name, f"{prompt} {MME_SUFFIX}"), (subtask, name, f"{prompt}  {MME_SUFFIX}")]
        answer = next((truth[key] for key in keys if key in truth), None)
        if answer is None:
            raise FormatError(f"{questions}:{number}: {keys[0][2]!r} is not in {answers}/{subtask}/.../{name}; "
                              "expected MME_Benchmark_release_version with LLaVA's questions")
        seen[identifier] = seen.get(identifier, -1) + 1
        items.append({"question_id": f"{identifier}:{seen[identifier]}", "image": line["image"],
                      "question": line["text"], "answers": [answer], "category": subtask})
    return items


def scienceqa(questions: Path, answers: Path) -> list[dict[str, Any]]:
    """ScienceQA test. ``questions``: LLaVA's ``llava_test_CQM-A.json``, a JSON list of ``{"id": "5", ["image":
    "5/image.png"], "conversations": [{"from": "human", "value": "<image>\\nContext: ...\\nquestion\\nA. choice\\nB.
    choice"}, {"from": "gpt", "value": "B"}]}`` (4241 items, 2017 with an image). ``answers``: ScienceQA's
    ``problems.json`` (``{id: {"question", "choices": [...], "answer": index, "hint", "image", "split", ...}}``).
    Items: the question = LLaVA's human text without ``<image>`` and without its trailing option lines (the
    vqa task writes them back as ``A. choice`` lines and adds LLaVA's ``--single-pred-prompt`` line, so the
    prompt is LLaVA's), ``choices`` and ``answers: [letter]`` from problems.json (checked against LLaVA's
    answer), the image when there is one (else a text-only item), ``category``: ``"with image"`` or ``"without
    image"``. Images: ScienceQA's ``images/test/``."""
    shape = "LLaVA's llava_test_CQM-A.json: a JSON list of {\"id\", \"conversations\", [\"image\"]}"
    entries = read_json(questions, shape)
    problems = read_json(answers, 'ScienceQA\'s problems.json: {id: {"choices": [...], "answer": index, ...}}')
    if not isinstance(entries, list):
        raise FormatError(f"{questions} holds a JSON {type(entries).__name__}; expected {shape}")
    if not isinstance(problems, dict):
        raise FormatError(f"{answers} holds a JSON {type(problems).__name__}; expected ScienceQA's problems.json")
    items = []
    for index, entry in enumerate(entries):
        try:
            identifier, turns = str(entry["id"]), entry["conversations"]
            human = next(turn["value"] for turn in turns if turn.get("from") == "human")
        except (KeyError, TypeError, StopIteration):
            raise FormatError(f"{questions}: item {index} is not {{\"id\", \"conversations\": [{{\"from\": \"human\", "
                              f"\"value\"}}, ...]}}; expected {shape}") from None
        problem = problems.get(identifier)
        if not isinstance(problem, dict) or "choices" not in problem or "answer" not in problem:
            raise FormatError(f"{questions}: id {identifier} has no problem with choices and answer in {answers}; "
                              "expected ScienceQA's problems.json")
        choices = [str(choice) for choice in problem["choices"]]
        letter = LETTERS[int(problem["answer"])]
        given = next((turn["value"] for turn in turns if turn.get("from") == "gpt"), letter).strip()
        if given != letter:
            raise FormatError(f"{questions}: id {identifier} answers {given!r}, {answers} answer {letter!r}; expected "
                              "the problems.json LLaVA's file was made from")
        text = human.replace("<image>", "").strip()  # as LLaVA's model_vqa_science.py reads it
        options = "\n" + "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
        if not text.endswith(options):
            raise FormatError(f"{questions}: id {identifier} does not end with its options {options.strip()!r}; "
                              "expected LLaVA's CQM-A prompt (question, then one 'A. choice' line per option)")
        item: dict[str, Any] = {"question_id": identifier, "question": text[:-len(options)], "choices": choices,
                                "answers": [letter], "category": "with image" if entry.get("image") else "without image"}
        if entry.get("image"):
            item["image"] = entry["image"]
        items.append(item)
    if not items:
        raise FormatError(f"{questions} is empty; expected {shape}")
    return items


def karpathy(answers: Path, split: str = "test", captions: int = 5, dataset: str | None = None) -> list[dict[str, Any]]:
    """COCO or Flickr30k retrieval from Karpathy's split file (``dataset_coco.json`` / ``dataset_flickr30k.json``
    of ``caption_datasets.zip``): ``{"dataset": "coco", "images": [{"filepath": "val2014", "filename":
    "COCO_val2014_000000391895.jpg", "split": "test", "sentences": [{"raw": "...", ...}, ...], ...}]}``
    (Flickr30k entries have no ``"filepath"``). Items: one per image of ``split``: ``{"image":
    "filepath/filename", "captions": the first ``captions`` raw sentences (all when 0)}``. The test splits hold
    5000 (COCO) and 1000 (Flickr30k) images. ``dataset``: the expected ``"dataset"`` field, checked when given."""
    shape = "Karpathy's dataset_*.json: {\"dataset\", \"images\": [{\"filename\", \"split\", \"sentences\"}, ...]}"
    document = read_json(answers, shape)
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise FormatError(f"{answers} has no \"images\" list; expected {shape}")
    if dataset is not None and document.get("dataset", dataset) != dataset:
        raise FormatError(f"{answers} is Karpathy's {document['dataset']!r} file; expected dataset_{dataset}.json")
    items = []
    for index, entry in enumerate(images):
        try:
            if entry["split"] != split:
                continue
            texts = [sentence["raw"].strip() for sentence in entry["sentences"]]
            image = "/".join(part for part in (entry.get("filepath", ""), entry["filename"]) if part)
        except (KeyError, TypeError, AttributeError):
            raise FormatError(f"{answers}: images[{index}] is not {{\"filename\", \"split\", \"sentences\": "
                              f"[{{\"raw\"}}]}}; expected {shape}") from None
        items.append({"image": image, "captions": texts[:captions] if captions else texts})
    if not items:
        found = sorted({str(entry.get("split")) for entry in images if isinstance(entry, dict)})
        raise FormatError(f"{answers} has no image in split {split!r} (splits: {', '.join(found)})")
    return items


def imagenet_classnames(images: Path) -> list[str]:
    """CLIP's ImageNet-1k class names (open_clip's ``IMAGENET_CLASSNAMES``, the names open_clip's own zero-shot
    ImageNet evaluation uses), in the order of the 1000 WordNet-id sub-folders (``n01440764``, ...) of the
    ImageNet val folder ``images``, for the zero-shot task's ``classnames.txt``."""
    import re

    from open_clip import IMAGENET_CLASSNAMES

    folder = _existing(images, "the ImageNet val folder with one sub-folder per WordNet id", directory=True)
    wnids = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if len(wnids) != len(IMAGENET_CLASSNAMES) or not all(re.fullmatch(r"n\d{8}", wnid) for wnid in wnids):
        raise FormatError(f"{folder} has {len(wnids)} sub-folders ({', '.join(wnids[:3])}, ...); expected the 1000 "
                          "ImageNet-1k WordNet-id folders (n01440764, ...)")
    return list(IMAGENET_CLASSNAMES)


def place_images(items: Iterable[dict[str, Any]], images: Path, out: Path) -> tuple[list[dict[str, Any]], int]:
    """The items with ``"image"`` resolved under ``images`` and written relative to the folder of ``out`` when
    it lies inside it (else absolute), and how many of the images are missing. Raises when none exists."""
    images = _existing(images, "the benchmark's image folder", directory=True)
    base = Path(os.path.abspath(Path(out).parent))
    placed, missing, present, first_missing = [], 0, 0, None
    for item in items:
        if not item.get("image"):
            placed.append(item)
            continue
        path = Path(os.path.abspath(images / item["image"]))
        if path.is_file():
            present += 1
        else:
            missing += 1
            first_missing = first_missing or path
        relative = path.is_relative_to(base)
        placed.append({**item, "image": (path.relative_to(base).as_posix() if relative else str(path))})
    if missing and not present:
        raise FileNotFoundError(f"none of the {missing} images is under {images} (first expected: {first_missing}); "
                                "expected the folder LLaVA's --image-folder names for this benchmark")
    return placed, missing


def write_jsonl(items: Iterable[dict[str, Any]], out: Path) -> int:
    """Write one JSON object per line to ``out`` (folders created); ``question_id`` values must be unique.
    Returns the number of lines."""
    out = Path(out)
    lines, seen = [], set()
    for item in items:
        if "question_id" in item:
            if item["question_id"] in seen:
                raise FormatError(f"question_id {item['question_id']!r} appears twice; expected unique ids")
            seen.add(item["question_id"])
        lines.append(json.dumps(item, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return len(lines)
