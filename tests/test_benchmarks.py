"""vtprune prepare: each benchmark's upstream files (written here in their exact formats, tiny) into the task
JSONL, then the runner on the result; the metrics that follow the papers' conventions, by hand."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from vtprune.evals import benchmarks, cli
from vtprune.evals.tasks import (Question, VQATask, ZeroShotTask, choice_letter, mme_label, pope_scores,
                                 vqa_accuracy, yes_no_scores)

SINGLE = "\nAnswer the question using a single word or phrase."


def write_lines(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def prepare(*args):
    return cli.main(["prepare", *map(str, args)])


# ---------------------------------------------------------------- POPE


def pope_files(root):
    """LLaVA's llava_pope_test.jsonl (ids: adversarial 1.., random 10000001.., popular 20000001..) and POPE's
    coco_pope_<split>.json files, two questions per split."""
    questions, labels = [], {}
    for offset, split in ((0, "adversarial"), (10000000, "random"), (20000000, "popular")):
        rows = [("COCO_val2014_000000000001.jpg", "Is there a dog in the image?", "yes"),
                ("COCO_val2014_000000000002.jpg", "Is there a car in the image?", "no" if split != "random" else "yes")]
        for index, (name, text, label) in enumerate(rows, 1):
            questions.append({"question_id": offset + index, "image": name, "text": text + SINGLE, "category": split})
        labels[split] = [{"question_id": index, "image": name, "text": text, "label": label}
                         for index, (name, text, label) in enumerate(rows, 1)]
    write_lines(root / "llava_pope_test.jsonl", questions)
    for split, rows in labels.items():
        write_lines(root / "coco" / f"coco_pope_{split}.json", rows)
    for index in (1, 2):
        image(root / "val2014" / f"COCO_val2014_00000000000{index}.jpg", index)
    return root / "llava_pope_test.jsonl"


def test_pope_joins_each_split_in_order(tmp_path):
    questions = pope_files(tmp_path)
    out = tmp_path / "pope.jsonl"
    assert prepare("pope", "--questions", questions, "--answers", tmp_path / "coco", "--images",
                   tmp_path / "val2014", "--out", out) == 0
    items = read(out)
    assert [(item["question_id"], item["category"], item["answers"]) for item in items] == [
        (1, "adversarial", ["yes"]), (2, "adversarial", ["no"]), (20000001, "popular", ["yes"]),
        (20000002, "popular", ["no"]), (10000001, "random", ["yes"]), (10000002, "random", ["yes"])]
    assert items[0]["image"] == "val2014/COCO_val2014_000000000001.jpg"  # relative to the output file
    assert items[0]["question"] == "Is there a dog in the image?" + SINGLE  # LLaVA's prompt, verbatim
    # one split's file: only that split
    only = benchmarks.pope(questions, [tmp_path / "coco" / "coco_pope_random.json"])
    assert {item["category"] for item in only} == {"random"} and len(only) == 2


def test_pope_files_out_of_order_are_refused(tmp_path):
    questions = pope_files(tmp_path)
    path = tmp_path / "coco" / "coco_pope_popular.json"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(benchmarks.FormatError, match=r"coco_pope_popular.json:1 .* does not match .*"
                                                     r"llava_pope_test.jsonl:5"):
        benchmarks.pope(questions, [tmp_path / "coco"])
    (tmp_path / "coco" / "coco_pope_other.json").write_text(lines[0] + "\n")
    with pytest.raises(benchmarks.FormatError, match="split 'other' has no questions"):
        benchmarks.pope(questions, [tmp_path / "coco" / "coco_pope_other.json"])


# ---------------------------------------------------------------- GQA


def test_gqa(tmp_path, capsys):
    questions = write_lines(tmp_path / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "201307251", "image": "n161313.jpg", "text": "Is it overcast?" + SINGLE, "category": "default"},
        {"question_id": "201640614", "image": "n235859.jpg", "text": "Who is wearing the dress?" + SINGLE,
         "category": "default"}])
    annotations = tmp_path / "testdev_balanced_questions.json"
    annotations.write_text(json.dumps({
        "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no", "isBalanced": True,
                      "fullAnswer": "No, it is clear.", "types": {"structural": "verify"}},
        "201640614": {"imageId": "n235859", "question": "Who is wearing the dress?", "answer": "woman",
                      "isBalanced": True, "fullAnswer": "The woman is wearing a dress.", "types": {}}}))
    image(tmp_path / "images" / "n161313.jpg")
    out = tmp_path / "elsewhere" / "gqa.jsonl"
    assert prepare("gqa", "--questions", questions, "--answers", annotations, "--images", tmp_path / "images",
                   "--out", out) == 0
    assert "1 of the images missing" in capsys.readouterr().out  # n235859.jpg is missing: counted, not fatal
    items = read(out)
    assert [item["answers"] for item in items] == [["no"], ["woman"]] and "category" not in items[0]
    assert items[0]["image"] == str(tmp_path / "images" / "n161313.jpg")  # outside the output's folder: absolute
    table = json.loads(annotations.read_text())
    table.pop("201640614")
    annotations.write_text(json.dumps(table))
    assert prepare("gqa", "--questions", questions, "--answers", annotations, "--images", tmp_path / "images",
                   "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert "llava_gqa_testdev_balanced.jsonl:2: question 201640614 is not in" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- TextVQA


def test_textvqa_joins_on_image_and_question(tmp_path):
    ocr = "\nReference OCR token: DAKOTA, DIGITAL"
    questions = write_lines(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg",
         "text": "What is the brand of this camera?" + ocr + SINGLE, "category": "default"},
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg",
         "text": "What does the text say?" + ocr + SINGLE, "category": "default"}])
    answers = tmp_path / "TextVQA_0.5.1_val.json"
    answers.write_text(json.dumps({"dataset_name": "textvqa", "data": [
        {"question": "what does the text say?", "image_id": "003a8ae2ef43b901", "question_id": 34603,
         "answers": ["digital"] * 10, "set_name": "val"},
        {"question": "what is the brand of this camera?", "image_id": "003a8ae2ef43b901", "question_id": 34602,
         "answers": ["dakota"] * 7 + ["nous les gosses"] * 3, "set_name": "val"}]}))
    items = benchmarks.textvqa(questions, answers)
    assert [item["question_id"] for item in items] == ["34602", "34603"]  # TextVQA's ids: LLaVA's repeat the image
    assert items[0]["answers"] == ["dakota"] * 7 + ["nous les gosses"] * 3
    assert items[0]["question"] == "What is the brand of this camera?" + ocr + SINGLE  # with the OCR tokens
    answers.write_text(json.dumps({"data": [{"question": "x"}]}))
    with pytest.raises(benchmarks.FormatError, match=r"data\[0\] lacks image_id/question/answers"):
        benchmarks.textvqa(questions, answers)


# ---------------------------------------------------------------- MME


def mme_release(root):
    """MME_Benchmark_release_version: existence flat (images and .txt side by side), artwork nested
    (images/ + questions_answers_YN/), code_reasoning with a double space before the yes/no request."""
    image(root / "existence" / "000000006040.jpg")
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n")
    image(root / "artwork" / "images" / "14777.jpg", 1)
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "14777.txt").write_text(
        "Does this artwork belong to the type of religious? Please answer yes or no.\tYes\n"
        "Does this artwork belong to the type of historical? Please answer yes or no.\tNo\n")
    image(root / "code_reasoning" / "0020.png", 2)
    (root / "code_reasoning" / "0020.txt").write_text(
        "Is a python code shown in the picture?  Please answer yes or no.\tYes\n"
        "Is a c++ code shown in the picture?  Please answer yes or no.\tNo\n")
    return root


def test_mme_joins_as_llava_converts(tmp_path):
    root = mme_release(tmp_path / "MME_Benchmark_release_version")
    lines = [("existence/000000006040.jpg", "Is there a bed in this image?"),
             ("existence/000000006040.jpg", "Is there a train in this image?"),
             ("artwork/images/14777.jpg", "Does this artwork belong to the type of religious?"),
             ("artwork/images/14777.jpg", "Does this artwork belong to the type of historical?"),
             ("code_reasoning/0020.png", "Is a python code shown in the picture?"),
             ("code_reasoning/0020.png", "Is a c++ code shown in the picture?")]
    questions = write_lines(tmp_path / "llava_mme.jsonl", [
        {"question_id": name, "image": name, "text": text + SINGLE, "category": name.split("/")[0]}
        for name, text in lines])
    out = tmp_path / "mme.jsonl"
    assert prepare("mme", "--questions", questions, "--answers", root, "--images", root, "--out", out) == 0
    items = read(out)
    assert [item["answers"] for item in items] == [["No"], ["Yes"], ["Yes"], ["No"], ["Yes"], ["No"]]
    assert [item["category"] for item in items] == ["existence"] * 2 + ["artwork"] * 2 + ["code_reasoning"] * 2
    assert [item["question_id"] for item in items[:2]] == ["existence/000000006040.jpg:0",
                                                          "existence/000000006040.jpg:1"]
    assert items[2]["image"] == "MME_Benchmark_release_version/artwork/images/14777.jpg"
    (root / "existence" / "000000006040.txt").write_text("Is there a train in this image? Yes\n")
    with pytest.raises(benchmarks.FormatError, match=r"000000006040.txt:1: expected 'question<TAB>Yes\|No'"):
        benchmarks.mme(questions, root)


# ---------------------------------------------------------------- ScienceQA


def scienceqa_files(root):
    """LLaVA's llava_test_CQM-A.json and ScienceQA's problems.json: a text-only problem, one with an image
    and a context, and a two-line choice (as ScienceQA's letter closings)."""
    problems = {
        "4": {"question": "Which figure of speech is used in this text?\nSing, O goddess.", "choices":
              ["chiasmus", "apostrophe"], "answer": 1, "hint": "", "image": None, "task": "closed choice",
              "grade": "grade11", "subject": "language science", "split": "test"},
        "5": {"question": "Which of the following could Gordon's test show?", "choices": ["if it was damaged",
              "how steady it was", "whether it swings"], "answer": 1, "hint": "Gordon tested a parachute.",
              "image": "image.png", "task": "closed choice", "grade": "grade8", "subject": "natural science",
              "split": "test"},
        "512": {"question": "Which closing is correct for a letter?", "choices": ["See you soon,\nJanet",
                "See You Soon,\nJanet"], "answer": 0, "hint": "", "image": None, "split": "test"},
        "1": {"question": "unused", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None, "split": "train"}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    llava = [
        {"id": "4", "conversations": [
            {"from": "human", "value": "Which figure of speech is used in this text?\nSing, O goddess.\nA. chiasmus\n"
                                       "B. apostrophe"}, {"from": "gpt", "value": "B"}]},
        {"id": "5", "image": "5/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: Gordon tested a parachute.\nWhich of the following could "
                                       "Gordon's test show?\nA. if it was damaged\nB. how steady it was\nC. whether "
                                       "it swings"}, {"from": "gpt", "value": "B"}]},
        {"id": "512", "conversations": [
            {"from": "human", "value": "Which closing is correct for a letter?\nA. See you soon,\nJanet\nB. See You "
                                       "Soon,\nJanet"}, {"from": "gpt", "value": "A"}]}]
    (root / "llava_test_CQM-A.json").write_text(json.dumps(llava, indent=2))
    image(root / "images" / "test" / "5" / "image.png", 5)
    return root / "llava_test_CQM-A.json", root / "problems.json", llava


def test_scienceqa_keeps_llavas_prompt(tmp_path):
    from vtprune.evals.mini.models import build_mini_llava_processor

    questions, problems, llava = scienceqa_files(tmp_path)
    items = benchmarks.scienceqa(questions, problems)
    assert [(item["question_id"], item["answers"], item["category"]) for item in items] == [
        ("4", ["B"], "without image"), ("5", ["B"], "with image"), ("512", ["A"], "without image")]
    assert "image" not in items[0] and items[1]["image"] == "5/image.png"
    assert items[1]["question"] == "Context: Gordon tested a parachute.\nWhich of the following could Gordon's test show?"
    assert items[2]["choices"] == ["See you soon,\nJanet", "See You Soon,\nJanet"]
    # the vqa task's prompt is LLaVA's: its human text (image token first) plus --single-pred-prompt's line
    task = VQATask()
    processor = build_mini_llava_processor()  # a real LlavaProcessor with no chat template, as LLaVA-1.5's
    assert processor.chat_template is None
    for item, entry in zip(items, llava):
        question = Question(item["question"], tuple(item["answers"]), tuple(item["choices"]), item["category"])
        prompt = task._prompt(processor, question, "image" in item)
        value = entry["conversations"][0]["value"].replace("<image>", "").strip()
        expected = ("<image>\n" if "image" in item else "") + value + \
            "\nAnswer with the option's letter from the given choices directly."
        assert prompt == f"USER: {expected} ASSISTANT:"
    broken = json.loads(problems.read_text())
    broken["5"]["answer"] = 2
    problems.write_text(json.dumps(broken))
    with pytest.raises(benchmarks.FormatError, match="id 5 answers 'B', .* answer 'C'"):
        benchmarks.scienceqa(questions, problems)


# ---------------------------------------------------------------- Karpathy retrieval splits


def test_karpathy_splits(tmp_path):
    sentences = lambda n: [{"tokens": ["a"], "raw": f"caption {i}.", "imgid": 0, "sentid": i} for i in range(n)]  # noqa: E731
    coco = tmp_path / "dataset_coco.json"
    coco.write_text(json.dumps({"dataset": "coco", "images": [
        {"filepath": "val2014", "sentids": [0], "filename": "COCO_val2014_000000391895.jpg", "imgid": 0,
         "split": "test", "sentences": sentences(7), "cocoid": 391895},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "imgid": 1, "split": "restval",
         "sentences": sentences(5), "cocoid": 9}]}))
    image(tmp_path / "coco" / "val2014" / "COCO_val2014_000000391895.jpg")
    out = tmp_path / "coco_test.jsonl"
    assert prepare("coco-karpathy", "--answers", coco, "--images", tmp_path / "coco", "--out", out) == 0
    assert read(out) == [{"image": "coco/val2014/COCO_val2014_000000391895.jpg",
                          "captions": [f"caption {i}." for i in range(5)]}]
    assert len(benchmarks.karpathy(coco, "test", 0)[0]["captions"]) == 7
    flickr = tmp_path / "dataset_flickr30k.json"
    flickr.write_text(json.dumps({"dataset": "flickr30k", "images": [
        {"sentids": [0], "imgid": 0, "sentences": sentences(5), "split": "test", "filename": "1000092795.jpg"}]}))
    assert benchmarks.karpathy(flickr, dataset="flickr30k")[0]["image"] == "1000092795.jpg"
    with pytest.raises(benchmarks.FormatError, match="is Karpathy's 'flickr30k' file; expected dataset_coco.json"):
        benchmarks.karpathy(flickr, dataset="coco")
    with pytest.raises(benchmarks.FormatError, match="no image in split 'val' \\(splits: restval, test\\)"):
        benchmarks.karpathy(coco, "val")


def test_imagenet_class_names_for_zero_shot(tmp_path):
    from open_clip import IMAGENET_CLASSNAMES

    val = tmp_path / "val"
    wnids = [f"n{index:08d}" for index in range(1000)]
    for wnid in wnids:
        (val / wnid).mkdir(parents=True)
    out = val / "classnames.txt"
    assert prepare("imagenet-classnames", "--images", val, "--out", out) == 0
    assert out.read_text().splitlines()[:2] == ["tench", "goldfish"]
    assert ZeroShotTask.class_names(val) == list(IMAGENET_CLASSNAMES)  # the file wins over the folder names
    out.write_text("tench\n")
    with pytest.raises(ValueError, match="lists 1 class names but .* has 1000 class sub-folders"):
        ZeroShotTask.class_names(val)
    out.unlink()
    assert ZeroShotTask.class_names(val)[0] == "n00000000"
    (val / "n00000000").rename(val / "tench_fish")
    with pytest.raises(benchmarks.FormatError, match="expected the 1000 ImageNet-1k WordNet-id folders"):
        benchmarks.imagenet_classnames(val)


def test_missing_inputs_are_named_in_one_line(tmp_path, capsys):
    questions = pope_files(tmp_path)
    cases = [(["pope", "--questions", questions, "--images", tmp_path], "pope needs --answers"),
             (["pope", "--questions", questions, "--answers", tmp_path / "none", "--images", tmp_path],
              "none is not a file; expected a POPE annotation file"),
             (["pope", "--questions", questions, "--answers", tmp_path / "coco", "--images", tmp_path / "coco"],
              "none of the 6 images is under"),
             (["scienceqa", "--questions", questions, "--answers", questions, "--images", tmp_path],
              "is not JSON"),
             (["gqa", "--questions", write_lines(tmp_path / "object.jsonl", [{"a": 1}]), "--answers",
               write_lines(tmp_path / "gqa.json", [{"1": {"answer": "x"}}]), "--images", tmp_path],
              "object.jsonl:1 has keys ['a']; expected LLaVA's question JSONL")]
    for args, message in cases:
        assert prepare(*args, "--out", tmp_path / "x.jsonl") == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------- metrics that follow the papers


def test_vqa_accuracy_averages_the_leave_one_out_subsets():
    # TextVQA/VQAv2: 10 answers, 3 match: 7 subsets keep 3 matches (1.0), 3 keep 2 (2/3) -> 0.9
    assert vqa_accuracy("dakota", ["dakota"] * 3 + ["x"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dakota", ["dakota"] * 4 + ["x"] * 6) == 1.0
    assert vqa_accuracy("dakota", ["dakota"] + ["x"] * 9) == pytest.approx(0.9 * 1 / 3)
    assert vqa_accuracy("no", ["no"]) == pytest.approx(1 / 3) and vqa_accuracy("x", ["no"]) == 0


def test_a_model_that_never_says_yes_scores_pope_f1_zero():
    """2TP / (2TP + FP + FN): no true positive on a split with positives is F1 0, which a heavily pruned model
    answering "no" to everything must show, not nan (which the report would print as "-")."""
    always_no = [("no", "yes"), ("no", "no"), ("no", "yes"), ("no", "no")]
    scores = yes_no_scores(always_no)
    assert scores["f1"] == 0.0 and scores["recall"] == 0.0 and math.isnan(scores["precision"])
    assert yes_no_scores([("yes", "no"), ("no", "yes")])["f1"] == 0.0
    assert math.isnan(yes_no_scores([("no", "no")])["f1"])  # no positive anywhere: undefined


def test_pope_f1_is_the_mean_of_the_split_f1s():
    def rows(split, pairs):
        return [{"category": split, "yesno_prediction": p, "yesno_reference": r} for p, r in pairs]

    adversarial = [("yes", "yes"), ("yes", "no"), ("no", "no"), ("no", "yes")]  # P = R = 1/2: F1 1/2
    random = [("yes", "yes"), ("yes", "yes"), ("no", "no"), ("yes", "no")]  # P 2/3, R 1: F1 0.8
    scores = pope_scores(rows("adversarial", adversarial) + rows("random", random))
    assert scores["pope_f1_adversarial"] == pytest.approx(0.5) and scores["pope_f1_random"] == pytest.approx(0.8)
    assert scores["pope_f1"] == pytest.approx(0.65)  # popular absent: the mean of the two present
    assert math.isnan(scores["pope_f1_popular"])
    pooled = yes_no_scores(adversarial + random)["f1"]
    assert pooled == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4)) and pooled != scores["pope_f1"]
    assert math.isnan(pope_scores([{"category": "existence"}])["pope_f1"])  # no POPE split: nan
    assert math.isnan(pope_scores([])["pope_f1"])


def test_answers_are_read_as_the_official_scripts_read_them():
    assert [choice_letter(text, 3) for text in ("B", "B. how steady", "The answer is C.", "D", "apostrophe", "B.")] \
        == ["B", "B", "C", "", "", ""]
    assert [mme_label(text) for text in ("Yes", "No, it is not.", "Not really", "nope", "I think so")] == \
        ["yes", "no", "no", "no", "other"]


def test_a_repeated_question_id_is_refused(tmp_path):
    path = write_lines(tmp_path / "vqa.jsonl", [{"question_id": 1, "image": "a.png", "question": "q", "answers": ["x"]},
                                                {"question_id": 1, "image": "b.png", "question": "q", "answers": ["y"]}])
    with pytest.raises(ValueError, match="question_id '1' appears more than once"):
        VQATask().samples(path)


# ---------------------------------------------------------------- prepare, then the runner


def test_prepared_pope_and_scienceqa_run_and_score_by_category(tmp_path):
    """POPE and ScienceQA prepared, joined in one file, run with a projector and an LLM-site policy in batches
    of 4: one of image items, one mixing image and text-only items, a last one of a text-only item. POPE F1 per
    split and ScienceQA IMG follow from the rows; the cost comes from the trace of image rows."""
    from test_eval_runner import tiny_llava_checkpoint
    from vtprune.evals.runner import EvalConfig, run

    pope_questions = pope_files(tmp_path / "pope")
    sqa_questions, problems, _ = scienceqa_files(tmp_path / "sqa")
    assert prepare("pope", "--questions", pope_questions, "--answers", tmp_path / "pope" / "coco", "--images",
                   tmp_path / "pope" / "val2014", "--out", tmp_path / "pope.jsonl") == 0
    assert prepare("scienceqa", "--questions", sqa_questions, "--answers", problems, "--images",
                   tmp_path / "sqa" / "images" / "test", "--out", tmp_path / "sqa.jsonl") == 0
    data = tmp_path / "both.jsonl"
    data.write_text((tmp_path / "pope.jsonl").read_text() + (tmp_path / "sqa.jsonl").read_text())
    tiny_llava_checkpoint(tmp_path / "llava")
    summary = run(EvalConfig(model=f"hf:{tmp_path / 'llava'}", task="vqa", data=str(data), batch_size=4,
                             policies=("randomkeep:keep=4", "transprune"), out=str(tmp_path / "out")), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert all(row["error"] is None for row in rows) and len(rows) == 3 * 9
    for entry in summary["results"]:
        mine = [row for row in rows if row["configuration"] == entry["configuration"]]
        metrics = entry["metrics"]
        for split in ("adversarial", "popular", "random"):
            pairs = [(row["yesno_prediction"], row["yesno_reference"]) for row in mine if row["category"] == split]
            assert len(pairs) == 2
            f1 = yes_no_scores(pairs)["f1"]
            assert metrics[f"pope_f1_{split}"] == pytest.approx(f1, nan_ok=True)
        split_f1 = [metrics[f"pope_f1_{split}"] for split in ("adversarial", "popular", "random")]
        assert metrics["pope_f1"] == pytest.approx(sum(split_f1) / 3, nan_ok=True)
        choice = {row["sample"]: row for row in mine if "choice" in row}
        assert sorted(choice) == ["4", "5", "512"] and [choice[s]["has_image"] for s in ("4", "5", "512")] == [
            False, True, False]
        assert metrics["choice_img"] == choice["5"]["choice"]  # the one ScienceQA item with an image
        assert metrics["choice"] == pytest.approx(sum(row["choice"] for row in choice.values()) / 3)
    results = {entry["configuration"]: entry for entry in summary["results"]}
    for label in ("randomkeep:keep=4", "transprune"):  # the last batch (text-only) leaves the image rows' trace
        entry = next(value for key, value in results.items() if key.startswith(label))
        assert entry["measured_on"] == "trace of the last batch"
    assert results["randomkeep:keep=4"]["tokens_final"] == 4
    report = (tmp_path / "out" / "report.md").read_text()
    assert "POPE F1 %" in report and "choice IMG %" in report
