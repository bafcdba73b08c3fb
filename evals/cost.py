"""Cost report: tokens, FLOPs (both conventions), latency and peak memory of each configuration vs unpruned.

``vtprune bench --report cost`` (or :func:`run`) builds one model, then measures the unpruned model first
and every policy spec after it, in the same process, on the same inputs, with the same attention
backend. For each configuration it reports, as the absolute value and as the ratio to the unpruned run:

* tokens: final (leaving the last layer) and layer-averaged (mean over layers of the tokens entering
  each layer), from ``handle.trace`` (for the unpruned model from forward hooks on the layers);
* FLOPs: :func:`vtprune.flops.estimate` with ``schedule=<that trace>`` (and the policy, so ``full``
  includes its matching overhead) in the ``paper`` (MACs) and ``full`` (FLOPs) conventions, per sample;
* latency per named phase: median and min-max of ``runs`` timed calls after ``warmup`` untimed ones;
  CUDA events around the call plus ``torch.cuda.synchronize`` on CUDA, ``time.perf_counter`` on CPU;
* peak memory of one forward, see :func:`peak_memory`;
* KV-cache bytes: ``None`` for models without a KV cache (vision encoders);
* the attention backend of every layer.

The harness is family-agnostic: a :class:`Family` turns a model and inputs into named :class:`Phase`
callables (``"vision encoding"`` for a timm ViT; ``"prefill"`` (time to first token) and ``"decode per
token"`` for HF LLaVA, where a phase with ``per_call=N`` decode steps divides its time by N and
``kv_cache_bytes`` reads the cache after the prefill). Tokens per layer are those of the family's
``site`` in the FLOPs estimate of the configuration's trace (the LLM's visual tokens for LLaVA).
Policies plug in by spec string through the registry (``vtprune.make_policy``). Register a family in
:data:`FAMILIES`; :func:`run` reports a timm ViT, :func:`run_llava` a random-weight LLaVA.
"""
from __future__ import annotations

import copy
import itertools
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

import vtprune
from vtprune import flops

CONVENTIONS = ("paper", "full")
MEMORY_METHOD = {
    "cpu": ("peak of (bytes allocated - bytes freed) by the CPU allocator during one forward, relative to the "
            "level at its start (torch.profiler profile_memory=True, every allocation event in time order): the "
            "activations and the output; weights and inputs allocated before are not counted; one profiled "
            "forward separate from the timed ones"),
    "cuda": ("torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated() before the forward, after "
             "torch.cuda.reset_peak_memory_stats(): the peak of tensors allocated during one forward "
             "(caching-allocator reserve and weights/inputs not counted)"),
}


# --- the harness ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phase:
    """One timed piece of work. ``call`` runs it once; ``per_call``: units of work per call (e.g. decode
    steps), the reported time is divided by it."""

    name: str
    call: Callable[..., Any]
    per_call: int = 1
    setup: Callable[[], Any] | None = None  # untimed; its result is passed to ``call`` (e.g. a fresh KV cache)

    def once(self, timer: Callable[[Callable[[], Any]], float] | None = None) -> float | None:
        """Run the phase once (setup untimed); with ``timer``, return the timed call's seconds."""
        state = self.setup() if self.setup is not None else None
        call = (lambda: self.call(state)) if self.setup is not None else self.call
        return timer(call) if timer is not None else call()


@dataclass(frozen=True)
class Family:
    """What the harness needs from one host family.

    ``phases(model, inputs)``: the named phases, in execution order; ``forward(model, inputs)``: one
    full call for the trace and the memory measurement; ``attention_backends(model)``: one string per
    layer; ``layer_tokens(model, inputs)``: ``(tokens_in, tokens_out)`` per layer of an unpatched model;
    ``site``: the trace site whose tokens are reported; ``kv_cache_bytes(model, inputs)``: ``None`` where
    the family has no KV cache.
    """

    name: str
    phases: Callable[[nn.Module, Any], list[Phase]]
    forward: Callable[[nn.Module, Any], Any]
    attention_backends: Callable[[nn.Module], list[str]]
    layer_tokens: Callable[[nn.Module, Any], list[tuple[int, int]]]
    site: str = "vision"
    kv_cache_bytes: Callable[[nn.Module, Any], int | None] = lambda model, inputs: None
    estimate_kwargs: Callable[[nn.Module, Any], dict[str, Any]] = lambda model, inputs: {}


def _timm_backends(model: nn.Module) -> list[str]:
    return ["sdpa" if getattr(block.attn, "fused_attn", False) else "eager" for block in model.blocks]


def _timm_layer_tokens(model: nn.Module, images: torch.Tensor) -> list[tuple[int, int]]:
    counts: list[tuple[int, int]] = []
    hooks = [block.register_forward_hook(lambda module, args, out: counts.append((args[0].shape[1], out.shape[1])))
             for block in model.blocks]
    try:
        with torch.inference_mode():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return counts


TIMM_VIT = Family(
    name="timm-vit",
    phases=lambda model, images: [Phase("vision encoding", lambda: model(images))],
    forward=lambda model, images: model(images),
    attention_backends=_timm_backends,
    layer_tokens=_timm_layer_tokens,
)

def _cache_bytes(cache: Any) -> int:
    """Bytes of the key/value tensors of a transformers cache (``DynamicCache`` layers or legacy tuples)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    else:
        tensors = [t for pair in cache for t in pair]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def hf_llava(decode_steps: int = 8) -> Family:
    """The HF ``LlavaForConditionalGeneration`` family (unpruned, or patched by the policy being measured):
    phases "prefill" (time to first token: one forward of the prompt with the image, ``use_cache=True``,
    logits of the last position only) and
    "decode per token" (``decode_steps`` greedy single-token steps on the prefill's cache, which is made
    by an untimed setup; the time is divided by ``decode_steps``). Inputs: ``{"input_ids", "pixel_values"}``
    (``input_ids`` holds the image token ids). Tokens: the visual tokens entering each LLM layer (for a
    patched model, what ``vtprune.flops.estimate`` derives from its trace: the tokens handed on by vision-
    and projector-site policies).
    """

    def image_tokens(model: nn.Module, inputs: dict[str, Any]) -> int:
        return int((inputs["input_ids"] == model.config.image_token_index).sum()) // inputs["input_ids"].shape[0]

    def prefill(model: nn.Module, inputs: dict[str, Any]) -> Any:
        return model(**inputs, use_cache=True, logits_to_keep=1)

    def decode(model: nn.Module, state: Any) -> None:
        cache, token = state
        for _ in range(decode_steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def decode_setup(model: nn.Module, inputs: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        out = prefill(model, inputs)
        return out.past_key_values, out.logits[:, -1:].argmax(-1)

    def layers(model: nn.Module) -> int:
        return model.config.text_config.num_hidden_layers

    def backends(model: nn.Module) -> list[str]:
        return [str(model.config.text_config._attn_implementation)] * layers(model)

    return Family(
        name="hf-llava",
        phases=lambda model, inputs: [
            Phase("prefill", lambda: prefill(model, inputs)),
            Phase("decode per token", lambda state: decode(model, state), per_call=decode_steps,
                  setup=lambda: decode_setup(model, inputs))],
        forward=prefill,
        attention_backends=backends,
        layer_tokens=lambda model, inputs: [(image_tokens(model, inputs),) * 2] * layers(model),
        site="llm",
        kv_cache_bytes=lambda model, inputs: _cache_bytes(prefill(model, inputs).past_key_values),
        estimate_kwargs=lambda model, inputs: {
            "prompt_tokens": inputs["input_ids"].shape[1] - image_tokens(model, inputs)},
    )


#: Families by name.
FAMILIES: dict[str, Family] = {"timm-vit": TIMM_VIT, "hf-llava": hf_llava()}


# --- measurements --------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(call: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call: CUDA events (synchronised) on CUDA, ``time.perf_counter`` elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    call()
    return time.perf_counter() - begin


def peak_memory(call: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during one call above the level at its start (see :data:`MEMORY_METHOD`)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    # Every allocator event with its signed size, in time order (FunctionEvent lists attach allocations to
    # their ops and keep only the frees outside ops, so the raw kineto events are read).
    events = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    return max(itertools.accumulate(nbytes for _, nbytes in events), default=0)


def summarise(times: Sequence[float], per_call: int = 1) -> dict[str, Any]:
    values = [value / per_call for value in times]
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "times_s": values}


# --- configurations ------------------------------------------------------------------------------

@dataclass
class Configuration:
    """One measured configuration: the unpruned model (``policy`` ``None``) or a patched deep copy."""

    label: str
    model: nn.Module
    policy: Any = None
    handle: Any = None
    times: dict[str, list[float]] = field(default_factory=dict)


def parse_configuration(spec: str) -> list[vtprune.Policy]:
    """The policies of one configuration: a spec string, or several joined by ``+`` (composed, one per site:
    ``"visionzip:keep=192+transprune"``)."""
    return [vtprune.make_policy(part) for part in spec.split("+")]


def build_configurations(model: nn.Module, specs: Sequence[str]) -> list[Configuration]:
    """The unpruned model first (always), then one patched deep copy per configuration spec (registry names;
    ``+`` composes policies)."""
    configurations = [Configuration("none (unpruned)", model)]
    for spec in specs:
        if spec.strip().lower() in ("none", "unpatched", "unpruned"):
            continue
        policies = parse_configuration(spec)
        patched = copy.deepcopy(model)
        label = "+".join(map(str, policies))
        configurations.append(Configuration(label, patched, policies, vtprune.apply(patched, policies)))
    return configurations


def _ratio(value: float | int | None, base: float | int | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def measure(model: nn.Module, inputs: Any, specs: Sequence[str], family: Family | str = "timm-vit",
            warmup: int = 1, runs: int = 3, device: str | torch.device = "cpu",
            progress: Callable[[str], None] = lambda message: None) -> list[dict[str, Any]]:
    """Measure every configuration (see the module docstring); rows as JSON-ready dicts, unpruned first.

    ``model`` and ``inputs`` must already be on ``device``. Phases are timed in interleaved rounds (one
    call of every configuration per round), so slow drift of the machine affects all alike.
    """
    family = FAMILIES[family] if isinstance(family, str) else family
    device = torch.device(device)
    configurations = build_configurations(model, specs)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for conf in configurations:
            # The first forward records the tokens (the trace, or hooks on the unpatched model); never timed.
            if conf.handle is not None:
                family.forward(conf.model, inputs)
                source: Any = conf.handle.trace
            else:
                source = family.layer_tokens(conf.model, inputs)
            _sync(device)
            costs = {name: flops.estimate(conf.model, schedule=source, policy=conf.policy, convention=name,
                                          **family.estimate_kwargs(conf.model, inputs)) for name in CONVENTIONS}
            schedule = [tuple(pair) for pair in costs["paper"].schedule[family.site]]
            progress(f"{conf.label}: peak memory")
            memory = peak_memory(lambda: family.forward(conf.model, inputs), device)
            rows.append({
                "label": conf.label,
                "policy": [policy.to_dict() for policy in conf.policy] if conf.policy is not None else None,
                "attention_backend": _summarise_backends(family.attention_backends(conf.model)),
                "attention_backend_per_layer": family.attention_backends(conf.model),
                "tokens_per_layer": [list(pair) for pair in schedule],
                "final_tokens": schedule[-1][1],
                "mean_tokens": sum(pair[0] for pair in schedule) / len(schedule),
                "flops": {name: {"total": cost.total, "prefill": cost.prefill, "unit": cost.unit,
                                 "description": cost.description} for name, cost in costs.items()},
                "peak_memory_bytes": memory,
                "kv_cache_bytes": family.kv_cache_bytes(conf.model, inputs),
            })
            for _ in range(warmup):
                for phase in family.phases(conf.model, inputs):
                    phase.once()
        phases = {conf.label: family.phases(conf.model, inputs) for conf in configurations}
        for round_index in range(runs):
            for conf in configurations:
                for phase in phases[conf.label]:
                    conf.times.setdefault(phase.name, []).append(phase.once(lambda call: time_call(call, device)))
            progress(f"round {round_index + 1}/{runs}: " + ", ".join(
                f"{conf.label} {sum(times[-1] for times in conf.times.values()):.3f} s" for conf in configurations))
    for conf, row in zip(configurations, rows):
        row["latency"] = {phase.name: summarise(conf.times[phase.name], phase.per_call)
                          for phase in phases[conf.label]}
    _add_ratios(rows)
    return rows


def _summarise_backends(backends: Sequence[str]) -> str:
    kinds = sorted(set(backends))
    if len(kinds) == 1:
        return kinds[0]
    return "mixed (" + ", ".join(f"{backends.count(kind)} {kind}" for kind in kinds) + ")"


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """``row["ratios"]``: every absolute value divided by the unpruned row's (``None`` where undefined)."""
    base = rows[0]
    for row in rows:
        row["ratios"] = {
            "final_tokens": _ratio(row["final_tokens"], base["final_tokens"]),
            "mean_tokens": _ratio(row["mean_tokens"], base["mean_tokens"]),
            **{f"flops_{name}": _ratio(row["flops"][name]["total"], base["flops"][name]["total"])
               for name in CONVENTIONS},
            "flops_full_prefill": _ratio(row["flops"]["full"]["prefill"], base["flops"]["full"]["prefill"]),
            **{f"latency_{phase}": _ratio(value["median_s"], base["latency"].get(phase, {}).get("median_s"))
               for phase, value in row["latency"].items()},
            "peak_memory": _ratio(row["peak_memory_bytes"], base["peak_memory_bytes"]),
            "kv_cache": _ratio(row["kv_cache_bytes"], base["kv_cache_bytes"]),
        }


# --- the report ----------------------------------------------------------------------------------

def run(model_name: str = "vit_base_patch16_224", batch_size: int = 32, runs: int = 3, warmup: int = 1,
        threads: int | None = None, dtype: str = "float32", policies: Sequence[str] = ("none", "tome:r=16",
        "pitome:ratio=0.9"), img_size: int | None = None, device: str = "cpu", seed: int = 0,
        verbose: bool = True, **model_kwargs: Any) -> dict[str, Any]:
    """The cost report of a timm ViT (random weights) as a JSON-ready dict (see :func:`format_report`).

    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``depth=2`` for a tiny test model).
    """
    import timm

    from .bench import DTYPES

    progress, load_before = _start(runs, warmup, batch_size, device, threads, verbose)
    torch.manual_seed(seed)
    kwargs = {"img_size": img_size} if img_size else {}
    model = timm.create_model(model_name, pretrained=False, **kwargs, **model_kwargs).eval()
    model = model.to(device=device, dtype=DTYPES[dtype])
    height, width = model.patch_embed.img_size
    images = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed + 1))
    images = images.to(device=device, dtype=DTYPES[dtype])
    rows = measure(model, images, policies, "timm-vit", warmup=warmup, runs=runs, device=device, progress=progress)
    config = {"model": model_name, "img_size": [height, width], "batch_size": batch_size, "runs": runs,
              "warmup": warmup, "dtype": dtype, "device": device, "policies": list(policies), "seed": seed,
              "weights": "random (pretrained=False)", "family": "timm-vit"}
    return _results(rows, config, device, load_before)


#: Random-weight LLaVA-1.5 architectures for the cost report: (vision tower, language model) config kwargs.
#: ``llava-mid`` fits a 2-core CPU while the language model dominates (~80 % of the prefill FLOPs);
#: ``llava-mid32`` has LLaVA-1.5's 32 decoder layers (narrower), for the policies that cut inside them.
_MID_TOWER = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=24, num_attention_heads=4,
                  image_size=336, patch_size=14)
LLAVA_MODELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "llava-mid": (_MID_TOWER, dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=8, vocab_size=32000)),
    "llava-mid32": (_MID_TOWER, dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=32,
                                     num_attention_heads=12, num_key_value_heads=12, vocab_size=32000)),
    "llava-1.5-7b": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14, projection_dim=768),
                     dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32064)),
    "llava-tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                        image_size=56, patch_size=14),
                   dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128)),
}


def build_llava(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                attn: str = "sdpa") -> nn.Module:
    """A random-weight ``LlavaForConditionalGeneration`` of one of :data:`LLAVA_MODELS` (no download)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if name not in LLAVA_MODELS:
        raise SystemExit(f"vtprune bench: unknown LLaVA model {name!r}; known: {', '.join(LLAVA_MODELS)}")
    vision, text = LLAVA_MODELS[name]
    text_config = LlamaConfig(**text, max_position_embeddings=4096)
    vision_config = CLIPVisionConfig(**vision)
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=text["vocab_size"] - 1, image_seq_length=tokens)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    return model.to(dtype).eval()


def run_llava(model_name: str = "llava-mid", batch_size: int = 1, prompt_tokens: int = 48, runs: int = 3,
              warmup: int = 1, threads: int | None = None, dtype: str = "float32",
              policies: Sequence[str] = ("none", "flowcut:keep=64"), device: str = "cpu", seed: int = 0,
              decode_steps: int = 8, verbose: bool = True) -> dict[str, Any]:
    """The cost report of a random-weight LLaVA (:data:`LLAVA_MODELS`) as a JSON-ready dict: the "prefill"
    and "decode per token" phases for a prompt of ``prompt_tokens`` text tokens around one image."""
    from .bench import DTYPES

    if prompt_tokens < 1:
        raise ValueError(f"need prompt tokens >= 1, got {prompt_tokens}")
    progress, load_before = _start(runs, warmup, batch_size, device, threads, verbose)
    model = build_llava(model_name, DTYPES[dtype], device, seed)
    config = model.config
    image_tokens = config.image_seq_length
    generator = torch.Generator().manual_seed(seed + 1)
    text = torch.randint(1, config.text_config.vocab_size - 2, (batch_size, prompt_tokens), generator=generator)
    before = prompt_tokens // 2
    input_ids = torch.cat([text[:, :before], torch.full((batch_size, image_tokens), config.image_token_index),
                           text[:, before:]], dim=1)
    size = config.vision_config.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=generator)
    inputs = {"input_ids": input_ids.to(device), "pixel_values": pixels.to(device=device, dtype=DTYPES[dtype])}
    rows = measure(model, inputs, policies, hf_llava(decode_steps), warmup=warmup, runs=runs, device=device,
                   progress=progress)
    config = {"model": model_name, "img_size": [size, size], "batch_size": batch_size, "runs": runs,
              "warmup": warmup, "dtype": dtype, "device": device, "policies": list(policies), "seed": seed,
              "weights": "random", "family": "hf-llava", "prompt_tokens": prompt_tokens,
              "image_tokens": image_tokens, "decode_steps": decode_steps}
    return _results(rows, config, device, load_before)


def _start(runs: int, warmup: int, batch_size: int, device: str, threads: int | None,
           verbose: bool) -> tuple[Callable[[str], None], Any]:
    """Check the settings, set the threads; returns the progress printer and the load average now."""
    from .bench import machine_info

    if runs < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need runs >= 1, warmup >= 0, batch size >= 1; got {runs}, {warmup}, {batch_size}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vtprune bench: --device cuda but torch.cuda.is_available() is False")
    if threads:
        torch.set_num_threads(threads)
    progress = (lambda message: print(f"[cost] {message}", file=sys.stderr, flush=True)) if verbose else (
        lambda message: None)
    return progress, machine_info()["load_average_1_5_15min"]


def _results(rows: list[dict[str, Any]], config: dict[str, Any], device: str, load_before: Any) -> dict[str, Any]:
    """The JSON-ready report: machine, setup, timer and memory method, rows."""
    from .bench import machine_info

    machine = machine_info()
    machine["load_average_at_start"] = load_before
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    return {
        "machine": machine,
        "config": config,
        "timer": "CUDA events + torch.cuda.synchronize" if device == "cuda" else "time.perf_counter (wall clock)",
        "memory_method": MEMORY_METHOD["cuda" if device == "cuda" else "cpu"],
        "flops_per": "sample",
        "rows": rows,
    }


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def format_report(results: dict[str, Any]) -> str:
    """The machine, the setup and the cost table (absolute value, then ratio to unpruned), as Markdown."""
    machine, config, rows = results["machine"], results["config"], results["rows"]
    phases = list(rows[0]["latency"])
    lines = [
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores ({machine['usable_cores']} usable), "
        f"torch threads {machine['torch_threads']}" + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"; torch {machine['torch']}, timm {machine['timm']}, vtprune {machine['vtprune']}, "
        f"Python {machine['python']}; load average at start {machine.get('load_average_at_start')}",
        f"Model: {config['model']} at {config['img_size'][0]}x{config['img_size'][1]}, {config['weights']}, "
        f"{config['dtype']} on {config['device']}, batch {config['batch_size']}, warmup {config['warmup']}, "
        f"{config['runs']} timed runs, eval mode, torch.inference_mode()"
        + (f"; prompt: {config['prompt_tokens']} text tokens + {config['image_tokens']} image placeholders"
           if "prompt_tokens" in config else ""),
        "",
        "| configuration | attention | final tokens | mean tokens/layer | GMACs/img [paper] | GFLOPs/img [full] | "
        + " | ".join(f"{phase} s/batch median (min-max)" for phase in phases)
        + " | peak memory | KV cache |",
        "|---|---|" + "---:|" * (6 + len(phases)),
    ]
    for row in rows:
        ratios = row["ratios"]
        cells = [row["label"], row["attention_backend"],
                 f"{row['final_tokens']} ({_times(ratios['final_tokens'])})",
                 f"{row['mean_tokens']:.1f} ({_times(ratios['mean_tokens'])})",
                 f"{row['flops']['paper']['total'] / 1e9:.2f} ({_times(ratios['flops_paper'])})",
                 f"{row['flops']['full']['total'] / 1e9:.2f} ({_times(ratios['flops_full'])})"]
        for phase in phases:
            value = row["latency"][phase]
            cells.append(f"{value['median_s']:.3f} ({value['min_s']:.3f}-{value['max_s']:.3f}) "
                         f"({_times(ratios[f'latency_{phase}'])})")
        cells += [f"{_bytes(row['peak_memory_bytes'])} ({_times(ratios['peak_memory'])})",
                  _bytes(row["kv_cache_bytes"]) if row["kv_cache_bytes"] is None
                  else f"{_bytes(row['kv_cache_bytes'])} ({_times(ratios['kv_cache'])})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Each cell: absolute value (ratio to the unpruned run). Tokens: from the trace of the "
              "configuration's forward; mean tokens/layer = mean over layers of the tokens entering each layer. FLOPs: "
              "vtprune.flops.estimate(model, schedule=trace, policy=policy) per image; "
              f"paper = {rows[0]['flops']['paper']['description']}; full = {rows[0]['flops']['full']['description']}.",
              f"Latency: {results['timer']}, configurations interleaved per round. Peak memory: "
              f"{results['memory_method']}. KV cache: '-' = the model has none."]
    if "prefill" in phases:
        lines += ["", "| configuration | prefill FLOPs [full] vs unpruned | predicted prefill speed-up | "
                  "measured prefill speed-up | measured / predicted |", "|---|---:|---:|---:|---:|"]
        for row in rows[1:]:
            flops_ratio, time_ratio = row["ratios"]["flops_full_prefill"], row["ratios"]["latency_prefill"]
            predicted = 1 / flops_ratio if flops_ratio else None
            measured = 1 / time_ratio if time_ratio else None
            share = measured / predicted if predicted and measured else None
            lines.append(f"| {row['label']} | {flops_ratio:.3f} | {_times(predicted)} | {_times(measured)} | "
                         + ("-" if share is None else f"{share:.2f}") + " |")
    return "\n".join(lines)
