"""lmms-eval model plugin: a LLaVA-family checkpoint with a vtprune policy, for lmms-eval's task definitions.

Installed with ``pip install 'vtprune[lmms]'``, it registers itself through the ``lmms_eval.models``
entry-point group (lmms-eval ≥ 0.7 reads that group; nothing to configure)::

    python -m lmms_eval --model vtprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,policy=flowcut:keep=64 \\
        --tasks pope,mme --batch_size 1 --output_path runs/lmms --log_samples

``--model_args`` (comma separated; quote a value that holds commas,
``policy="visionzip:dominant=54,contextual=10"``):

- ``pretrained``: a hub id or local directory of a ``LlavaForConditionalGeneration`` /
  ``LlavaNextForConditionalGeneration`` checkpoint (with its processor).
- ``policy``: a vtprune spec (``flowcut:keep=64``; ``+`` composes one policy per site,
  ``visionzip:keep=192+transprune``); ``none`` (the default) runs the unpruned model in the same code path,
  the reference every pruned run should be compared with.
- ``device`` (``cuda`` when available, else ``cpu``), ``dtype`` (``auto`` = the checkpoint's, or
  ``float16`` / ``bfloat16`` / ``float32``), ``batch_size`` (requests with the same generation settings are
  batched, left-padded), ``attn_implementation``, ``chat_template`` (a Jinja template replacing the
  processor's), ``max_new_tokens`` (used when a task does not set it; 128, LLaVA's eval default),
  ``token_log`` (a JSONL path: one line per request with its visual-token counts).

Token counts are logged three ways: each generated sample's ``token_counts`` in lmms-eval's sample logs
(``input_tokens`` = the prompt tokens the language model actually saw, after pruning; ``output_tokens``),
the run's ``throughput`` block in the results JSON (``avg_visual_tokens_in``, ``avg_visual_tokens``,
``avg_llm_visual_tokens_layer_mean``, ``avg_prefill_tflops``), and the optional ``token_log`` file.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

try:
    from lmms_eval.api.instance import GenerationResult, TokenCounts
    from lmms_eval.api.model import lmms
    from lmms_eval.models.model_utils.gen_metrics import log_metrics
    from lmms_eval.models.registry_v2 import ModelManifest
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("vtprune's lmms-eval plugin needs lmms-eval: pip install 'vtprune[lmms]'") from error

import vtprune
from vtprune import flops

from .cost import parse_configuration

MODEL_ID = "vtprune"
DEFAULT_MAX_NEW_TOKENS = 128
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def manifest() -> ModelManifest:
    """The entry point lmms-eval loads (group ``lmms_eval.models``): ``--model vtprune`` (alias
    ``vtprune_llava``)."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VtpruneLlava",
                         aliases=("vtprune_llava",))


def unquote(value: Any) -> Any:
    """lmms-eval keeps the quotes that protect a value's commas; drop one matching pair."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


class VtpruneLlava(lmms):
    """A Hugging Face LLaVA / LLaVA-NeXT checkpoint patched with a vtprune policy (see the module doc)."""

    is_simple = True
    _ACCEPTED = ("pretrained", "policy", "device", "dtype", "batch_size", "attn_implementation", "chat_template",
                 "max_new_tokens", "token_log", "max_batch_size")

    def __init__(self, pretrained: str | None = None, policy: str = "none", device: str | None = None,
                 dtype: str = "auto", batch_size: int | str = 1, attn_implementation: str | None = None,
                 chat_template: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 token_log: str | None = None, max_batch_size: Any = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"vtprune lmms-eval model: unknown model_args {sorted(unknown)}; accepted: "
                             f"{', '.join(self._ACCEPTED[:-1])}")
        if not pretrained:
            raise ValueError("vtprune lmms-eval model: model_args needs pretrained=<hub id or local directory>")
        from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
        from transformers import LlavaNextForConditionalGeneration

        # lmms-eval shards requests by RANK / WORLD_SIZE (torchrun, accelerate launch) and sets these again
        self._rank, self._world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self._device = torch.device(_resolve_device(device))
        classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
        model_type = AutoConfig.from_pretrained(pretrained).model_type
        if model_type not in classes:
            raise ValueError(f"vtprune lmms-eval model: {pretrained} is a {model_type!r} checkpoint; accepted: "
                             f"{', '.join(classes)} (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)")
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"vtprune lmms-eval model: dtype={dtype!r}; accepted: auto, {', '.join(_DTYPES)}")
        self._model = classes[model_type].from_pretrained(
            pretrained, dtype="auto" if dtype == "auto" else _DTYPES[dtype],
            attn_implementation=attn_implementation).to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.processor.tokenizer.padding_side = "left"
        self.chat_template = unquote(chat_template)
        self.pretrained = pretrained
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.policy_spec = str(unquote(policy)).strip()
        self.policies = ([] if self.policy_spec.lower() in ("none", "unpruned", "")
                         else parse_configuration(self.policy_spec))
        self.handle = vtprune.apply(self._model, self.policies) if self.policies else None
        self.token_log = Path(token_log) if token_log else None

    # lmms-eval reads these
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def prompt(self, context: str, images: int) -> str:
        """The LLaVA prompt: one ``<image>`` per image before the context unless the task placed them (as
        lmms-eval's ``llava_hf`` does), wrapped in the chat template (the processor's, ``chat_template``, or
        LLaVA-1.5's ``USER: ... ASSISTANT:``)."""
        image_token = getattr(self.processor, "image_token", "<image>")
        if images and image_token not in context:
            context = " ".join([image_token] * images) + "\n" + context
        messages = [{"role": "user", "content": [{"type": "text", "text": context}]}]
        if self.chat_template is not None:
            return self.processor.apply_chat_template(messages, chat_template=self.chat_template,
                                                      add_generation_prompt=True)
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"USER: {context} ASSISTANT:"

    def _visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Any]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        flat = []
        for item in visuals or []:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        for item in flat:
            if not hasattr(item, "convert"):
                raise ValueError(f"vtprune lmms-eval model: task {task} gives a {type(item).__name__} visual; "
                                 "accepted: PIL images (video and audio tasks are not supported)")
        return [item.convert("RGB") for item in flat]

    def _inputs(self, prompts: list[str], images: list[Any]) -> Any:
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        return {key: (value.to(self._device, self._model.dtype) if value.is_floating_point()
                      else value.to(self._device)) for key, value in inputs.items()}

    def generate_until(self, requests: list[Any]) -> list[GenerationResult]:
        """Greedy (or sampled, when a task sets ``temperature > 0``) generation, cut at the task's ``until``
        strings; requests with identical generation settings are batched in chunks of ``batch_size`` (a chunk
        whose requests differ in image count runs one request at a time)."""
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(index)
        started, generated_tokens = time.perf_counter(), 0
        self._records: list[dict[str, Any]] = []
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size_per_gpu):
                chunk = indices[start:start + self.batch_size_per_gpu]
                for index, result in zip(chunk, self._generate([requests[i] for i in chunk])):
                    results[index] = result
                    generated_tokens += result.token_counts.output_tokens
        elapsed = time.perf_counter() - started
        self._log(elapsed, generated_tokens)
        return results

    def _generate(self, requests: list[Any]) -> list[GenerationResult]:
        prompts, images, counts = [], [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            prompts.append(self.prompt(context, len(visuals)))
            images.extend(visuals)
            counts.append(len(visuals))
        if len(set(counts)) > 1 or (0 in counts and len(requests) > 1):  # the processor needs uniform rows
            return [result for request in requests for result in self._generate([request])]
        gen_kwargs = dict(requests[0].args[1])
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        inputs = self._inputs(prompts, images)
        tokenizer = self.processor.tokenizer
        with torch.inference_mode():
            output = self._model.generate(
                **inputs, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_p=gen_kwargs.get("top_p") if temperature > 0 else None,
                num_beams=int(gen_kwargs.get("num_beams", 1) or 1),
                max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        new = output[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        tokens = self._tokens(inputs, len(requests))
        results, records = [], []
        for row, (request, text) in enumerate(zip(requests, texts)):
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            output_tokens = int((new[row] != tokenizer.pad_token_id).sum()) if tokenizer.pad_token_id is not None \
                else int(new.shape[1])
            records.append({"task": request.args[4], "doc_id": request.args[3], **tokens[row]})
            results.append(GenerationResult(text=text, token_counts=TokenCounts(
                input_tokens=records[-1]["prompt_tokens"], output_tokens=output_tokens)))
        self._records.extend(records)
        self._write_records(records)
        return results

    def _tokens(self, inputs: dict[str, torch.Tensor], rows: int) -> list[dict[str, Any]]:
        """Per row: the visual tokens in the prompt and those the language model received, the prompt tokens
        it saw (``prompt_tokens``), the visual tokens entering its decoder layers on average (they differ from
        the received ones under an llm-site policy) and the prefill TFLOPs (``full`` convention, this row's
        text tokens included)."""
        mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
        visual_in = (inputs["input_ids"] == self._model.config.image_token_id).sum(dim=1).tolist()
        text = (mask.sum(dim=1) - torch.tensor(visual_in, device=mask.device)).tolist()
        trace = self.handle.trace if self.handle is not None else None
        handed = list(trace.visual_tokens) if trace is not None and trace.visual_tokens is not None else visual_in
        records = []
        for row in range(rows):
            record = {"visual_tokens_in": visual_in[row], "visual_tokens": handed[row],
                      "llm_visual_tokens_layer_mean": float(handed[row]), "prompt_tokens": text[row] + handed[row],
                      "prefill_tflops": None}
            try:
                cost = flops.estimate(self._model, schedule=trace, policy=self.policies or None, convention="full",
                                      visual_tokens=handed[row], prompt_tokens=text[row])
            except (ValueError, TypeError, NotImplementedError):
                records.append(record)
                continue
            llm = cost.schedule.get("llm", ())
            if llm:
                record["llm_visual_tokens_layer_mean"] = sum(pair[0] for pair in llm) / len(llm)
            record["prefill_tflops"] = cost.prefill / 1e12
            records.append(record)
        return records

    def _write_records(self, records: list[dict[str, Any]]) -> None:
        """Append to ``token_log`` (``<stem>.rank<i><suffix>`` per process when there are several)."""
        if self.token_log is None:
            return
        path = self.token_log
        if self._world_size > 1:
            path = path.with_name(f"{path.stem}.rank{self._rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as stream:
            for record in records:
                stream.write(json.dumps({"policy": self.policy_spec, **record}) + "\n")

    def _log(self, elapsed: float, generated_tokens: int) -> None:
        if not self._records:
            return
        mean = lambda key: (sum(r[key] for r in self._records if r[key] is not None)  # noqa: E731
                            / max(1, sum(r[key] is not None for r in self._records)))
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=generated_tokens,
                    avg_speed=generated_tokens / elapsed if elapsed > 0 else 0.0,
                    additional_metrics={"visual_tokens_in": mean("visual_tokens_in"),
                                        "visual_tokens": mean("visual_tokens"),
                                        "llm_visual_tokens_layer_mean": mean("llm_visual_tokens_layer_mean"),
                                        "prefill_tflops": mean("prefill_tflops"), "total_requests": len(self._records)})

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probabilities given image + context, and whether greedy
        decoding would produce it (lm-eval's convention). The continuation is read from the end of the
        sequence, so a policy that shortens the prompt does not shift it."""
        results = []
        tokenizer = self.processor.tokenizer
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if not isinstance(continuation, str):
                continuation = continuation(self.task_dict[task][split][doc_id])
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            prompt = self.prompt(context, len(visuals))
            inputs = self._inputs([prompt + continuation], visuals)
            prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            full_length = len(tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"])
            length = max(1, full_length - prompt_length)
            with torch.inference_mode():
                logits = self._model(**inputs).logits[0, -length - 1:-1].float()
            target = inputs["input_ids"][0, -length:]
            log_probs = torch.log_softmax(logits, dim=-1)
            results.append((float(log_probs.gather(1, target[:, None]).sum()),
                            bool((logits.argmax(dim=-1) == target).all())))
        return results

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("vtprune lmms-eval model: multi-round generation is not supported; "
                                  "accepted output types: generate_until, loglikelihood")


def _resolve_device(device: str | None) -> str:
    """``cuda`` / ``auto`` / nothing: ``cuda:LOCAL_RANK`` (one GPU per process) when CUDA is there."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"vtprune lmms-eval model: device={device!r} but CUDA is not available; "
                             "accepted here: cpu")
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return str(device)
