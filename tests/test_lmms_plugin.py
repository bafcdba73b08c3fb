"""The lmms-eval model plugin, with lmms-eval itself: entry-point registration, a real `python -m lmms_eval`
run on a tiny local task (`--include_path`), and the plugin's answers, log-likelihoods and token counts
checked against the model driven by hand."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vtprune
from test_eval_runner import tiny_llava_checkpoint

ITEMS = [("is this a cat ?", "yes"), ("is this a dog ?", "no"), ("what color is this ?", "red"),
         ("what is this ?", "cat"), ("is this a cat ?", "no")]

TASK_YAML = """task: vtprune_tiny_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

TASK_UTILS = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A tiny LLaVA checkpoint, five images with questions, and an lmms-eval task folder reading them."""
    root = tmp_path_factory.mktemp("lmms")
    processor = tiny_llava_checkpoint(root / "llava")
    rng = np.random.default_rng(5)
    lines = []
    for index, (question, answer) in enumerate(ITEMS):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"{index}.png")
        lines.append(json.dumps({"image": str(root / f"{index}.png"), "question": question, "answer": answer}))
    (root / "tiny.jsonl").write_text("\n".join(lines) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny.yaml").write_text(TASK_YAML.format(data=root / "tiny.jsonl"))
    (root / "tasks" / "utils.py").write_text(TASK_UTILS)
    return root, processor


def by_hand(root, processor, policy, max_new_tokens=3):
    """Greedy answers, prompt lengths and new-token counts of the checkpoint patched with ``policy``, one
    sample at a time."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(root / "llava").eval()
    answers, prompt_tokens, new_tokens = [], [], []
    handle = vtprune.apply(model, policy) if policy else None
    with torch.inference_mode():
        for index, (question, _) in enumerate(ITEMS):
            image = Image.open(root / f"{index}.png").convert("RGB")
            inputs = processor(images=[image], text=[f"USER: <image>\n{question} ASSISTANT:"], return_tensors="pt")
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = generated[0, inputs["input_ids"].shape[1]:]
            answers.append(processor.batch_decode(new[None], skip_special_tokens=True)[0])
            new_tokens.append(int((new != processor.tokenizer.pad_token_id).sum()))
            prompt_tokens.append(inputs["input_ids"].shape[1] - 16 + (handle.trace.visual_tokens[0] if handle else 16))
    return answers, prompt_tokens, new_tokens


def test_the_entry_point_registers_the_model_with_lmms_eval():
    from lmms_eval.models import get_model, list_available_models

    from vtprune.evals.lmms import VtpruneLlava

    assert "vtprune" in list_available_models()
    assert get_model("vtprune") is VtpruneLlava and get_model("vtprune_llava") is VtpruneLlava


POLICY = "visionzip:dominant=5,contextual=1"  # commas inside the value: quoted, as lmms-eval expects


def lmms_eval(root, out, launcher, batch_size=1):
    """``python -m lmms_eval`` (or under ``torchrun``) with the plugin on the tiny task; returns the results
    JSON and the sample log in document order."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(out / "hf"),
               OMP_NUM_THREADS="1")
    command = [*launcher, "-m", "lmms_eval", "--model", "vtprune", "--model_args",
               f'pretrained={root / "llava"},policy="{POLICY}",token_log={out / "tokens.jsonl"}',
               "--tasks", "vtprune_tiny_vqa", "--include_path", str(root / "tasks"), "--output_path", str(out),
               "--log_samples", "--device", "cpu", "--batch_size", str(batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(open(glob.glob(str(out / "*" / "*_results.json"))[0]).read())
    samples = sorted((json.loads(line) for line in open(glob.glob(str(out / "*" / "*_samples_*.jsonl"))[0])),
                     key=lambda sample: sample["doc_id"])
    return results, samples


def test_lmms_eval_runs_a_local_task_with_a_pruned_llava(lab, tmp_path):
    root, processor = lab
    results, samples = lmms_eval(root, tmp_path, [sys.executable], batch_size=2)
    answers, prompt_tokens, new_tokens = by_hand(root, processor, POLICY)
    # the answers lmms-eval scored are the pruned model's own greedy answers (batched by 2, left padded)
    assert [sample["filtered_resps"] for sample in samples] == answers
    expected = np.mean([answer.strip() == item[1] for answer, item in zip(answers, ITEMS)])
    assert results["results"]["vtprune_tiny_vqa"]["exact_match,none"] == pytest.approx(expected)
    # token counts: per sample in the sample log, averaged in the results, per request in the token log
    assert [sample["token_counts"][0]["input_tokens"] for sample in samples] == prompt_tokens
    assert [sample["token_counts"][0]["output_tokens"] for sample in samples] == new_tokens
    assert results["throughput"]["avg_visual_tokens_in"] == 16 and results["throughput"]["avg_visual_tokens"] == 6
    assert results["throughput"]["avg_prefill_tflops"] > 0
    log = [json.loads(line) for line in (tmp_path / "tokens.jsonl").read_text().splitlines()]
    assert sorted(record["doc_id"] for record in log) == list(range(len(ITEMS)))
    assert {(record["policy"], record["visual_tokens_in"], record["visual_tokens"]) for record in log} == {
        (POLICY, 16, 6)}


def test_two_processes_under_torchrun_give_the_single_process_answers(lab, tmp_path):
    root, processor = lab
    results, samples = lmms_eval(root, tmp_path, [sys.executable, "-m", "torch.distributed.run",
                                                  "--nproc_per_node", "2"])
    answers, _, _ = by_hand(root, processor, POLICY)
    assert [sample["filtered_resps"] for sample in samples] == answers  # sharded by lmms-eval, gathered once
    expected = np.mean([answer.strip() == item[1] for answer, item in zip(answers, ITEMS)])
    assert results["results"]["vtprune_tiny_vqa"]["exact_match,none"] == pytest.approx(expected)
    logs = [[json.loads(line)["doc_id"] for line in (tmp_path / f"tokens.rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)]
    # each process its own file; lmms-eval pads the shorter shard with a repeated request (5 docs, 2 ranks)
    assert set(logs[0]) | set(logs[1]) == set(range(len(ITEMS))) and len(logs[0]) == len(logs[1]) == 3


def instances(kind, arguments):
    from lmms_eval.api.instance import Instance

    return [Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
            for i, args in enumerate(arguments)]


def plugin(root, **model_args):
    from vtprune.evals.lmms import VtpruneLlava

    model = VtpruneLlava(pretrained=str(root / "llava"), device="cpu", **model_args)
    model.task_dict = {"t": {"test": [{"index": i} for i in range(len(ITEMS))]}}
    return model


def visual(root):
    return lambda doc: [Image.open(root / f"{doc['index']}.png")]


def test_unpruned_plugin_answers_like_the_plain_model_and_cuts_at_until(lab):
    root, processor = lab
    model = plugin(root, batch_size=3)
    assert model.handle is None  # policy=none: the same code path, no patch
    answers, _, _ = by_hand(root, processor, None, max_new_tokens=4)
    requests = instances("generate_until", [(question, {"max_new_tokens": 4, "until": ["\n"]}, visual(root), i, "t",
                                              "test") for i, (question, _) in enumerate(ITEMS)])
    assert [result.text for result in model.generate_until(requests)] == answers
    # a stop string cuts the answer where it first occurs
    stop = answers[0].split()[1]
    requests = instances("generate_until", [(ITEMS[0][0], {"max_new_tokens": 4, "until": [stop]}, visual(root), 0,
                                              "t", "test")])
    assert model.generate_until(requests)[0].text == answers[0][:answers[0].index(stop)]


def test_loglikelihood_reads_the_continuation_after_pruning(lab):
    from transformers import LlavaForConditionalGeneration

    root, processor = lab
    model = plugin(root, policy="randomkeep:keep=4")
    continuation = " yes no"
    requests = instances("loglikelihood", [(question, continuation, visual(root), i, "t", "test")
                                           for i, (question, _) in enumerate(ITEMS)])
    scores = model.loglikelihood(requests)
    # the same sums from Hugging Face's own loss on the shortened sequence (labels shortened by the adapter)
    reference = LlavaForConditionalGeneration.from_pretrained(root / "llava").eval()
    with vtprune.applied(reference, "randomkeep:keep=4"), torch.inference_mode():
        for (question, _), (score, greedy), index in zip(ITEMS, scores, range(len(ITEMS))):
            prompt = f"USER: <image>\n{question} ASSISTANT:"
            inputs = processor(images=[Image.open(root / f"{index}.png").convert("RGB")],
                               text=[prompt + continuation], return_tensors="pt")
            labels = inputs["input_ids"].clone()
            labels[:, :-2] = -100
            output = reference(**inputs, labels=labels)
            assert score == pytest.approx(-2 * float(output.loss), rel=1e-5)
            assert greedy == bool((output.logits[0, -3:-1].argmax(-1) == inputs["input_ids"][0, -2:]).all())
    assert model.handle.trace.visual_tokens == (4,)


def test_bad_model_args_name_what_is_accepted(lab, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root, _ = lab
    with pytest.raises(ValueError, match="unknown model_args \\['polcy'\\]; accepted: pretrained, policy"):
        plugin(root, polcy="tome:r=2")
    with pytest.raises(ValueError, match="dtype='half'; accepted: auto, float16"):
        plugin(root, dtype="half")
    with pytest.raises(ValueError, match="unknown policy"):
        plugin(root, policy="tomme:r=2")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(tmp_path)
    from vtprune.evals.lmms import VtpruneLlava

    with pytest.raises(ValueError, match="'clip_vision_model' checkpoint; accepted: llava, llava_next"):
        VtpruneLlava(pretrained=str(tmp_path), device="cpu")
