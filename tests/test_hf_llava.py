"""The hf-llava adapter: vision- and projector-site policies on a real (tiny, random) HF LLaVA-1.5, with
forward and generate used exactly as without vtprune."""
import copy

import pytest
import torch

import vtprune
from conftest import build_tiny_llava, check_already_patched_rules
from llava_oracles import flowcut_encode, pitome_clip_hf_encode, visionzip_encode

IMAGE = 127


def prompt(before: list[int], image_tokens: int, after: list[int]) -> list[int]:
    return before + [IMAGE] * image_tokens + after


def batch(rows: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad rows with token 0 on ``side``; returns (input_ids, attention_mask)."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def images(count: int, size: int = 32, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def greedy(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, do_sample=False)


@pytest.fixture(scope="module")
def llava336():
    """LLaVA-1.5's tower geometry: 24 layers, 336 px, patch 14 -> 577 tokens, 576 image tokens (float64)."""
    return build_tiny_llava(vision_layers=24, image_size=336, patch_size=14, dtype=torch.float64)


# --- FlowCut ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [192, 128, 64])
def test_flowcut_schedule_ends_at_keep_and_the_llm_gets_keep_tokens(llava336, keep):
    pixels = images(2, 336, dtype=torch.float64)
    ids, mask = batch([prompt([1, 2], 576, [3, 4, 5])] * 2)
    with vtprune.applied(llava336, vtprune.FlowCut(keep=keep)) as handle, torch.no_grad():
        out = llava336(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        trace = handle.trace
    assert out.logits.shape[1] == 5 + keep
    layers = trace.layers("vision")
    assert [layer.layer for layer in layers] == list(range(23))  # up to the feature layer (-2)
    assert layers[21].tokens_out == keep + 1 and layers[22].tokens_in == keep + 1  # forced cut at idx 21, CLS kept
    pruned_at = [layer.layer for layer in layers if layer.tokens_out < layer.tokens_in]
    assert set(pruned_at) <= {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21} and 21 in pruned_at
    positions = torch.tensor(trace.positions)
    assert positions.shape == (2, keep)
    assert bool((positions.diff(dim=1) > 0).all()) and int(positions.min()) >= 0 and int(positions.max()) < 576


@pytest.mark.parametrize("keep", [128, 64])
def test_flowcut_matches_the_official_encoder(llava336, keep):
    pixels = images(2, 336, seed=1, dtype=torch.float64)
    tower, projector = llava336.model.vision_tower, llava336.model.multi_modal_projector
    with torch.no_grad():
        expected, expected_positions = flowcut_encode(tower, pixels, keep)
        with vtprune.applied(llava336, vtprune.FlowCut(keep=keep)) as handle:
            features = llava336.model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.equal(torch.tensor(handle.trace.positions), expected_positions)
    torch.testing.assert_close(torch.stack(features), projector(expected), rtol=0, atol=1e-10)


def test_flowcut_batch_uses_the_batch_maximum_count(llava336):
    """Official rule: the per-step count is the maximum over the batch, so a batch keeps one length."""
    pixels = images(3, 336, seed=2, dtype=torch.float64)
    with torch.no_grad(), vtprune.applied(llava336, vtprune.FlowCut(keep=64)) as handle:
        llava336.model.get_image_features(pixel_values=pixels)
        together = handle.trace.tokens("vision")
        alone = []
        for i in range(3):
            llava336.model.get_image_features(pixel_values=pixels[i:i + 1])
            alone.append(handle.trace.tokens("vision"))
    assert together == [min(counts) for counts in zip(*alone)]


def test_flowcut_batch_of_two_prompts_equals_each_alone(llava336):
    """Different prompt lengths, left padding; the same image in both rows (FlowCut's count is the batch
    maximum, so only identical images make a batch-independent schedule)."""
    pixels = images(1, 336, seed=12, dtype=torch.float64).expand(2, -1, -1, -1)
    rows = [prompt([1, 2, 3], 576, [4, 5]), prompt([6], 576, [7, 8, 9, 10, 11])]
    ids, mask = batch(rows)
    with vtprune.applied(llava336, vtprune.FlowCut(keep=64)):
        together = greedy(llava336, input_ids=ids, attention_mask=mask, pixel_values=pixels)
        for i, row in enumerate(rows):
            alone = greedy(llava336, input_ids=torch.tensor([row]), pixel_values=pixels[i:i + 1])
            assert torch.equal(together[i, -5:], alone[0, -5:])


def test_flowcut_keep_all_is_the_unpatched_model(llava336):
    pixels = images(1, 336, seed=3, dtype=torch.float64)
    ids, mask = batch([prompt([1, 2], 576, [3])])
    reference = greedy(llava336, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with vtprune.applied(llava336, vtprune.FlowCut(keep=576)) as handle:
        assert torch.equal(greedy(llava336, input_ids=ids, attention_mask=mask, pixel_values=pixels), reference)
    assert handle.trace.tokens("vision") == [577] * 23


# --- generation works unchanged -------------------------------------------------------------------

POLICIES = [vtprune.RandomKeep(keep=5), vtprune.Pool2d(keep=4), vtprune.VisionZip(dominant=4, contextual=2),
            vtprune.ToMe(r=3)]


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_generate_returns_the_original_prompt_then_new_tokens(policy):
    model = build_tiny_llava()
    ids, mask = batch([prompt([1, 2, 3], 16, [4, 5]), prompt([6], 16, [7, 8, 9, 10])])
    pixels = images(2)
    with vtprune.applied(model, policy) as handle:
        out = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=pixels)
        alone = [greedy(model, input_ids=ids[row:row + 1, mask[row].argmax():], pixel_values=pixels[row:row + 1])
                 for row in range(2)]
    assert torch.equal(out[:, :ids.shape[1]], ids) and out.shape[1] == ids.shape[1] + 5
    kept = kept_features(model, policy, pixels).shape[1]
    assert kept < 16 and handle.trace.visual_tokens == (kept,)  # the last call: one image
    for row in range(2):  # a left-padded batch answers as each prompt alone
        assert torch.equal(out[row, ids.shape[1]:], alone[row][0, -5:])


def kept_features(model, policy, pixels):
    """The image features vtprune hands the language model (an independent read through get_image_features)."""
    with torch.no_grad(), vtprune.applied(model, policy):
        return torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)


def reference_logits(model, rows_before_after, features, side="left"):
    """The unpatched model fed ``features`` for a prompt with exactly as many placeholders (inputs_embeds)."""
    rows = [prompt(before, features.shape[1], after) for before, after in rows_before_after]
    ids, mask = batch(rows, side)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == IMAGE).unsqueeze(-1), features.to(embeds.dtype))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_forward_equals_the_unpatched_model_fed_the_kept_tokens(policy, side):
    model = build_tiny_llava(dtype=torch.float64)
    pixels = images(2, dtype=torch.float64)
    parts = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9, 10])]
    features = kept_features(model, policy, pixels)
    expected, mask = reference_logits(model, parts, features, side)
    ids, full_mask = batch([prompt(before, 16, after) for before, after in parts], side)
    with torch.no_grad(), vtprune.applied(model, policy):
        logits = model(input_ids=ids, attention_mask=full_mask, pixel_values=pixels).logits
    assert logits.shape == expected.shape
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid], rtol=0, atol=1e-10)


@pytest.mark.parametrize("policy", POLICIES[:3], ids=str)
def test_batch_with_left_padding_equals_each_sample_alone(policy):
    model = build_tiny_llava(dtype=torch.float64)
    rows = [prompt([1, 2, 3], 16, [4, 5]), prompt([6], 16, [7, 8, 9, 10, 11, 12])]
    pixels = images(2, dtype=torch.float64, seed=4)
    ids, mask = batch(rows)
    with vtprune.applied(model, policy):
        together = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=pixels)
        for i, row in enumerate(rows):
            alone = greedy(model, input_ids=torch.tensor([row]), pixel_values=pixels[i:i + 1])
            assert torch.equal(together[i, -5:], alone[0, -5:])


def test_random_keep_keeps_the_same_positions_in_every_image():
    model = build_tiny_llava()
    policy = vtprune.RandomKeep(keep=5, seed=3)
    ids, mask = batch([prompt([1, 2], 16, [3]), prompt([4], 16, [5, 6])])
    with torch.no_grad(), vtprune.applied(model, policy) as handle:
        model(input_ids=ids, attention_mask=mask, pixel_values=images(2, seed=4))
    expected = tuple(policy.positions(16).tolist())
    assert handle.trace.positions == (expected, expected) and len(expected) == 5


def test_labels_are_shortened_with_the_prompt():
    model = build_tiny_llava(dtype=torch.float64)
    policy, pixels = vtprune.RandomKeep(keep=5), images(1, dtype=torch.float64)
    ids = torch.tensor([prompt([1, 2], 16, [3, 4, 5, 6])])
    labels = ids.masked_fill(ids == IMAGE, -100)
    features = kept_features(model, policy, pixels)
    short = torch.tensor([prompt([1, 2], 5, [3, 4, 5, 6])])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(short).masked_scatter((short == IMAGE).unsqueeze(-1), features)
        expected = model(inputs_embeds=embeds, labels=short.masked_fill(short == IMAGE, -100)).loss
        with vtprune.applied(model, policy):
            loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)


def test_a_hand_written_decode_loop_with_the_original_mask_matches_generate():
    model = build_tiny_llava(dtype=torch.float64)
    ids, mask = batch([prompt([1, 2, 3], 16, [4]), prompt([5], 16, [6, 7])])
    pixels = images(2, dtype=torch.float64, seed=5)
    with torch.no_grad(), vtprune.applied(model, vtprune.RandomKeep(keep=6)):
        expected = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=pixels)[:, ids.shape[1]:]
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
        tokens, cache = [], out.past_key_values
        positions = mask.sum(-1, keepdim=True) - 1
        for _ in range(5):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            positions = positions + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache)
    assert torch.equal(torch.cat(tokens, dim=1), expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_all_generation_is_identical_in_every_dtype_and_backend(attn, dtype):
    model = build_tiny_llava(attn=attn, dtype=dtype)
    ids, mask = batch([prompt([1, 2], 16, [3]), prompt([4, 5, 6], 16, [7, 8])])
    pixels = images(2, dtype=dtype, seed=6)
    reference = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with vtprune.applied(model, vtprune.RandomKeep(keep=16)):
        assert torch.equal(greedy(model, input_ids=ids, attention_mask=mask, pixel_values=pixels), reference)
    with vtprune.applied(model, vtprune.VisionZip(dominant=4, contextual=2)):
        pruned = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert torch.equal(pruned[:, :ids.shape[1]], ids)


def test_remove_restores_the_model_exactly():
    model = build_tiny_llava(vision_layers=3)
    pristine = copy.deepcopy(model)
    ids, mask = batch([prompt([1], 16, [2, 3])])
    pixels = images(1, seed=7)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)  # HF installs its capture hooks lazily
    dicts = {name: dict(module.__dict__) for name, module in model.named_modules()}
    handle = vtprune.apply(model, [vtprune.ToMe(r=2), vtprune.VisionZip(dominant=3, contextual=1)])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert handle.trace.tokens("vision") == [15] and handle.trace.tokens("projector") == [4]
    assert handle.remove() is model
    assert {name: dict(module.__dict__) for name, module in model.named_modules()}.keys() == dicts.keys()
    for name, module in model.named_modules():
        assert set(module.__dict__) == set(dicts[name]), name
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,
                           pristine(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits)


def test_the_feature_layer_keeps_proportional_attention_when_a_projector_policy_reads_it():
    """With ToMe and VisionZip, ToMe stops merging one layer before LLaVA's feature layer (VisionZip reads
    that layer's attention), but the feature layer still attends over merged tokens: it adds log(size)."""
    model = build_tiny_llava(vision_layers=3)  # feature layer -2: layer 1; ToMe merges in layer 0 only
    masks = []
    feature = model.model.vision_tower.encoder.layers[1].self_attn
    hook = feature.register_forward_pre_hook(lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")),
                                             with_kwargs=True)
    try:
        with torch.no_grad(), vtprune.applied(model, [vtprune.ToMe(r=2), vtprune.VisionZip(dominant=3, contextual=1)]
                                              ) as handle:
            model(input_ids=torch.tensor([prompt([1], 16, [2])]), pixel_values=images(1))
    finally:
        hook.remove()
    assert handle.trace.tokens("vision") == [15]
    # ToMe r=2 left 15 tokens holding the 17: the feature layer adds log(size) of each to the keys
    assert masks[0] is not None and masks[0].shape[-1] == 15
    sizes = masks[0].reshape(-1).double().exp()
    assert round(float(sizes.sum())) == 17 and float(sizes.max()) > 1.5


def test_already_patched_rules():
    model = build_tiny_llava()
    ids = torch.tensor([prompt([1], 16, [2])])
    check_already_patched_rules(model, lambda m: m(input_ids=ids, pixel_values=images(1)), [15])


# --- SigLIP tower (no CLS) --------------------------------------------------------------------------

@pytest.mark.parametrize("policy", [vtprune.FlowCut(keep=6), vtprune.VisionZip(dominant=4, contextual=2),
                                    vtprune.Pool2d(keep=4)], ids=str)
def test_siglip_llava(policy):
    model = build_tiny_llava(vision="siglip", vision_layers=4, dtype=torch.float64)
    ids, mask = batch([prompt([1, 2], 16, [3]), prompt([4], 16, [5, 6])])
    pixels = images(2, dtype=torch.float64, seed=8)
    with vtprune.applied(model, policy) as handle:
        out = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=pixels)
        kept = len(handle.trace.positions[0])
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert kept == {"flowcut": 6, "visionzip": 6, "pool2d": 4}[policy.name]
    assert min(min(row) for row in handle.trace.positions) >= 0  # no CLS: every token handed on is a patch


# --- VisionZip against the official formula ----------------------------------------------------------

@pytest.mark.parametrize("dominant,contextual", [(54, 10), (108, 20), (20, 0)])
def test_visionzip_matches_the_official_encoder(llava336, dominant, contextual):
    pixels = images(2, 336, seed=9, dtype=torch.float64)
    tower, projector = llava336.model.vision_tower, llava336.model.multi_modal_projector
    with torch.no_grad():
        if contextual:
            expected, dominant_positions = visionzip_encode(tower, pixels, dominant, contextual)
        else:
            expected, dominant_positions = visionzip_encode(tower, pixels, dominant, 1)
            expected = expected[:, :dominant]
        policy = vtprune.VisionZip(dominant=dominant, contextual=contextual)
        with vtprune.applied(llava336, policy) as handle:
            features = torch.stack(llava336.model.get_image_features(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(features, projector(expected), rtol=0, atol=1e-10)
    positions = torch.tensor(handle.trace.positions)
    assert torch.equal(positions[:, 0], torch.full((2,), -1))  # the CLS token is handed on, as the official code
    assert torch.equal(positions[:, 1:dominant], dominant_positions)


# --- errors -----------------------------------------------------------------------------------------

def test_clear_errors():
    model = build_tiny_llava()
    pixels = images(1)
    ids = torch.tensor([prompt([1], 16, [2])])
    with vtprune.applied(model, vtprune.Pool2d(keep=9)), pytest.raises(ValueError, match="accepted keep values .*\\[1, 4, 16\\]"):
        model(input_ids=ids, pixel_values=pixels)
    with vtprune.applied(model, [vtprune.ToMe(r=2), vtprune.Pool2d(keep=4)]), \
            pytest.raises(ValueError, match="pool2d needs the full patch grid"):
        model(input_ids=ids, pixel_values=pixels)
    with vtprune.applied(model, vtprune.RandomKeep(keep=4)):
        embeds = model.get_input_embeddings()(ids)
        with pytest.raises(ValueError, match="pass input_ids \\(not inputs_embeds\\)"):
            model(inputs_embeds=embeds, pixel_values=pixels)
        with pytest.raises(ValueError, match="vision_feature_layer=-2 \\(its config\\)"):
            model(input_ids=ids, pixel_values=pixels, vision_feature_layer=-1)
        with pytest.raises(ValueError, match="placeholders for 1"):
            model(input_ids=ids, pixel_values=images(2))
    with pytest.raises(ValueError, match="acts at site 'projector'.*'timm-vit'"):
        from conftest import small_vit
        vtprune.apply(small_vit(), vtprune.RandomKeep(keep=4))
    report = vtprune.inspect(model)
    assert report.adapter == "hf-llava" and report.sites["projector"] == ("model.multi_modal_projector",)
    assert report.sites["vision"] == ("model.vision_tower.encoder.layers.0",)


def test_beam_search_and_several_return_sequences():
    model = build_tiny_llava(dtype=torch.float64)
    parts = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9, 10])]
    ids, mask = batch([prompt(before, 16, after) for before, after in parts])
    short, short_mask = batch([prompt(before, 5, after) for before, after in parts])
    pixels = images(2, dtype=torch.float64, seed=10)
    beams = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    policy = vtprune.RandomKeep(keep=5)
    with torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **beams)
        with vtprune.applied(model, vtprune.RandomKeep(keep=16)):
            assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **beams),
                               reference)
        with vtprune.applied(model, policy):
            kept = model.model.get_image_features(pixel_values=pixels)
            pruned = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **beams)
            sampled = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                                     do_sample=True, num_return_sequences=3)
        kept = type(kept)(pooler_output=list(kept.pooler_output))  # the unpatched model fed the kept tokens
        expected = model.generate(input_ids=short, attention_mask=short_mask, mm_encoder_outputs={"image": kept},
                                  **beams)
    assert torch.equal(pruned[:, :ids.shape[1]], ids) and torch.equal(pruned[:, -4:], expected[:, -4:])
    assert sampled.shape == (6, ids.shape[1] + 3) and torch.equal(sampled[::3, :ids.shape[1]], ids)


# --- PiToMe's official LLaVA preset ---------------------------------------------------------------------

def test_pitome_clip_hf_matches_the_official_llava_patch(llava336):
    pixels = images(2, 336, seed=11, dtype=torch.float64)
    tower, projector = llava336.model.vision_tower, llava336.model.multi_modal_projector
    policy = vtprune.PiToMe.preset("clip_hf", ratio=0.9)
    with torch.no_grad():
        expected, positions = pitome_clip_hf_encode(tower, pixels, 0.9)
        with vtprune.applied(llava336, policy) as handle:
            features = torch.stack(llava336.model.get_image_features(pixel_values=pixels).pooler_output)
    assert features.shape[1] == expected.shape[1] == 54
    assert all(layer.reduced == "post" for layer in handle.trace.layers("vision"))
    # the official patch hands tokens on in its merge order; vtprune in raster order of their first patch
    order = positions.argsort(dim=1)
    assert torch.equal(torch.tensor(handle.trace.positions), positions.gather(1, order))
    expected = expected.gather(1, order.unsqueeze(-1).expand_as(expected))
    torch.testing.assert_close(features, projector(expected), rtol=0, atol=1e-10)


@pytest.mark.parametrize("ratio,tokens", [(0.85, 17), (0.875, 30), (0.9, 54), (0.925, 101), (0.95, 183),
                                          (0.975, 330)])
def test_pitome_clip_hf_hands_the_documented_token_counts_to_the_llm(llava336, ratio, tokens):
    """merging.md 3.3: the visual tokens reaching the LLM at each ratio of the official VQA sweep."""
    policy = vtprune.PiToMe.preset("clip_hf", ratio=ratio)
    assert policy.token_schedule(577, 24, 1)[23][0] - 1 == tokens
    with torch.no_grad(), vtprune.applied(llava336, policy) as handle:
        llava336.model.get_image_features(pixel_values=images(1, 336, dtype=torch.float64))
    assert handle.trace.visual_tokens == (tokens,)


def test_the_attribute_layout_of_older_transformers_is_refused_clearly():
    """transformers < 4.52 kept the parts on the generation model, with a LlamaForCausalLM as its language
    model. That class is not in the installed transformers, so the layout is assembled here from real
    transformers parts, and is refused with the version it needs."""
    from transformers import LlamaForCausalLM

    source = build_tiny_llava()
    old = torch.nn.Module()
    old.config, old.vision_tower = source.config, source.model.vision_tower
    old.multi_modal_projector = source.model.multi_modal_projector
    old.language_model = LlamaForCausalLM(source.config.text_config)
    with pytest.raises(TypeError, match="layout of transformers < 4.52.*transformers>=5"):
        vtprune.apply(old, vtprune.RandomKeep(keep=4))


def test_the_inner_llava_model_is_refused_with_what_to_apply_to_instead():
    model = build_tiny_llava()
    with pytest.raises(TypeError, match="LlavaModel is the inner model.*apply vtprune to the generation model"):
        vtprune.apply(model.model, vtprune.RandomKeep(keep=4))
    assert vtprune.handle_of(model.model) is None
