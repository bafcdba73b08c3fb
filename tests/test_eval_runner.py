"""The eval runner on a tiny ImageNet-style folder written here: rows, scores, fidelity, cost, report, resume."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vtprune
from vtprune import flops
from vtprune.evals import cli
from vtprune.evals.results import IncompatibleRunError
from vtprune.evals.runner import EvalConfig, run

MODEL = "timm:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for index in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / name / f"{index}.png")
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    return root


def config(data, out, **overrides):
    values = dict(model=MODEL, task="classification", data=str(data), policies=("tome:r=8", "pitome:ratio=0.9"),
                  out=str(out), batch_size=4, weights="random")
    values.update(overrides)
    return EvalConfig(**values)


def rows_of(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_end_to_end(data, tmp_path):
    summary = run(config(data, tmp_path), progress=False)
    rows = rows_of(tmp_path)
    assert len(rows) == 3 * 11
    results = {entry["configuration"]: entry for entry in summary["results"]}
    assert list(results) == ["none (unpruned)", "tome:r=8", "pitome:ratio=0.9"]
    for entry in results.values():
        assert entry["samples"] == 11 and entry["errors"] == 1
    broken = [row for row in rows if row["sample"] == "dog/broken.png"]
    assert len(broken) == 3 and all(row["error"].startswith("UnidentifiedImageError") for row in broken)
    unpruned = results["none (unpruned)"]["metrics"]
    assert unpruned["agreement"] == 1.0 and unpruned["kl"] == 0.0
    # tokens and FLOPs come from the trace and equal the policy's own analytic count
    assert results["tome:r=8"]["tokens_final"] == 101 and results["none (unpruned)"]["tokens_final"] == 197
    expected = flops.estimate("vit_tiny_patch16_224", policy="tome:r=8").total
    assert results["tome:r=8"]["flops"]["paper"]["total"] == expected
    assert results["pitome:ratio=0.9"]["flops"]["paper"]["total"] < results["tome:r=8"]["flops"]["paper"]["total"]
    report = (tmp_path / "report.md").read_text()
    assert "| tome:r=8 | 11 | 1 |" in report and "random weights" in report
    assert (tmp_path / "summary.csv").read_text().splitlines()[0].startswith("configuration,samples,errors,top1")
    for name in ("accuracy_vs_flops.png", "accuracy_vs_latency.png", "tokens_per_layer.png"):
        with Image.open(tmp_path / name) as plot:
            assert plot.size[0] > 400 and plot.size[1] > 300
    assert results["tome:r=8"]["tokens_per_layer"] == [197 - 8 * layer for layer in range(12)]


def test_pareto_front():
    from vtprune.evals.plots import pareto_front

    points = [(10.0, 80.0, "a"), (5.0, 79.0, "b"), (6.0, 70.0, "c"), (3.0, 60.0, "d"), (12.0, 80.0, "e")]
    assert [label for *_, label in pareto_front(points)] == ["d", "b", "a"]


def test_scores_are_the_models_own_predictions(data, tmp_path):
    import timm
    from timm.data import create_transform, resolve_data_config

    run(config(data, tmp_path, policies=("tome:r=8",)), progress=False)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    rows = {(row["configuration"], row["sample"]): row for row in rows_of(tmp_path)}
    with torch.inference_mode():
        for label, name in enumerate(("cat", "dog")):
            for index in range(5):
                image = transform(Image.open(data / name / f"{index}.png").convert("RGB"))[None]
                plain = model(image)[0]
                with vtprune.applied(model, vtprune.ToMe(r=8)):
                    merged = model(image)[0]
                row = rows[("none (unpruned)", f"{name}/{index}.png")]
                assert row["prediction"] == int(plain.argmax()) and row["top1"] == float(int(plain.argmax()) == label)
                merged_row = rows[("tome:r=8", f"{name}/{index}.png")]
                assert merged_row["agreement"] == float(int(merged.argmax()) == int(plain.argmax()))
                kl = torch.nn.functional.kl_div(merged.double().log_softmax(-1), plain.double().log_softmax(-1),
                                                log_target=True, reduction="sum")
                assert merged_row["kl"] == pytest.approx(float(kl), rel=1e-3, abs=1e-6)


def test_an_interrupted_run_resumes_without_loss_or_duplicates(data, tmp_path):
    whole = tmp_path / "whole"
    run(config(data, whole), progress=False)
    parts = tmp_path / "parts"
    run(config(data, parts, limit=4), progress=False)  # the first batch only
    lines = (parts / "results.jsonl").read_text().splitlines()
    (parts / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # killed mid-write
    run(config(data, parts), progress=False)
    key = lambda row: (row["configuration"], row["sample"])  # noqa: E731
    resumed, reference = sorted(rows_of(parts), key=key), sorted(rows_of(whole), key=key)
    assert [key(row) for row in resumed] == [key(row) for row in reference]  # nothing lost, nothing twice
    for a, b in zip(resumed, reference):
        assert a["prediction"] == b["prediction"] if "prediction" in b else a["error"] == b["error"]


def test_a_smaller_limit_reports_only_its_samples(data, tmp_path):
    run(config(data, tmp_path, policies=("tome:r=8",)), progress=False)
    summary = run(config(data, tmp_path, policies=("tome:r=8",), limit=4), progress=False)
    assert [entry["samples"] for entry in summary["results"]] == [4, 4]
    assert len(rows_of(tmp_path)) == 2 * 11  # the rows of the longer run are kept


def test_a_different_configuration_is_refused_and_errors_are_one_line(data, tmp_path, capsys):
    run(config(data, tmp_path, policies=("tome:r=8",)), progress=False)
    with pytest.raises(IncompatibleRunError, match="differs in policies"):
        run(config(data, tmp_path, policies=("tome:r=4",)), progress=False)
    base = ["eval", "--model", MODEL, "--weights", "random", "--data", str(data), "--out", str(tmp_path / "x"),
            "--quiet"]
    for extra, message in ((["--task", "nope"], "unknown task 'nope'; tasks: classification"),
                           (["--task", "classification", "--policies", "tomme:r=2"], "unknown policy 'tomme'"),
                           (["--task", "classification", "--data", str(tmp_path / "missing")], "is not a directory")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_yaml_configuration(data, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {MODEL}\ntask: classification\ndata: {data}\nweights: random\nbatch_size: 8\n"
                    f"policies: [tome:r=16]\nout: {tmp_path / 'out'}\nlimit: 6\n")
    assert cli.main(["eval", "--config", str(path), "--quiet"]) == 0
    assert "| tome:r=16 | 6 |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["policies"] == ["tome:r=16"] and saved["batch_size"] == 8


def test_two_processes_give_the_single_process_results(data, tmp_path):
    """torchrun / accelerate launch: samples sharded over 2 CPU processes, rows gathered once."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    single = tmp_path / "single"
    run(config(data, single), progress=False)
    parallel = tmp_path / "parallel"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "vtprune.evals", "eval", "--model", MODEL, "--weights", "random", "--task", "classification",
               "--data", str(data), "--out", str(parallel), "--batch-size", "4", "--quiet",
               "--policies", "tome:r=8", "pitome:ratio=0.9"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((parallel / "summary.json").read_text())["processes"] == 2
    one, two = rows_of(single), rows_of(parallel)
    assert [(row["configuration"], row["sample"]) for row in one] == [(row["configuration"], row["sample"]) for row in two]
    for a, b in zip(one, two):
        assert a.get("prediction") == b.get("prediction") and a.get("top5") == b.get("top5")
        assert a.get("error") == b.get("error")
        assert a.get("kl", 0.0) == pytest.approx(b.get("kl", 0.0), abs=1e-6)


def test_each_process_takes_its_own_gpu(monkeypatch):
    """`--device cuda` under torchrun / accelerate: process i runs on cuda:<LOCAL_RANK>. (run() saves the
    configuration as asked, before this substitution, so every process checks config.json against "cuda";
    that path needs GPUs, which the test machines do not have.)"""
    from vtprune.evals.runner import process_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert [process_device("cuda", rank, 2) for rank in (0, 1)] == ["cuda:0", "cuda:1"]
    monkeypatch.setenv("LOCAL_RANK", "3")  # the fourth GPU of a second node
    assert process_device("cuda", 7, 8) == "cuda:3"
    assert process_device("cuda", 0, 1) == "cuda" and process_device("cuda:2", 1, 2) == "cuda:2"
    assert process_device("cpu", 1, 2) == "cpu"


def test_clip_zero_shot_on_open_clip(data, tmp_path):
    import open_clip

    summary = run(EvalConfig(model="open_clip:ViT-B-32", task="zeroshot", data=str(data), policies=("tome:r=4",),
                             out=str(tmp_path), batch_size=4, weights="random"), progress=False)
    results = {entry["configuration"]: entry for entry in summary["results"]}
    assert results["none (unpruned)"]["metrics"]["agreement"] == 1.0 and results["tome:r=4"]["errors"] == 1
    assert results["none (unpruned)"]["tokens_final"] == 50 and results["tome:r=4"]["tokens_final"] == 4
    assert summary["environment"]["attention_backend"] == "nn.MultiheadAttention"
    # the unpruned prediction is CLIP's own zero-shot answer over the folder names
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    transform = open_clip.image_transform(model.visual.image_size, is_train=False)
    rows = {(row["configuration"], row["sample"]): row for row in rows_of(tmp_path)}
    with torch.inference_mode():
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(["a photo of a cat.", "a photo of a dog."])),
                                             dim=-1)
        for name in ("cat", "dog"):
            image = transform(Image.open(data / name / "0.png").convert("RGB"))[None]
            scores = torch.nn.functional.normalize(model.encode_image(image), dim=-1) @ text.T
            assert rows[("none (unpruned)", f"{name}/0.png")]["prediction"] == int(scores.argmax())


def test_rerunning_a_finished_run_keeps_its_latency_and_measured_cost(data, tmp_path):
    first = run(config(data, tmp_path, policies=("tome:r=8",)), progress=False)
    again = run(config(data, tmp_path, policies=("tome:r=8",)), progress=False)  # every batch already done
    shorter = run(config(data, tmp_path, policies=("tome:r=8",), limit=4), progress=False)
    for summary in (again, shorter):
        for before, after in zip(first["results"], summary["results"]):
            assert after["latency_s_per_image"] == before["latency_s_per_image"] is not None
            assert after["latency_s_per_batch"] == before["latency_s_per_batch"]
            assert after["measured_on"] == before["measured_on"] and after["flops"] == before["flops"]
    assert [entry["measured_on"] for entry in again["results"]] == ["config (unpruned)", "trace of the last batch"]


def test_latency_counts_only_the_images_a_forward_ran_on(tmp_path):
    """One image per batch, one of three unreadable: its batch runs no forward, so it adds neither time nor an
    image, and the mean time per image equals the median per batch of the two timed batches."""
    rng = np.random.default_rng(2)
    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "data" / "cat" / "0.png")
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "data" / "dog" / "0.png")
    (tmp_path / "data" / "dog" / "1.png").write_bytes(b"not an image")
    summary = run(config(tmp_path / "data", tmp_path / "out", batch_size=1, policies=("tome:r=8",)), progress=False)
    for entry in summary["results"]:
        assert entry["errors"] == 1
        assert entry["latency_s_per_image"] == pytest.approx(entry["latency_s_per_batch"], rel=1e-9)


def test_retrieval_ties_count_against_the_model():
    """Two images whose only captions are the same text: each image's best caption ties with the other
    image's, so neither is a sure hit at R@1 (a strict > would count both as hits)."""
    from vtprune.evals.tasks import get_task

    task = get_task("retrieval")
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    task._current = (text, torch.tensor([0, 1, 2]))  # captions 0 and 1 identical; image 2's differs
    embeddings = [[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]
    rows = [{"label": index, "embedding": embedding, "fidelity": 1.0} for index, embedding in enumerate(embeddings)]
    metrics = task.summarise(rows)
    assert metrics["i2t_r1"] == pytest.approx(1 / 3)  # only image 2 is unambiguous
    assert metrics["t2i_r1"] == pytest.approx(2 / 3)  # caption 1's own image (0.6) loses to image 0 (0.8)


def test_retrieval_refuses_an_image_on_two_lines(tmp_path):
    from vtprune.evals.tasks import get_task

    lines = [{"image": "a.png", "caption": "one"}, {"image": "b.png", "caption": "two"},
             {"image": "a.png", "caption": "three"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match="image 'a.png' is on more than one line.*all its captions"):
        get_task("retrieval").samples(tmp_path / "test.jsonl")


def test_clip_retrieval_recalls_by_hand(tmp_path):
    import open_clip

    rng = np.random.default_rng(1)
    lines = []
    for index in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "captions": [f"picture {index}", f"view number {index}"]}))
    lines.append(json.dumps({"image": "missing.png", "captions": ["nothing here"]}))
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    summary = run(EvalConfig(model="open_clip:ViT-B-32", task="retrieval", data=str(tmp_path / "test.jsonl"),
                             policies=("tome:r=4",), out=str(tmp_path / "out"), batch_size=4, weights="random"),
                  progress=False)
    results = {entry["configuration"]: entry for entry in summary["results"]}
    assert results["none (unpruned)"]["errors"] == 1
    assert results["none (unpruned)"]["metrics"]["fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert 0.5 < results["tome:r=4"]["metrics"]["fidelity"] < 1.0
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    transform = open_clip.image_transform(model.visual.image_size, is_train=False)
    with torch.inference_mode():
        images = torch.stack([transform(Image.open(tmp_path / f"{i}.png").convert("RGB")) for i in range(6)])
        image = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        captions = [f"picture {i}" for i in range(6)] + [f"view number {i}" for i in range(6)]
        owner = list(range(6)) * 2
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    similarity = image @ text.T
    for k in (1, 5, 10):
        i2t = sum(any(owner[j] == i for j in similarity[i].topk(k).indices.tolist()) for i in range(6)) / 6
        t2i = sum(owner[j] in similarity[:, j].topk(min(k, 6)).indices.tolist() for j in range(12)) / 12
        assert results["none (unpruned)"]["metrics"][f"i2t_r{k}"] == pytest.approx(i2t)
        assert results["none (unpruned)"]["metrics"][f"t2i_r{k}"] == pytest.approx(t2i)
    assert "I→T R@1 %" in (tmp_path / "out" / "report.md").read_text()


def tiny_llava_checkpoint(path):
    """A tiny random LLaVA and a working processor (word-level tokenizer, 32 px CLIP image processor),
    saved like a hub checkpoint, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from conftest import build_tiny_llava

    words = ["<unk>", "<s>", "</s>", "<pad>", "USER:", "ASSISTANT:", "yes", "no", "what", "is", "this", "?", "a",
             "cat", "dog", "color", "red", "blue", "A.", "B."]
    words += [f"w{i}" for i in range(127 - len(words))]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.add_tokens(["<image>"], special_tokens=True)  # id 127, the model's image token
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=8, image_token="<image>",
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    build_tiny_llava().save_pretrained(path)
    processor.save_pretrained(path)
    return processor


def test_vqa_on_a_llava_checkpoint(tmp_path):
    from transformers import AutoModelForImageTextToText

    checkpoint = tmp_path / "llava"
    processor = tiny_llava_checkpoint(checkpoint)
    rng = np.random.default_rng(2)
    items = [("is this a cat ?", ["yes"]), ("is this a dog ?", ["no"]), ("what color is this ?", ["red", "red", "blue"]),
             ("what is this ?", ["cat"])]
    lines = []
    for index, (question, answers) in enumerate(items):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
        lines.append(json.dumps({"question_id": index, "image": f"{index}.png", "question": question,
                                 "answers": answers, **({"category": "existence"} if index < 2 else {})}))
    lines.append(json.dumps({"question_id": 9, "image": "0.png", "question": "which ?", "answer": "A",
                             "choices": ["cat", "dog"]}))
    lines.append(json.dumps({"question_id": 10, "image": "missing.png", "question": "what ?", "answer": "x"}))
    (tmp_path / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    summary = run(EvalConfig(model=f"hf:{checkpoint}", task="vqa", data=str(tmp_path / "vqa.jsonl"), batch_size=3,
                             policies=("randomkeep:keep=4", "visionzip:keep=6"), out=str(tmp_path / "out")),
                  progress=False)
    results = {entry["configuration"]: entry for entry in summary["results"]}
    # VisionZip's budget of 6 brings its random baseline (6 does not tile the 4x4 grid: no pooling baseline)
    assert list(results) == ["none (unpruned)", "randomkeep:keep=4", "visionzip:dominant=5,contextual=1,keep=6",
                             "randomkeep:keep=6"]
    assert [entry["errors"] for entry in results.values()] == [1] * 4
    assert results["none (unpruned)"]["metrics"]["agreement"] == 1.0
    assert results["none (unpruned)"]["tokens_final"] == 16 and results["randomkeep:keep=4"]["tokens_final"] == 4
    assert results["visionzip:dominant=5,contextual=1,keep=6"]["tokens_final"] == 6
    # the unpruned answers are the checkpoint's own greedy answers
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    rows = {(row["configuration"], row["sample"]): row for row in rows_of(tmp_path / "out")}
    with torch.inference_mode():
        prompt = f"USER: <image>\n{items[2][0]} ASSISTANT:"
        inputs = processor(images=[Image.open(tmp_path / "2.png").convert("RGB")], text=[prompt], return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        answer = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert rows[("none (unpruned)", "2")]["answer"] == answer.strip()
    # the metrics follow from the rows
    unpruned = [row for (label, _), row in rows.items() if label == "none (unpruned)" and row["error"] is None]
    assert results["none (unpruned)"]["metrics"]["exact"] == pytest.approx(sum(r["exact"] for r in unpruned) / 5)
    assert all("yesno_prediction" in rows[("none (unpruned)", str(i))] for i in (0, 1))
    mme = [rows[("none (unpruned)", str(i))]["mme_correct"] for i in (0, 1)]  # two images, one question each
    assert results["none (unpruned)"]["metrics"]["mme_perception"] == pytest.approx(100 * 2 * sum(mme) / 2)
    assert results["none (unpruned)"]["metrics"]["mme_cognition"] != results["none (unpruned)"]["metrics"]["mme_cognition"]
    assert "choice" in rows[("none (unpruned)", "9")]
    # summary.json is standard JSON: a metric with nothing to measure is null, not NaN
    def refuse(constant):
        raise AssertionError(f"{constant} in summary.json")

    saved = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=refuse)
    assert saved["results"][0]["metrics"]["mme_cognition"] is None


def test_baselines_at_the_policies_budgets():
    from conftest import build_tiny_llava
    from vtprune.evals.runner import baseline_specs

    llava = build_tiny_llava(vision_layers=2, image_size=336, patch_size=14)  # 24x24 grid
    assert baseline_specs(llava, ["flowcut:keep=64", "visionzip:keep=192+transprune", "fastv"]) == [
        "randomkeep:keep=64", "pool2d:keep=64", "randomkeep:keep=192"]
    import timm
    assert baseline_specs(timm.create_model("vit_tiny_patch16_224", pretrained=False), ["tome:r=8"]) == []


def test_vqa_answer_rules():
    from vtprune.evals.tasks import normalise_answer, yes_no

    assert normalise_answer("The Cat!") == "cat" and normalise_answer("a  red, car.") == "red car"
    assert yes_no("No, there is not.") == "no" and yes_no("Yes. It is not a dog.") == "yes"
    assert yes_no("There is not a cat") == "no"


def test_siglip_texts_are_padded_to_the_context_it_was_trained_with(tmp_path):
    """SigLIP pools the last position: each prompt must be padded to the text context (max_length), so its
    embedding does not depend on the longest prompt in the batch; too long captions are cut to the context."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel

    from vtprune.evals.tasks import ZeroShotTask

    checkpoint = tmp_path / "siglip"
    words = ["<unk>", "<pad>", "a", "photo", "of", "the", "cat.", "dog."]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(checkpoint)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(checkpoint)
    config = SiglipConfig(text_config=dict(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, max_position_embeddings=12),
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8))
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(checkpoint)
    model = SiglipModel.from_pretrained(checkpoint).eval()
    encode = ZeroShotTask()._encode_texts(model, f"hf:{checkpoint}")
    texts = ["a cat.", "a photo of the dog.", " ".join(["a photo of the cat."] * 4)]  # the last: 20 words
    with torch.inference_mode():
        together = encode(texts)
        for index, text in enumerate(texts):
            alone = model.get_text_features(**fast([text], padding="max_length", truncation=True, max_length=12,
                                                   return_tensors="pt"))
            torch.testing.assert_close(together[index], getattr(alone, "pooler_output", alone)[0])
        assert not torch.allclose(together[0], model.get_text_features(**fast(["a cat."], return_tensors="pt"))
                                  .pooler_output[0])  # unpadded, the last position is another token


def test_zero_shot_on_a_hugging_face_clip_checkpoint(data, tmp_path):
    """hf:PATH CLIP checkpoints (policies on vision_model); tokenizer and image processor built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    checkpoint = tmp_path / "clip"
    words = ["<unk>", "<pad>", "a", "photo", "of", "cat.", "dog."] + [f"w{i}" for i in range(57)]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>").save_pretrained(checkpoint)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(checkpoint)
    config = CLIPConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(checkpoint)
    summary = run(EvalConfig(model=f"hf:{checkpoint}", task="zeroshot", data=str(data), policies=("tome:r=2",),
                             out=str(tmp_path / "out"), batch_size=4), progress=False)
    results = {entry["configuration"]: entry for entry in summary["results"]}
    assert results["none (unpruned)"]["tokens_final"] == 17 and results["tome:r=2"]["tokens_final"] == 11
    model = CLIPModel.from_pretrained(checkpoint).eval()
    processor = CLIPImageProcessor.from_pretrained(checkpoint)
    fast = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    rows = {(row["configuration"], row["sample"]): row for row in rows_of(tmp_path / "out")}
    with torch.inference_mode():
        text = model.get_text_features(**fast(["a photo of a cat.", "a photo of a dog."], padding=True,
                                               return_tensors="pt")).pooler_output
        for name in ("cat", "dog"):
            pixels = processor(images=Image.open(data / name / "1.png").convert("RGB"), return_tensors="pt")
            image = model.get_image_features(**pixels).pooler_output
            scores = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
            assert rows[("none (unpruned)", f"{name}/1.png")]["prediction"] == int(scores.argmax())


def test_mme_scores_by_hand():
    from vtprune.evals.tasks import mme_scores

    rows = [  # existence: 2 images x 2 questions, 3 of 4 right, 1 image fully right -> 100 * (0.75 + 0.5) = 125
        {"category": "existence", "image": "1.jpg", "mme_correct": 1.0},
        {"category": "existence", "image": "1.jpg", "mme_correct": 1.0},
        {"category": "existence", "image": "2.jpg", "mme_correct": 1.0},
        {"category": "existence", "image": "2.jpg", "mme_correct": 0.0},
        # code_reasoning: one image, both right -> 200
        {"category": "code_reasoning", "image": "3.jpg", "mme_correct": 1.0},
        {"category": "code_reasoning", "image": "3.jpg", "mme_correct": 1.0},
    ]
    assert mme_scores(rows) == {"mme_perception": 125.0, "mme_cognition": 200.0}
    scores = mme_scores([{"category": "other"}])
    assert all(value != value for value in scores.values())  # nan without MME subtasks


def test_a_malformed_jsonl_line_is_named(tmp_path):
    from vtprune.evals.tasks import get_task

    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.png", "question": "q", "answers": ["x"]}\n{"image": "b.png"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected .*question"):
        get_task("vqa").samples(path)
    path.write_text('{"image": "a.png", "captions": ["x"]}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected"):
        get_task("retrieval").samples(path)
    with pytest.raises(FileNotFoundError, match="retrieval data .* is not a file"):
        get_task("retrieval").samples(tmp_path / "missing.jsonl")
