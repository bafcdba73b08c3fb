"""The llm site: visual tokens dropped between decoder layers of a real (tiny, random) HF LLaVA-1.5 with a
24x24 = 576-token grid and a 32-layer Llama decoder; the KV cache, positions, padding and batches right."""
import copy

import pytest
import torch

import vtprune
from conftest import build_tiny_llava
from test_hf_llava import IMAGE, batch, images, prompt
from vtprune import flops


@pytest.fixture(scope="module")
def llava():
    return build_tiny_llava(vision_layers=2, image_size=336, patch_size=14, text_layers=32, dtype=torch.float64)


ROWS = [prompt([1, 2, 3], 576, [4, 5, 6]), prompt([7], 576, [8, 9, 10, 11, 12])]


def generate(model, ids, mask, pixels, steps=20, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=steps,
                              **{"do_sample": False, **kwargs})


@pytest.mark.parametrize("policy,schedule", [
    (vtprune.TransPrune(), [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20),
    (vtprune.TransPrune.low(), [576] * 7 + [360] * 2 + [108] * 3 + [36] * 20),
    (vtprune.FastV(k=2, r=0.5), [576] * 2 + [288] * 30),
    (vtprune.FastV(k=2, r=0.75), [576] * 2 + [144] * 30),
    (vtprune.PDrop(), [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8),
], ids=str)
def test_per_layer_visual_token_schedules(llava, policy, schedule):
    ids, mask = batch(ROWS[:1])
    with torch.no_grad(), vtprune.applied(llava, policy) as handle:
        out = llava(input_ids=ids, attention_mask=mask, pixel_values=images(1, 336, dtype=torch.float64))
    assert handle.trace.tokens_in("llm") == schedule
    assert out.logits.shape[1] == ids.shape[1] - 576 + schedule[-1]
    assert policy.token_schedule(576, 32) == [(n, n) for n in schedule]
    # the FLOPs of the trace are the paper-convention numbers of the same schedule
    paper = flops.estimate("llava-1.5-7b", schedule=schedule).total
    assert flops.estimate("llava-1.5-7b", schedule=handle.trace).total == paper
    assert flops.estimate("llava-1.5-7b", policy=policy).total == paper


def test_fastv_keeps_the_exact_floor_of_n_times_one_minus_r():
    # 2880 * (1 - 0.9) is 287.99999999999994 in floating point; (1 - R) x N is 288
    assert vtprune.FastV(r=0.9).token_schedule(2880, 3)[-1] == (288, 288)
    assert vtprune.FastV(r=0.875).kept(196) == 24 and vtprune.FastV(r=0.7).kept(10) == 3
    assert vtprune.FastV(r=0.0).kept(576) == 576 and vtprune.FastV(r=0.999).kept(576) == 0


@pytest.mark.parametrize("policy", [vtprune.FastV(r=0.5), vtprune.PDrop(), vtprune.TransPrune()], ids=str)
def test_batch_with_left_padding_equals_each_sample_alone(llava, policy):
    ids, mask = batch(ROWS)
    pixels = images(2, 336, seed=1, dtype=torch.float64)
    with vtprune.applied(llava, policy):
        together = generate(llava, ids, mask, pixels)
        with torch.no_grad():
            logits = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        for i, row in enumerate(ROWS):
            alone = generate(llava, torch.tensor([row]), None, pixels[i:i + 1])
            assert torch.equal(together[i, -20:], alone[0, -20:])
            with torch.no_grad():
                single = llava(input_ids=torch.tensor([row]), pixel_values=pixels[i:i + 1]).logits[0]
            valid = logits[i][-single.shape[0]:]  # left padding: the row's tokens are at the end
            torch.testing.assert_close(valid, single, rtol=0, atol=1e-10)
    assert together.shape[1] == ids.shape[1] + 20


@pytest.mark.parametrize("policy", [vtprune.FastV(r=0.0), vtprune.TransPrune(ratios=(1.0, 1.0, 1.0)),
                                    vtprune.PDrop(lam=1.0)], ids=str)
def test_keep_all_generation_is_the_unpatched_models(llava, policy):
    ids, mask = batch(ROWS)
    pixels = images(2, 336, seed=2, dtype=torch.float64)
    reference = generate(llava, ids, mask, pixels)
    with vtprune.applied(llava, policy):
        assert torch.equal(generate(llava, ids, mask, pixels), reference)


def manual_fastv(model, ids, pixels, k, r, mode, extra=()):
    """FastV on an unpatched model, layer by layer (batch 1, no padding): layers 0..k-1 on every token, the
    last prompt token's attention at layer k-1 picks the visual tokens, the rest run on the kept tokens with
    positions renumbered (compact) or kept. ``extra`` tokens appended after the prompt join every layer
    (what a KV-cached decode step computes). Returns the logits at the last position."""
    inner, lm = model.model, model.model.language_model
    with torch.no_grad():
        features = torch.stack(inner.get_image_features(pixel_values=pixels).pooler_output)
        full = torch.cat([ids, torch.tensor([list(extra)], dtype=torch.long)], dim=1)
        x = lm.embed_tokens(full).masked_scatter((full == IMAGE)[..., None], features)
        prompt_len, length = ids.shape[1], full.shape[1]
        positions = torch.arange(length)[None]
        cos, sin = lm.rotary_emb(x, positions)
        captured = {}
        for index, layer in enumerate(lm.layers):
            if index == k:
                visual = (ids[0] == IMAGE).nonzero().flatten()
                attn = lm.layers[k - 1].self_attn
                q = captured["q"].view(1, -1, attn.config.num_attention_heads, attn.head_dim).transpose(1, 2)
                kk = captured["k"].view(1, -1, attn.config.num_key_value_heads, attn.head_dim).transpose(1, 2)
                c, s = cos[:, :prompt_len], sin[:, :prompt_len]
                rot = lambda t: t * c[:, None] + torch.cat([-t[..., t.shape[-1] // 2:], t[..., :t.shape[-1] // 2]], -1) * s[:, None]  # noqa: E731,E501
                q, kk = rot(q[:, :, :prompt_len]), rot(kk[:, :, :prompt_len])
                kk = kk.repeat_interleave(q.shape[1] // kk.shape[1], dim=1)
                row = torch.softmax(q[:, :, -1:] @ kk.transpose(-1, -2) * attn.scaling, dim=-1).mean(1)[0, 0]
                chosen = visual[row[visual].topk(int(len(visual) * (1 - r))).indices]
                drop = torch.ones(length, dtype=torch.bool)
                drop[:] = False
                drop[visual] = True
                drop[chosen] = False
                keep = (~drop).nonzero().flatten()
                x = x[:, keep]
                new_positions = torch.arange(len(keep))[None] if mode == "compact" else positions[:, keep]
                cos, sin = lm.rotary_emb(x, new_positions)
            hooks = []
            if index == k - 1:
                hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: captured.update(q=o)),
                         layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: captured.update(k=o))]
            x = layer(x, attention_mask=None, position_embeddings=(cos, sin))
            for hook in hooks:
                hook.remove()
        return model.lm_head(lm.norm(x))[0, -1]


@pytest.mark.parametrize("mode", ["compact", "keep"])
def test_fastv_prefill_and_cached_decode_match_a_layer_by_layer_restatement(llava, mode):
    ids = torch.tensor([ROWS[0]])
    pixels = images(1, 336, seed=3, dtype=torch.float64)
    policy = vtprune.FastV(k=2, r=0.5, position_mode=mode)
    with torch.no_grad(), vtprune.applied(llava, policy):
        out = llava(input_ids=ids, pixel_values=pixels, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        step = llava(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                     attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long))
    torch.testing.assert_close(out.logits[0, -1], manual_fastv(llava, ids, pixels, 2, 0.5, mode), rtol=0, atol=1e-9)
    torch.testing.assert_close(step.logits[0, -1], manual_fastv(llava, ids, pixels, 2, 0.5, mode, extra=[token]),
                               rtol=0, atol=1e-9)
    other = "keep" if mode == "compact" else "compact"
    assert not torch.allclose(out.logits[0, -1], manual_fastv(llava, ids, pixels, 2, 0.5, other))


def test_sdpa_and_eager_agree():
    ids, mask = batch(ROWS)
    pixels = images(2, 336, seed=4, dtype=torch.float64)
    results = []
    for attn in ("sdpa", "eager"):
        model = build_tiny_llava(vision_layers=2, image_size=336, patch_size=14, text_layers=16, attn=attn,
                                 dtype=torch.float64)
        with vtprune.applied(model, vtprune.TransPrune()):
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            results.append((generate(model, ids, mask, pixels, steps=10), logits))
    assert torch.equal(results[0][0], results[1][0])
    # HF's eager attention takes its softmax in float32 even for float64 models
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-6)


def test_bf16_and_sampling_run_and_keep_the_prompt(llava):
    model = copy.deepcopy(llava).to(torch.bfloat16)
    ids, mask = batch(ROWS)
    pixels = images(2, 336, seed=5).to(torch.bfloat16)
    with vtprune.applied(model, vtprune.PDrop()) as handle:
        out = generate(model, ids, mask, pixels, steps=20)
        torch.manual_seed(0)
        sampled = generate(model, ids, mask, pixels, steps=20, do_sample=True, top_k=5)
    assert torch.equal(out[:, :ids.shape[1]], ids) and torch.equal(sampled[:, :ids.shape[1]], ids)
    assert out.shape[1] == sampled.shape[1] == ids.shape[1] + 20 and handle.trace.final_tokens("llm") == 72


def test_labels_follow_the_kept_tokens(llava):
    ids = torch.tensor([ROWS[0]])
    labels = ids.masked_fill(ids == IMAGE, -100)
    pixels = images(1, 336, seed=6, dtype=torch.float64)
    with torch.no_grad(), vtprune.applied(llava, vtprune.FastV(r=0.5)):
        out = llava(input_ids=ids, pixel_values=pixels, labels=labels)
    # visual positions carry -100, so the kept labels are the prompt's with a visual block of 288
    kept = torch.tensor([[1, 2, 3] + [-100] * 288 + [4, 5, 6]])
    assert out.logits.shape[1] == kept.shape[1]
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), kept[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-6)  # HF takes the loss in float32


def test_composes_with_a_projector_policy_and_remove_restores(llava):
    ids, mask = batch(ROWS[:1])
    pixels = images(1, 336, seed=7, dtype=torch.float64)
    with torch.no_grad():
        before = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    handle = vtprune.apply(llava, [vtprune.VisionZip(keep=192), vtprune.TransPrune()])
    with torch.no_grad():
        out = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert handle.trace.tokens("projector") == [192]
    # TransPrune's ratios apply to the visual tokens that reach the language model
    assert handle.trace.tokens_in("llm") == [192] * 7 + [168] * 2 + [120] * 3 + [24] * 20
    assert out.logits.shape[1] == ids.shape[1] - 576 + handle.trace.final_tokens("llm")
    handle.remove()
    with torch.no_grad():
        assert torch.equal(llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, before)


@pytest.mark.parametrize("text_model", ["mistral", "qwen2"])
def test_mistral_and_qwen2_decoders(text_model):
    model = build_tiny_llava(vision_layers=2, image_size=336, patch_size=14, text_layers=4, text_model=text_model,
                             dtype=torch.float64)
    ids, mask = batch(ROWS)
    pixels = images(2, 336, seed=8, dtype=torch.float64)
    with vtprune.applied(model, vtprune.FastV(k=2, r=0.75)) as handle:
        together = generate(model, ids, mask, pixels, steps=10)
        assert handle.trace.tokens_in("llm") == [576, 576, 144, 144]
        for i, row in enumerate(ROWS):
            alone = generate(model, torch.tensor([row]), None, pixels[i:i + 1], steps=10)
            assert torch.equal(together[i, -10:], alone[0, -10:])


def test_the_llm_site_refuses_attention_kernels_that_cannot_take_its_mask():
    from conftest import build_tiny_llava

    model = build_tiny_llava()
    model.config.text_config._attn_implementation = "flash_attention_2"  # the language model's own config
    with pytest.raises(ValueError, match="language model uses attn_implementation='flash_attention_2'.*'sdpa'"):
        vtprune.apply(model, vtprune.FastV(k=1, r=0.5))
    assert vtprune.handle_of(model) is None
    vtprune.apply(model, vtprune.RandomKeep(keep=4)).remove()  # the projector site passes no mask: accepted


def test_rebuilt_layer_arguments_follow_the_layer_device():
    """Under accelerate's device_map a later decoder layer may sit on another GPU: the mask, positions and
    RoPE vtprune rebuilds after a cut are moved to the device of the hidden states that layer gets. (One
    device here, so the move is exercised on the meta device.)"""
    from vtprune.adapters.hf_llm import _on_device

    cos, sin, mask = torch.ones(1, 3, 4), torch.zeros(1, 3, 4), torch.zeros(1, 1, 3, 3)
    moved = _on_device({"attention_mask": mask, "position_embeddings": (cos, sin), "use_cache": True},
                       torch.device("meta"))
    assert moved["attention_mask"].device.type == "meta" and moved["use_cache"] is True
    assert [item.device.type for item in moved["position_embeddings"]] == ["meta", "meta"]
    same = _on_device({"attention_mask": mask}, mask.device)
    assert same["attention_mask"] is mask  # already there: not copied
