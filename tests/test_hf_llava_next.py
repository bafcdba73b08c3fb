"""The hf-llava adapter on LLaVA-NeXT (anyres): every crop reduced on its own, reduced crops packed in raster
order over the unpadded tile grid, prompt shortened per image, generate unchanged."""
import pytest
import torch

import vtprune
from conftest import build_tiny_llava_next
from test_hf_llava import IMAGE, batch

SIZES = torch.tensor([[20, 64], [64, 20]])  # 1x2 and 2x1 tiles: base + 2 crops each; unpadding halves the tiles


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return build_tiny_llava_next()


def stock_lengths(model, pixels):
    with torch.no_grad():
        return [t.shape[0] for t in model.model.get_image_features(pixel_values=pixels, image_sizes=SIZES).pooler_output]


def prompts(model, pixels):
    lengths = stock_lengths(model, pixels)
    return batch([[1, 2, 3] + [IMAGE] * lengths[0] + [4, 5], [6] + [IMAGE] * lengths[1] + [7, 8, 9, 10]])


def expected_packing(model, pixels, keep_positions, pool: int = 1):
    """What the LLM should get when ``keep_positions[c]`` (sorted patch positions) are kept in crop ``c``:
    the host's own packing of a feature that carries each token's identity decides the tile order and the
    unpadding; the base crop comes first, no newline tokens."""
    inner = model.model
    with torch.no_grad():
        tower = inner.vision_tower(pixel_values=torch.cat([pixels[0, :3], pixels[1, :3]]), output_hidden_states=True)
        hidden = tower.hidden_states[-2][:, 1:]  # [6 crops, 16 patches, D]
        if pool > 1:  # Pool2d: each pool x pool window's mean, at the window's first cell
            grid = hidden.view(6, 4, 4, -1).permute(0, 3, 1, 2)
            means = torch.nn.functional.avg_pool2d(grid, pool)
            hidden = torch.nn.functional.interpolate(means, scale_factor=pool).permute(0, 2, 3, 1).reshape(6, 16, -1)
        projected = inner.multi_modal_projector(hidden)
    ids = torch.arange(6 * 16, dtype=torch.float64).view(6, 16, 1)
    order, _ = inner.pack_image_features(list(ids.split(3)), SIZES, "default", image_newline=None)
    expected = []
    for image, sequence in enumerate(order):
        crops = range(3 * image, 3 * image + 3)
        kept = {crop * 16 + p for crop in crops for p in keep_positions[crop]}
        base = [3 * image * 16 + p for p in keep_positions[3 * image]]
        tiles = [int(i) for i in sequence[16:, 0] if int(i) in kept]
        expected.append(projected.flatten(0, 1)[base + tiles])
    return expected


@pytest.mark.parametrize("policy", [vtprune.RandomKeep(keep=5), vtprune.Pool2d(keep=4)], ids=str)
def test_reduced_crops_are_packed_in_raster_order_over_the_unpadded_grid(model, policy):
    pixels = images()
    with torch.no_grad(), vtprune.applied(model, policy) as handle:
        packed = model.model.get_image_features(pixel_values=pixels, image_sizes=SIZES).pooler_output
    positions = handle.trace.positions
    assert len(positions) == 6  # one row per crop: base, tile, tile for each image
    if policy.name == "pool2d":  # 2 x 2 windows of the 4 x 4 grid, each at its first cell
        assert positions == ((0, 2, 8, 10),) * 6
    expected = expected_packing(model, pixels, positions, pool=2 if policy.name == "pool2d" else 1)
    assert [item.shape for item in packed] == [item.shape for item in expected]
    for got, want in zip(packed, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    lengths = [item.shape[0] for item in packed]
    assert lengths[0] < 3 * len(positions[0]) and lengths[0] >= len(positions[0])  # unpadding dropped some


@pytest.mark.parametrize("policy", [vtprune.RandomKeep(keep=5), vtprune.VisionZip(dominant=4, contextual=2),
                                    vtprune.Pool2d(keep=4), vtprune.FlowCut(keep=8)], ids=str)
def test_generate_and_forward_on_two_images_with_crops(model, policy):
    pixels = images(1)
    ids, mask = prompts(model, pixels)
    with torch.no_grad(), vtprune.applied(model, policy) as handle:
        packed = list(model.model.get_image_features(pixel_values=pixels, image_sizes=SIZES).pooler_output)
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=SIZES,
                             max_new_tokens=4, do_sample=False)
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=SIZES,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits  # recounted over the short prompt
    assert torch.equal(out[:, :ids.shape[1]], ids)
    if policy.name == "flowcut":
        assert handle.trace.tokens("vision")[-1] == 4 + 1  # keep // 2 per crop in the encoder (+ CLS)
        assert handle.trace.visual_tokens == (8, 8)  # then at most keep per image after packing
    # the unpatched model fed the packed tokens with a prompt of as many placeholders
    lengths = [item.shape[0] for item in packed]
    short, short_mask = batch([[1, 2, 3] + [IMAGE] * lengths[0] + [4, 5], [6] + [IMAGE] * lengths[1] + [7, 8, 9, 10]])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(short)
        embeds = embeds.masked_scatter((short == IMAGE).unsqueeze(-1), torch.cat(packed))
        positions = (short_mask.cumsum(-1) - 1).clamp(min=0)
        expected = model(inputs_embeds=embeds, attention_mask=short_mask, position_ids=positions).logits
    valid = short_mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid], rtol=0, atol=1e-10)


def test_keep_all_is_the_unpatched_model(model):
    pixels = images(2)
    ids, mask = prompts(model, pixels)
    with torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=SIZES,
                                   max_new_tokens=4, do_sample=False)
        with vtprune.applied(model, vtprune.RandomKeep(keep=16)):
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=SIZES,
                                 max_new_tokens=4, do_sample=False)
    assert torch.equal(out, reference)


def test_inspect_names_the_packing(model):
    report = vtprune.inspect(model)
    assert report.adapter == "hf-llava" and any("LLaVA-NeXT" in note for note in report.notes)


def test_flowcut_two_stages():
    """Stage 1 keeps keep // 2 per crop in the encoder; stage 2 cuts to keep after decoder layer 1."""
    model = build_tiny_llava_next(text_layers=4)
    pixels = images(3)[:1].expand(2, -1, -1, -1, -1)  # llm-site pruning needs as many visual tokens in every row
    sizes = torch.tensor([[20, 64], [20, 64]])
    with torch.no_grad():
        lengths = [t.shape[0] for t in model.model.get_image_features(pixel_values=pixels, image_sizes=sizes)
                   .pooler_output]
    rows = [[1, 2, 3] + [IMAGE] * lengths[0] + [4, 5], [6] + [IMAGE] * lengths[1] + [7, 8, 9, 10]]
    ids, mask = batch(rows)
    policies = [vtprune.FlowCut(keep=12), vtprune.FlowCutLLM(keep=6)]
    with torch.no_grad(), vtprune.applied(model, policies) as handle:
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes,
                             max_new_tokens=6, do_sample=False)
        trace = handle.trace
        alone = [model.generate(input_ids=torch.tensor([row]), pixel_values=pixels[i:i + 1],
                                image_sizes=sizes[i:i + 1], max_new_tokens=6, do_sample=False)
                 for i, row in enumerate(rows)]
    assert trace.tokens("vision")[-1] == 6 + 1
    packed = trace.visual_tokens
    assert packed[0] == packed[1] > 6  # no per-image cut at packing: stage 2 makes it
    assert trace.tokens_in("llm") == [packed[0]] * 2 + [6] * 2
    assert torch.equal(out[:, :ids.shape[1]], ids)
    for i in range(2):
        assert torch.equal(out[i, -6:], alone[i][0, -6:])


def test_llm_site_refuses_rows_with_different_visual_counts():
    from vtprune.sequence import llm_tokens

    ids, mask = batch([[1] + [IMAGE] * 5 + [2], [3] + [IMAGE] * 4 + [4, 5]])
    with pytest.raises(ValueError, match="same number of visual tokens in every row of a batch; got \\[5, 4\\]"):
        llm_tokens(ids, mask, IMAGE)
