"""A model dispatched by accelerate (CPU offload, disk offload) runs with vtprune applied and gives the same
outputs as the same policies on the undispatched model; remove() leaves accelerate's hooks working."""
import copy

import pytest
import torch

import vtprune
from conftest import build_tiny_llava
from test_hf_llava import batch, images, prompt

POLICIES = [vtprune.ToMe(r=8), vtprune.RandomKeep(keep=200), vtprune.FastV(k=2, r=0.5)]


def run(model, ids, mask, pixels):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        generated = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8,
                                   do_sample=False)
    return logits, generated


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_dispatched_model_matches_the_plain_one(offload, tmp_path):
    from accelerate import cpu_offload, disk_offload

    model = build_tiny_llava(vision_layers=3, image_size=336, patch_size=14, text_layers=4, dtype=torch.float64)
    ids, mask = batch([prompt([1, 2], 576, [3, 4]), prompt([5], 576, [6, 7, 8])])
    pixels = images(2, 336, seed=1, dtype=torch.float64)
    plain_before = run(model, ids, mask, pixels)
    with vtprune.applied(model, POLICIES) as handle:
        expected = run(model, ids, mask, pixels)
        expected_trace = handle.trace

    dispatched = copy.deepcopy(model)
    if offload == "cpu":
        cpu_offload(dispatched, execution_device=torch.device("cpu"))
    else:
        disk_offload(dispatched, str(tmp_path), execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in dispatched.parameters())  # weights really offloaded
    with vtprune.applied(dispatched, POLICIES) as handle:
        logits, generated = run(dispatched, ids, mask, pixels)
        assert handle.trace == expected_trace
    torch.testing.assert_close(logits, expected[0], rtol=0, atol=1e-10)
    assert torch.equal(generated, expected[1])
    after = run(dispatched, ids, mask, pixels)  # removed: accelerate's hooks still in place and working
    torch.testing.assert_close(after[0], plain_before[0], rtol=0, atol=1e-10)
    assert torch.equal(after[1], plain_before[1])
