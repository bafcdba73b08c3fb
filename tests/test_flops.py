"""vtprune.flops: the papers' cost tables reproduced analytically, and analytic vs measured FLOPs on tiny models."""
from __future__ import annotations

import dataclasses
import json

import pytest
import timm
import torch

import vtprune
from vtprune import flops
from vtprune.evals import cli
from vtprune.schedules import parse_schedule, pitome_token_schedule, stage_schedule, tome_token_schedule

T = 1e12
G = 1e9


def tera(config, **kwargs) -> float:
    return round(flops.estimate(config, **kwargs).total / T, 2)


# --- the papers, paper preset (MACs, LLM over visual tokens only, prefill only, SwiGLU 3 matrices) ----------

def _transprune_high(n: int) -> list[int]:
    # keep ratios 1 -> .875 -> .625 -> .125 of the initial visual tokens after (1-based) layers 7, 9, 12
    return stage_schedule(n, {7: int(n * 0.875), 9: int(n * 0.625), 12: int(n * 0.125)}, 32)


@pytest.mark.parametrize("schedule, expected", [
    (None, 3.82),                                                    # vanilla, 576 visual tokens
    (stage_schedule(576, {2: 288}, 32), 2.01),                       # FastV K=2 R=0.5
    (stage_schedule(576, {2: 144}, 32), 1.12),                       # FastV K=2 R=0.75
    (stage_schedule(576, {8: 288, 16: 144, 24: 72}, 32), 1.78),      # PDrop
    (_transprune_high(576), 1.56),                                   # TransPrune-High 576/504/360/72
])
def test_llava_15_7b_paper_numbers(schedule, expected):
    assert tera("llava-1.5-7b", schedule=schedule) == expected


@pytest.mark.parametrize("schedule, expected", [
    (None, 20.83),                                                   # nominal 2880 visual tokens
    (stage_schedule(2880, {2: 1440}, 32), 10.55),                    # FastV R=0.5
    (stage_schedule(2880, {2: 720}, 32), 5.80),                      # FastV R=0.75
    (stage_schedule(2880, {8: 1440, 16: 720, 24: 360}, 32), 9.46),   # PDrop
    (_transprune_high(2880), 8.33),                                  # TransPrune-High
])
def test_llava_next_7b_paper_numbers(schedule, expected):
    assert tera("llava-next-7b", schedule=schedule) == expected


def test_paper_preset_is_the_published_formula():
    # TransPrune Eq. 7, first term: sum over layers of 4 n d^2 + 2 n^2 d + 3 n d m, visual tokens only
    d, m = 4096, 11008
    cost = flops.estimate("llava-1.5-7b")
    assert cost.total == 32 * (4 * 576 * d * d + 2 * 576 * 576 * d + 3 * 576 * d * m)
    assert cost.unit == "MACs" and cost.convention == "paper"
    assert cost.by_site["llm"] == cost.total and cost.by_site["vision"] is None
    assert cost.decode == 0 and cost.decode_per_token is None
    assert [layer.tokens_in for layer in cost.layers] == [576] * 32
    assert flops.estimate("llava-1.5-7b", schedule="576x2,288x30").total == flops.estimate(
        "llava-1.5-7b", schedule=stage_schedule(576, {2: 288}, 32)).total
    assert tera("llava-1.5-13b") == round(40 * (4 * 576 * 5120**2 + 2 * 576**2 * 5120 + 3 * 576 * 5120 * 13824) / T, 2)


def test_vit_b16_tome_r16_from_the_policy_and_from_a_real_trace():
    base = flops.estimate("vit-b-16")
    from_policy = flops.estimate("vit-b-16", policy="tome:r=16")
    assert round(base.total / G, 2) == 17.45
    assert round(from_policy.total / G, 2) == 8.66
    assert from_policy.schedule["vision"][0] == (197, 181) and from_policy.schedule["vision"][-1] == (21, 11)

    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    with vtprune.applied(model, vtprune.ToMe(r=16)) as handle, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    from_trace = flops.estimate("vit-b-16", schedule=handle.trace)
    assert from_trace.schedule == from_policy.schedule
    assert from_trace.total == from_policy.total
    # the timm name reads the same architecture (meta device)
    assert flops.estimate("vit_base_patch16_224", policy="tome:r=16").total == from_policy.total


@pytest.mark.parametrize("config, policy, expected", [
    # merging.md §2.8 (ToMe: attention at N_l, MLP at N_l - r_l, blocks only)
    ("vit-b-16", "tome:r=8", 12.99), ("vit-b-16", "tome:r=13", 10.25), ("vit-b-16", "tome:r=(16,-1)", 5.75),
    ("deit-tiny", None, 1.22), ("deit-tiny", "tome:r=13", 0.70),
    ("vit-l-16", None, 61.4), ("vit-l-16", "tome:r=7", 34.6),
])
def test_tome_table(config, policy, expected):
    digits = 1 if expected > 30 else 2
    assert round(flops.estimate(config, policy=policy).total / G, digits) == expected


@pytest.mark.parametrize("ratio, expected, final", [
    (1.0, 1.2246, 197), (0.975, 1.0715, 151), (0.95, 0.9264, 111), (0.925, 0.8125, 82), (0.9, 0.7116, 60),
    (0.8, 0.4559, 17),
])
def test_pitome_own_counter_for_deit_tiny(ratio, expected, final):
    # PiToMe's counter: 4NC^2 + 2N^2C + 8NC^2 with N the tokens *entering* the block -> mlp_tokens="in"
    cost = flops.estimate("deit-tiny", policy=vtprune.PiToMe(ratio=ratio), mlp_tokens="in")
    assert round(cost.total / G, 4) == expected
    assert cost.schedule["vision"][-1][1] == final
    assert cost.convention == "paper+mlp_tokens=in"
    if ratio < 1:  # counting the MLP where it really runs is cheaper
        assert flops.estimate("deit-tiny", policy=vtprune.PiToMe(ratio=ratio)).total < cost.total


def test_pitome_deit_tiny_from_a_real_trace():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    with vtprune.applied(model, "pitome:ratio=0.9") as handle, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    cost = flops.estimate("deit-tiny", schedule=handle.trace, mlp_tokens="in")
    assert round(cost.total / G, 4) == 0.7116


# --- schedules ------------------------------------------------------------------------------------------

def test_token_schedules():
    assert tome_token_schedule(17, [4, 4, 4, 4], 1) == [(17, 13), (13, 9), (9, 5), (5, 3)]
    assert vtprune.ToMe(r=16).token_schedule(197, 12, 1) == tome_token_schedule(197, [16] * 12, 1)
    assert pitome_token_schedule(197, 12, 0.9, 1)[0] == (197, 178)  # floor(196 - 176.4) = 19
    assert vtprune.PiToMe(ratio=0.4).token_schedule(17, 1, 1) == [(17, 9)]  # clamped to T // 2
    assert stage_schedule(4, {1: 2, 3: 1}, 4) == [4, 2, 2, 1]
    assert parse_schedule("576x2, 288x2") == [576, 576, 288, 288]
    assert parse_schedule("197:181,181:165x2") == [(197, 181), (181, 165), (181, 165)]
    with pytest.raises(ValueError, match="bad schedule entry"):
        parse_schedule("576y2")
    with pytest.raises(ValueError, match="32 layers"):
        flops.estimate("llava-1.5-7b", schedule=[576] * 10)
    with pytest.raises(ValueError, match="cut layers"):
        stage_schedule(576, {32: 1}, 32)


def test_policy_without_analytic_schedule_says_how_to_cost_it():
    class Opaque(vtprune.Policy):
        name = "opaque"

    with pytest.raises(NotImplementedError, match="trace of a real forward"):
        flops.estimate("vit-b-16", policy=Opaque())


@pytest.mark.parametrize("spec", ["flowcut:keep=64", "visionzip:keep=64", "randomkeep:keep=64", "pool2d:keep=64"])
def test_vlm_pruning_policies_are_costed_from_the_tokens_they_hand_on(spec):
    cost = flops.estimate("llava-1.5-7b", policy=spec)
    assert cost.visual_tokens == 64 and cost.total == flops.estimate("llava-1.5-7b", schedule="64x32").total
    full = flops.estimate("llava-1.5-7b", policy=spec, convention="full")
    assert full.by_site["vision"] == flops.estimate("llava-1.5-7b", convention="full").by_site["vision"]
    assert any("upper bound" in note for note in full.notes) == spec.startswith("flowcut")
    assert flops.estimate("llava-next-7b", policy="visionzip:dominant=54,contextual=10").visual_tokens == 5 * 64
    assert flops.estimate("llava-next-7b", policy="flowcut:keep=160").visual_tokens == 160  # 5 x 80, cut to keep


# --- conventions, configs, output ----------------------------------------------------------------------

def test_conventions_and_switches():
    paper = flops.estimate("llava-1.5-7b")
    as_flops = flops.estimate("llava-1.5-7b", unit="FLOPs")
    assert as_flops.total == 2 * paper.total and as_flops.convention == "paper+unit=FLOPs"
    # a Convention passed in keeps its earlier changes in the name
    from vtprune.flops.conventions import resolve_convention

    chained = resolve_convention(resolve_convention("paper", unit="FLOPs"), mlp_tokens="in")
    assert chained.name == "paper+unit=FLOPs,mlp_tokens=in" and chained.unit == "FLOPs"
    full = flops.estimate("llava-1.5-7b", convention="full")
    assert full.unit == "FLOPs" and full.convention == "full"
    assert set(full.by_site) == {"vision", "projector", "llm", "lm_head", "overhead"}
    assert full.prefill == sum(full.by_site.values())
    assert full.total == full.prefill  # decode_steps defaults to 0; the per-token cost is reported
    d, m, vocab = 4096, 11008, 32000
    context = 576 + 64 + 1
    assert full.decode_per_token == 2 * (32 * (4 * d * d + 3 * d * m + 2 * context * d) + d * vocab)
    with_decode = flops.estimate("llava-1.5-7b", convention="full", decode_steps=3)
    step = 2 * 32 * 2 * d
    assert with_decode.decode == 3 * full.decode_per_token + 3 * step  # contexts grow by one per step
    assert full.by_site["projector"] == 2 * 576 * (1024 * 4096 + 4096 * 4096)
    assert full.by_site["lm_head"] == 2 * d * vocab
    assert full.by_site["vision"] == 2 * (576 * 3 * 14 * 14 * 1024 + 24 * (4 * 577 * 1024**2 + 2 * 577**2 * 1024
                                                                          + 2 * 577 * 1024 * 4096))
    halved = flops.estimate("llava-1.5-7b", causal_halving=True)
    assert halved.total == paper.total - 32 * 2 * (576 * 576 - 576 * 577 // 2) * d
    with pytest.raises(ValueError, match="unknown switch"):
        flops.estimate("llava-1.5-7b", units="MACs")
    with pytest.raises(ValueError, match="presets: paper, full"):
        flops.estimate("llava-1.5-7b", convention="honest")
    with pytest.raises(flops.UnknownConfigError, match="llava-1.5-7b"):
        flops.estimate("llava-9b")


def test_vision_policy_on_a_vlm_shrinks_the_visual_tokens():
    cost = flops.estimate("llava-1.5-7b", policy="tome:r=16", convention="full")
    # the projector takes the output of vision layer 22 (feature layer -2) without CLS
    assert cost.schedule["vision"][22][1] == 577 - 23 * 16
    assert cost.visual_tokens == 577 - 23 * 16 - 1
    assert cost.by_site["overhead"] > 0
    assert flops.estimate("llava-next-7b", policy="tome:r=16").visual_tokens == 5 * (577 - 23 * 16 - 1)


def test_str_and_to_dict_carry_unit_and_convention():
    cost = flops.estimate("vit-b-16", policy="tome:r=16")
    text = str(cost)
    assert "8.655 GMACs" in text and "[paper" in text and "MACs (multiply-accumulates)" in text
    data = json.loads(json.dumps(cost.to_dict()))
    assert data["total"] == cost.total and data["unit"] == "MACs" and data["convention"] == "paper"
    assert data["schedule"]["vision"][0] == [197, 181]
    both = flops.table(cost, flops.estimate("vit-b-16", policy="tome:r=16", convention="full"), per_layer=True)
    assert "[full]" in both and "GFLOPs" in both and "vision layer 11" in both


def test_shipped_configs_match_the_hf_and_timm_readers():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    assert {"llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "vit-b-16", "vit-l-14", "deit-tiny",
            "deit-small", "deit-base"} <= set(flops.configs())
    clip = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14)
    vicuna = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    llava = LlavaConfig(vision_config=clip, text_config=vicuna, vision_feature_layer=-2)
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    next_config = LlavaNextConfig(vision_config=clip, text_config=vicuna, image_grid_pinpoints=pinpoints,
                                  vision_feature_layer=-2)
    for hf, name in ((llava, "llava-1.5-7b"), (next_config, "llava-next-7b")):
        for preset in ("paper", "full"):
            assert flops.estimate(hf, convention=preset).total == flops.estimate(name, convention=preset).total
    for timm_name, name in (("deit_tiny_patch16_224", "deit-tiny"), ("vit_large_patch16_224", "vit-l-16")):
        assert flops.estimate(timm_name, convention="full").total == flops.estimate(name, convention="full").total
    assert flops.estimate("ViT-B/16").total == flops.estimate("vit-b-16").total


# --- measured vs analytic -----------------------------------------------------------------------------------

def _agree(analytic: int, measured: float, tolerance: float = 0.03) -> float:
    ratio = measured / analytic
    print(f"measured / analytic = {ratio:.6f}")
    assert abs(ratio - 1) < tolerance, (analytic, measured)
    return ratio


@pytest.mark.parametrize("name, policy, extra", [
    ("vit_tiny_patch16_224", None, {}), ("vit_tiny_patch16_224", "tome:r=4", {}),
    ("vit_tiny_patch16_224", "pitome:ratio=0.75", {}),
    ("deit_tiny_distilled_patch16_224", "tome:r=4", {}),                # two heads, two protected tokens
    ("vit_small_patch16_224", "pitome:ratio=0.9,metric=hidden", {}),
    ("vit_base_patch16_reg4_gap_256", "tome:r=2", {}),                  # registers, average pooling
    ("vit_base_patch16_siglip_224", "tome:r=2", {}),                    # attention-pool head
    ("vit_small_patch16_224", None, {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}),
])
def test_measured_agrees_with_full_on_tiny_timm_vits(name, policy, extra):
    model = timm.create_model(name, pretrained=False, img_size=64, depth=4, embed_dim=64, num_heads=2,
                              num_classes=10, **extra).eval()
    images = torch.randn(2, 3, 64, 64)
    if policy is None:
        measured = flops.measure(model, images)
        schedule = None
    else:
        with vtprune.applied(model, policy) as handle:
            measured = flops.measure(model, images)
            schedule = handle.trace
    analytic = flops.estimate(model, schedule=schedule, policy=policy, convention="full")
    assert measured.batch_size == 2
    _agree(analytic.total, measured.per_sample)
    assert set(measured.by_module) >= {"patch_embed", "blocks", "head"} and set(measured.by_site) == {"vision"}
    assert all(parameter.requires_grad for parameter in model.parameters())  # restored after the count
    assert measured.by_module["patch_embed"] / 2 == analytic.parts["vision.patch_embed"]
    if policy is not None:
        assert analytic.by_site["overhead"] > 0


def test_measured_agrees_with_full_on_tiny_hf_clip_and_siglip():
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8)
    for config, cls in ((CLIPVisionConfig(**dims), CLIPVisionModel), (SiglipVisionConfig(**dims), SiglipVisionModel)):
        model = cls(config).eval()
        measured = flops.measure(model, {"pixel_values": torch.randn(1, 3, 32, 32)})
        analytic = flops.estimate(config, convention="full")
        _agree(analytic.total, measured.per_sample)
        assert set(measured.by_site) == {"vision"}


@pytest.fixture(scope="module")
def tiny_llava():
    from conftest import build_tiny_llava

    return build_tiny_llava()


def test_measured_agrees_with_full_on_a_tiny_llava(tiny_llava):
    image_tokens = tiny_llava.config.image_seq_length  # 16 patches of 8 px, CLS dropped
    text = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12, 13]])
    input_ids = torch.cat([text[:, :3], torch.full((1, image_tokens), 127), text[:, 3:]], dim=1)
    inputs = {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, 32, 32)}
    measured = flops.measure(tiny_llava, inputs, logits_to_keep=1)
    analytic = flops.estimate(tiny_llava.config, convention="full", prompt_tokens=text.shape[1])
    assert analytic.visual_tokens == image_tokens
    _agree(analytic.prefill, measured.total)
    assert set(measured.by_site) == {"vision", "projector", "llm", "lm_head"}
    for site in ("vision", "projector", "lm_head"):
        assert measured.by_site[site] == analytic.by_site[site]
    _agree(analytic.by_site["llm"], measured.by_site["llm"])  # older transformers: + RoPE's tiny matmul

    # one decode step with the KV cache: language model and LM head only
    with torch.no_grad():
        cache = tiny_llava(**inputs, use_cache=True, logits_to_keep=1).past_key_values
    step = flops.measure(tiny_llava, {"input_ids": torch.tensor([[14]]), "past_key_values": cache},
                         logits_to_keep=1)
    _agree(analytic.decode_per_token, step.total)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("policy", [vtprune.ToMe(r=3), vtprune.PiToMe(ratio=0.8), vtprune.FlowCut(keep=5)], ids=str)
def test_measured_agrees_with_full_on_merged_hf_towers(kind, policy):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32,
                patch_size=8)
    config = CLIPVisionConfig(**dims) if kind == "clip" else SiglipVisionConfig(**dims)
    model = (CLIPVisionModel if kind == "clip" else SiglipVisionModel)(config).eval()
    with vtprune.applied(model, policy) as handle:
        measured = flops.measure(model, {"pixel_values": torch.randn(1, 3, 32, 32)})
        analytic = flops.estimate(config, schedule=handle.trace, policy=policy, convention="full")
    assert handle.trace.final_tokens() < 16 + (kind == "clip")
    _agree(analytic.total, measured.per_sample)


@pytest.mark.parametrize("policy", [None, vtprune.ToMe(r=3), vtprune.PiToMe.preset("clip", ratio=0.8)], ids=str)
def test_measured_agrees_with_full_on_open_clip_towers(policy):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, width=32, layers=4, heads=2, mlp_ratio=2.0,
                              output_dim=16).eval()
    images = torch.randn(2, 3, 32, 32)
    if policy is None:
        measured = flops.measure(model, images)
        analytic = flops.estimate(model, convention="full")
    else:
        with vtprune.applied(model, policy) as handle:
            measured = flops.measure(model, images)
            analytic = flops.estimate(model, schedule=handle.trace, policy=policy, convention="full")
        assert handle.trace.final_tokens() < 17
    assert analytic.parts["vision.head"] == 2 * 32 * 16  # the output projection on the CLS token, in FLOPs
    extra = 0
    if policy is not None and "keys" in policy.signals:
        # nn.MultiheadAttention does not expose its keys: the adapter recomputes the k slice of in_proj,
        # N·d² MACs per layer, which the measured side sees and the analytic count leaves out
        extra = sum(2 * tokens * 32 * 32 for tokens in handle.trace.tokens_in())
    assert measured.per_sample - extra == pytest.approx(analytic.total, rel=1e-9)


LLAVA_POLICIES = [vtprune.ToMe(r=3), vtprune.PiToMe(ratio=0.8), vtprune.RandomKeep(keep=5), vtprune.Pool2d(keep=4),
                  vtprune.VisionZip(dominant=4, contextual=2)]


@pytest.mark.parametrize("policy", LLAVA_POLICIES, ids=str)
def test_measured_agrees_with_full_on_a_pruned_tiny_llava(tiny_llava, policy):
    text = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12, 13]])
    input_ids = torch.cat([text[:, :3], torch.full((1, 16), 127), text[:, 3:]], dim=1)
    inputs = {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, 32, 32)}
    with vtprune.applied(tiny_llava, policy) as handle:
        measured = flops.measure(tiny_llava, inputs, logits_to_keep=1)
        analytic = flops.estimate(tiny_llava, schedule=handle.trace, policy=policy, convention="full",
                                  prompt_tokens=text.shape[1])
    assert analytic.visual_tokens == len(handle.trace.positions[0]) < 16
    for site in ("vision", "projector", "lm_head"):
        _agree(analytic.by_site[site], measured.by_site[site])
    _agree(analytic.prefill, measured.total)


def test_a_vision_and_a_projector_policy_compose_on_llava():
    """ToMe in the tower, VisionZip at the projector: ToMe stops one layer before the feature layer, whose
    attention VisionZip reads, so the two see the same tokens (and the counts add up)."""
    from conftest import build_tiny_llava

    model = build_tiny_llava(vision_layers=4)
    text = torch.tensor([[1, 5, 6, 7, 8]])
    inputs = {"input_ids": torch.cat([text[:, :2], torch.full((1, 16), 127), text[:, 2:]], dim=1),
              "pixel_values": torch.randn(1, 3, 32, 32)}
    policies = [vtprune.ToMe(r=2), vtprune.VisionZip(keep=5)]
    with vtprune.applied(model, policies) as handle:
        measured = flops.measure(model, inputs, logits_to_keep=1)
        analytic = flops.estimate(model, schedule=handle.trace, policy=policies, convention="full", prompt_tokens=5)
    assert handle.trace.tokens("vision") == [15, 13] and handle.trace.tokens("projector") == [5]
    assert handle.trace.visual_tokens == (5,) and analytic.visual_tokens == 5
    _agree(analytic.prefill, measured.total)


def test_measured_agrees_with_full_on_flowcut_in_llava_geometry():
    from conftest import build_tiny_llava

    model = build_tiny_llava(vision_layers=24, image_size=336, patch_size=14)
    text = torch.tensor([[1, 5, 6, 7, 8]])
    input_ids = torch.cat([text[:, :2], torch.full((1, 576), 127), text[:, 2:]], dim=1)
    inputs = {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, 336, 336)}
    policy = vtprune.FlowCut(keep=64)
    with vtprune.applied(model, policy) as handle:
        measured = flops.measure(model, inputs, logits_to_keep=1)
        analytic = flops.estimate(model, schedule=handle.trace, policy=policy, convention="full",
                                  prompt_tokens=text.shape[1])
        paper = flops.estimate(model, schedule=handle.trace, policy=policy)
    assert analytic.visual_tokens == 64 and paper.schedule["llm"] == ((64, 64),) * 2
    _agree(analytic.prefill, measured.total)


# --- command line ---------------------------------------------------------------------------------------------

def test_cli_prints_schedule_and_both_conventions(capsys, tmp_path):
    out = tmp_path / "flops.json"
    assert cli.main(["flops", "--config", "llava-1.5-7b", "--schedule", "576x2,288x30", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "576 576 288" in printed and "as --schedule: 576x2,288x30" in printed
    assert "2.007 TMACs" in printed and "[paper]" in printed and "[full]" in printed and "TFLOPs" in printed
    data = json.loads(out.read_text())
    assert [item["convention"] for item in data] == ["paper", "full"]

    assert cli.main(["flops", "--config", "llava-1.5-7b", "--policy", "flowcut:keep=64"]) == 0
    printed = capsys.readouterr().out
    assert "flowcut:keep=64" in printed and "415.5 GMACs" in printed and "upper bound" in printed

    assert cli.main(["flops", "--config", "vit-b-16", "--policy", "tome:r=16", "--per-layer"]) == 0
    printed = capsys.readouterr().out
    assert "197->181" in printed and "8.655 GMACs" in printed and "vision layer 11" in printed


@pytest.mark.parametrize("argv, expected", [
    (["--config", "llava-9b"], "llava-1.5-7b"),
    (["--config", "vit-b-16", "--policy", "nope:r=1"], "registered policies: fastv, flowcut, flowcut_llm, pdrop, pitome, pool2d, randomkeep, tome, transprune, visionzip"),
    (["--config", "llava-1.5-7b", "--schedule", "576x3"], "32 layers"),
    (["--config", "vit-b-16", "--set", "units=MACs"], "accepted:"),
])
def test_cli_errors_are_one_line_with_status_2(capsys, argv, expected):
    assert cli.main(["flops", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and expected in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_cli_lists_configs_and_policies(capsys):
    assert cli.main(["flops", "--list"]) == 0
    printed = capsys.readouterr().out
    assert "llava-next-7b" in printed and "tome" in printed


def test_flops_imports_no_host_library():
    import subprocess
    import sys

    probe = ("import sys, vtprune.flops as f; f.estimate('llava-1.5-7b', policy='tome:r=16', convention='full'); "
             "print(sorted(m for m in ('timm', 'transformers', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_feature_layer_indexes_hidden_states():
    pairs = [(10, 8), (8, 6), (6, 4)]
    arch = dataclasses.replace(flops.load_config("clip-vit-l-14-336"), drop_prefix=False)
    for feature_layer, expected in ((0, 577), (1, 8), (3, 4), (-1, 4), (-2, 6), (-4, 577)):
        assert dataclasses.replace(arch, feature_layer=feature_layer).visual_tokens_per_view(pairs) == expected
    with pytest.raises(ValueError, match="outside"):
        dataclasses.replace(arch, feature_layer=-5).visual_tokens_per_view(pairs)


def test_visual_tokens_overrides_the_nominal_count():
    real = flops.estimate("llava-next-7b", visual_tokens=2144, convention="full")
    nominal = flops.estimate("llava-next-7b", convention="full")
    assert real.visual_tokens == 2144 and real.schedule["llm"][0] == (2144, 2144)
    assert real.by_site["vision"] == nominal.by_site["vision"]        # still 5 views through the tower
    assert real.by_site["projector"] == nominal.by_site["projector"]  # projected before unpadding
    assert real.by_site["llm"] < nominal.by_site["llm"]
    with pytest.raises(ValueError, match="contradicts"):
        flops.estimate("llava-1.5-7b", visual_tokens=100, schedule="576x32")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_flowcut_overhead_is_its_relay_products_at_the_layers_that_prune(kind):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2, image_size=64,
                patch_size=8)
    config = CLIPVisionConfig(**dims) if kind == "clip" else SiglipVisionConfig(**dims)
    model = (CLIPVisionModel if kind == "clip" else SiglipVisionModel)(config).eval()
    policy = vtprune.FlowCut(keep=5)
    with vtprune.applied(model, policy) as handle, torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 64, 64))
    full = flops.estimate(config, schedule=handle.trace, policy=policy, convention="full")
    layers = [layer for layer in full.layers if layer.site == "vision"]
    pruning = [layer for layer in layers if layer.tokens_out < layer.tokens_in]
    assert pruning and all(layer.overhead == 0 for layer in layers if layer not in pruning)
    # CLS relay: q_cls K^T and v_cls V^T; SigLIP (no CLS): the mean query's q K^T; FLOPs = 2 x MACs
    products = 2 if kind == "clip" else 1
    assert [layer.overhead for layer in pruning] == [2 * products * layer.tokens_in * 32 for layer in pruning]
    paper = flops.estimate(config, schedule=handle.trace, policy=policy)
    assert sum(layer.overhead for layer in paper.layers) == 0  # the paper convention leaves the policy's work out


def test_pitome_overhead_follows_the_matching_each_layer_runs():
    """The clip_hf preset runs ToMe's bipartite matching in layers 0-12 and PiToMe's energy after."""
    policy = vtprune.PiToMe.preset("clip_hf", ratio=0.9)
    layers = {layer.layer: layer for layer in flops.estimate("llava-1.5-7b", policy=policy, convention="full").layers
              if layer.site == "vision"}
    first, later = layers[0], layers[14]
    assert first.tokens_in == 577 and first.overhead == 2 * 289 * 288 * 1024  # ceil(N/2) floor(N/2) d, in FLOPs
    assert later.overhead == 2 * (later.tokens_in - 1) ** 2 * 1024  # (N - CLS)^2 d


def _llava7b_layer(n):
    """Vicuna-7B's paper-convention MACs of one decoder layer on n tokens: 4nd² + 2n²d + 3ndm."""
    d, m = 4096, 11008
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def test_a_policy_that_fixes_the_visual_tokens_composes_with_a_language_model_policy():
    """VisionZip hands 192 (or 64) tokens on; TransPrune (or FastV) then cuts inside the language model on those."""
    composed = flops.estimate("llava-1.5-7b", policy=["visionzip:keep=192", "transprune"])
    expected = [192] * 7 + [168] * 2 + [120] * 3 + [24] * 20
    assert [pair[0] for pair in composed.schedule["llm"]] == expected
    assert composed.total == sum(_llava7b_layer(n) for n in expected)
    fastv = flops.estimate("llava-1.5-7b", policy=["visionzip:keep=64", "fastv:k=2,r=0.5"])
    assert fastv.total == 2 * _llava7b_layer(64) + 30 * _llava7b_layer(32)
    # LLaVA-NeXT: with FlowCut's second stage the per-image cut is left to it (400 = 5 crops x 80 in layers 0-1)
    next_two_stage = flops.estimate("llava-next-7b", policy=["flowcut:keep=160", "flowcut_llm:keep=160"])
    assert [pair[0] for pair in next_two_stage.schedule["llm"]] == [400, 400] + [160] * 30


def test_without_a_trace_the_projector_runs_on_what_a_projector_policy_kept():
    full = flops.estimate("llava-1.5-7b", policy="visionzip:keep=64", convention="full")
    assert full.by_site["projector"] == 2 * 64 * (1024 * 4096 + 4096 * 4096)  # not 576 rows
    unpruned = flops.estimate("llava-1.5-7b", convention="full")
    assert unpruned.by_site["projector"] == 2 * 576 * (1024 * 4096 + 4096 * 4096)


def test_a_projector_policy_on_a_model_without_a_language_model_is_named():
    with pytest.raises(ValueError, match="site 'projector', which .* does not have \\(it has no language model\\)"):
        flops.estimate("vit-b-16", policy="visionzip:keep=64")


@pytest.mark.parametrize("name, reason", [
    ("vit_base_r50_s16_384", "HybridEmbed is not"),  # a ResNet stem: its grid is not img_size / kernel
    ("xcit_tiny_12_p16_224", "Xcit uses XCA"),
    ("vit_base_patch16_18x2_224", "ParallelThingsBlock has other parts"),
    ("cait_s24_224", "Cait uses TalkingHeadAttn and class-attention blocks"),
])
def test_timm_models_it_cannot_cost_are_refused_by_name(name, reason):
    with pytest.raises(ValueError, match=reason):
        flops.estimate(name)


@pytest.mark.parametrize("policies", [[vtprune.ToMe(r=2)], [vtprune.PiToMe(ratio=0.8)],
                                      [vtprune.ToMe(r=2), vtprune.VisionZip(dominant=3, contextual=1)]], ids=str)
def test_a_llava_vision_policy_costed_by_its_rules_equals_its_trace(policies):
    """Without running the model, a vision policy on LLaVA reduces in the layers up to the feature layer only
    (one fewer with a projector policy that reads its attention), as the adapter applies it."""
    from conftest import build_tiny_llava

    model = build_tiny_llava(vision_layers=4)
    ids = torch.tensor([[1] + [127] * 16 + [2, 3]])
    with torch.no_grad(), vtprune.applied(model, policies) as handle:
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    measured = flops.estimate(model, schedule=handle.trace, policy=policies, convention="full", prompt_tokens=3)
    by_rules = flops.estimate(model, policy=policies, convention="full", prompt_tokens=3)
    assert by_rules.schedule["vision"] == measured.schedule["vision"]
    assert by_rules.total == measured.total


def test_a_llava_next_trace_is_costed_on_the_crops_it_encoded():
    """An image 20 x 64 px picks the 32 x 64 pinpoint: 2 tiles and the base, 3 crops, not the config's 5."""
    from conftest import build_tiny_llava_next

    model = build_tiny_llava_next()
    pixels = torch.randn(2, 5, 3, 32, 32, dtype=torch.float64)
    sizes = torch.tensor([[20, 64], [64, 20]])
    with torch.no_grad(), vtprune.applied(model, vtprune.RandomKeep(keep=5)) as handle:
        model.model.get_image_features(pixel_values=pixels, image_sizes=sizes)
    assert len(handle.trace.positions) == 6 and len(handle.trace.visual_tokens) == 2
    traced = flops.estimate(model, schedule=handle.trace, convention="full")
    nominal = flops.estimate(model, convention="full")  # the config's 5 views
    assert traced.by_site["vision"] * 5 == nominal.by_site["vision"] * 3
    # the projector: 3 crops x 5 kept tokens, against 5 views x 16 patches
    assert traced.by_site["projector"] * (5 * 16) == nominal.by_site["projector"] * (3 * 5)
