"""The public API: apply / remove / applied / trace / inspect / registry, on real timm models."""
import copy

import pytest
import torch
from torch import nn

import vtprune
from vtprune.adapters import UnsupportedModelError

from conftest import small_vit


def snapshot(model: nn.Module):
    """Everything that must be identical after remove(): classes, instance dicts, hooks, tensors."""
    modules = {}
    for name, module in model.named_modules():
        modules[name] = (
            type(module),
            sorted(module.__dict__.keys()),
            len(module._forward_hooks), len(module._forward_pre_hooks),
            len(getattr(module, "_forward_hooks_with_kwargs", {})),
        )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return modules, state


def assert_same_snapshot(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert torch.equal(a[1][key], b[1][key]), key


@pytest.mark.parametrize("policy", [vtprune.ToMe(r=2), "pitome:ratio=0.8", "tome:r=(2,-1)"])
def test_remove_restores_exactly(policy, images64):
    model = small_vit()
    pristine = copy.deepcopy(model)
    before = snapshot(model)
    handle = vtprune.apply(model, policy)
    with torch.no_grad():
        merged = model(images64)
        assert handle.trace.final_tokens() < 17
    assert handle.remove() is model
    assert_same_snapshot(before, snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(images64), pristine(images64))
        assert torch.equal(model.forward_features(images64), pristine.forward_features(images64))
    assert not torch.equal(merged, pristine(images64))
    assert vtprune.handle_of(model) is None
    assert handle.remove() is model  # a second remove changes nothing
    assert_same_snapshot(before, snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(images64), pristine(images64))


def test_vtprune_remove_by_model(images64):
    model = small_vit()
    pristine = copy.deepcopy(model)
    vtprune.apply(model, "tome", r=3)
    assert vtprune.remove(model) is model
    with torch.no_grad():
        assert torch.equal(model(images64), pristine(images64))
    before = snapshot(model)
    assert vtprune.remove(model) is model  # not patched: changes nothing
    assert_same_snapshot(before, snapshot(model))
    assert vtprune.handle_of(model) is None
    with torch.no_grad():
        assert torch.equal(model(images64), pristine(images64))


def test_apply_accepts_object_name_spec_dict_and_list():
    model = small_vit()
    forms = [vtprune.ToMe(r=3), ("tome", {"r": 3}), "tome:r=3", {"policy": "tome", "r": 3}, [vtprune.ToMe(r=3)]]
    for form in forms:
        if isinstance(form, tuple):
            handle = vtprune.apply(model, form[0], **form[1])
        else:
            handle = vtprune.apply(model, form)
        assert handle.policies == (vtprune.ToMe(r=3),)
        handle.remove()


def test_already_patched_raises_with_fix_or_replaces(images64):
    model = small_vit()
    first = vtprune.apply(model, vtprune.ToMe(r=1))
    with pytest.raises(vtprune.AlreadyPatchedError, match="vtprune.remove\\(model\\).*replace=True"):
        vtprune.apply(model, vtprune.ToMe(r=4))
    second = vtprune.apply(model, vtprune.ToMe(r=4), replace=True)
    assert first.removed and not second.removed
    with torch.no_grad():
        model(images64)
    assert second.trace.tokens() == [13, 9, 5, 3]  # r=4 on 17 tokens, capped at (N-1)//2
    second.remove()


def test_applied_removes_on_exception(images64):
    model = small_vit()
    pristine = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="boom"):
        with vtprune.applied(model, "tome:r=2") as handle:
            with torch.no_grad():
                model(images64)
            assert handle.trace.final_tokens() == 9
            raise RuntimeError("boom")
    assert handle.removed and vtprune.handle_of(model) is None
    with torch.no_grad():
        assert torch.equal(model(images64), pristine(images64))


def test_trace_and_last_trace(images64):
    model = small_vit()
    with pytest.raises(ValueError, match="not patched"):
        vtprune.last_trace(model)
    handle = vtprune.apply(model, vtprune.ToMe(r=2))
    assert handle.trace is None and vtprune.last_trace(model) is None
    with torch.no_grad():
        model(images64)
    trace = vtprune.last_trace(model)
    assert trace == handle.trace
    assert trace.batch_size == 4
    assert trace.tokens_in() == [17, 15, 13, 11]
    assert trace.tokens() == [15, 13, 11, 9]
    assert [layer.reduced for layer in trace.layers("vision")] == ["mid"] * 4
    assert "17->15" in str(trace)
    assert trace.to_dict()["sites"]["vision"][0]["tokens_out"] == 15
    with pytest.raises(KeyError, match="llm"):
        trace.layers("llm")
    handle.remove()


def test_instances_of_the_same_class_stay_independent(images64):
    a, b = small_vit(), small_vit()
    untouched = small_vit()
    ha = vtprune.apply(a, vtprune.ToMe(r=1))
    hb = vtprune.apply(b, vtprune.PiToMe(ratio=0.7))
    with torch.no_grad():
        a(images64)
        b(images64)
        reference = untouched(images64)
    assert ha.trace.tokens() == [16, 15, 14, 13]
    assert hb.trace.tokens() == [13, 10, 8, 6]
    assert "forward" not in untouched.__dict__ and "forward" not in untouched.blocks[0].__dict__
    assert type(a) is type(untouched) and type(a.blocks[0]) is type(untouched.blocks[0])
    ha.remove()
    with torch.no_grad():
        assert torch.equal(a(images64), reference)
        b(images64)
    assert hb.trace.tokens() == [13, 10, 8, 6]  # b is still patched
    hb.remove()


def test_inspect_reports_sites_and_rejects_unknown_models():
    model = small_vit()
    report = vtprune.inspect(model)
    assert report.adapter == "timm-vit"
    assert report.sites == {"vision": ("blocks.0", "blocks.1", "blocks.2", "blocks.3")}
    assert report.protected == ("cls",)
    assert "blocks.0" in str(report)
    with pytest.raises(UnsupportedModelError, match="timm-vit: timm VisionTransformer"):
        vtprune.inspect(nn.Linear(3, 3))
    with pytest.raises(UnsupportedModelError, match="Supported families"):
        vtprune.apply(nn.Sequential(nn.Linear(3, 3)), "tome:r=1")
    with pytest.raises(UnsupportedModelError, match="torch.nn.Module"):
        vtprune.inspect("vit_base_patch16_224")


def test_policy_site_rules():
    model = small_vit()
    with pytest.raises(ValueError, match="at most one policy per site"):
        vtprune.apply(model, [vtprune.ToMe(r=1), vtprune.PiToMe(ratio=0.9)])
    assert vtprune.handle_of(model) is None


def test_registry_lists_policies():
    registry = vtprune.policies()
    assert registry["tome"] is vtprune.ToMe and registry["pitome"] is vtprune.PiToMe
    assert list(registry) == sorted(registry)
    with pytest.raises(ValueError, match="unknown policy 'tomme'; registered policies: fastv, flowcut, flowcut_llm, pdrop, pitome, pool2d, randomkeep, tome, transprune, visionzip"):
        vtprune.apply(small_vit(), "tomme:r=2")


def test_blocks_called_outside_an_entry_point_run_unmerged(images64):
    model = small_vit()
    pristine = copy.deepcopy(model)
    handle = vtprune.apply(model, vtprune.ToMe(r=4))
    tokens = torch.randn(2, 17, 64)
    with torch.no_grad():
        assert torch.equal(model.blocks[0](tokens), pristine.blocks[0](tokens))
    handle.remove()


def test_deepcopy_of_a_patched_model_is_unpatched_and_pickle_is_refused(images64):
    import pickle

    model = small_vit()
    pristine = copy.deepcopy(model)
    handle = vtprune.apply(model, vtprune.ToMe(r=2))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(images64), pristine(images64))
        assert torch.equal(clone.forward_features(images64), pristine.forward_features(images64))
        clone_handle = vtprune.apply(clone, vtprune.ToMe(r=2))  # the copy can be patched again
        clone(images64)
        assert clone_handle.trace.final_tokens() == 9
        assert handle.trace is None  # the original's trace is its own
    with pytest.raises(TypeError, match="cannot be pickled; call handle.remove"):
        pickle.dumps(model)
    handle.remove()
    clone_handle.remove()
    with torch.no_grad():
        assert torch.equal(pickle.loads(pickle.dumps(model))(images64), model(images64))


def test_concurrent_calls_in_threads_keep_their_own_state():
    import threading

    model = small_vit(dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(n, 3, 64, 64, generator=generator, dtype=torch.float64) for n in (1, 2, 3, 4)]
    with vtprune.applied(model, vtprune.ToMe(r=2)), torch.no_grad():
        expected = [model(x) for x in inputs]
        results = {}

        def work(index):
            for _ in range(5):
                results[index] = model(inputs[index])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for index in range(4):
        torch.testing.assert_close(results[index], expected[index], atol=1e-12, rtol=0)


def test_forward_head_after_forward_features_in_interleaved_threads():
    """Each thread's forward_head pools its own forward_features output size-weighted, whatever another
    thread ran in between."""
    import threading

    model = small_vit(dtype=torch.float64, global_pool="avg")
    generator = torch.Generator().manual_seed(5)
    inputs = [torch.randn(2, 3, 64, 64, generator=generator, dtype=torch.float64) for _ in range(2)]
    both_have_features, results, errors = threading.Barrier(2), {}, []
    with vtprune.applied(model, vtprune.ToMe(r=2)), torch.no_grad():
        expected = [model(x) for x in inputs]

        def work(index):
            try:
                if index == 1:
                    both_have_features.wait()  # thread 0's features first, then thread 1's
                features = model.forward_features(inputs[index])
                if index == 0:
                    both_have_features.wait()
                    first_done.wait()
                else:
                    first_done.set()
                results[index] = model.forward_head(features)
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

        first_done = threading.Event()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    for index in range(2):
        torch.testing.assert_close(results[index], expected[index], atol=1e-12, rtol=0)


def test_a_dropped_patched_model_is_freed(images64):
    """vtprune keeps no global reference to what it patched: a model dropped while patched is collected."""
    import gc
    import weakref

    model = small_vit()
    vtprune.apply(model, vtprune.ToMe(r=2))
    with torch.no_grad():
        model(images64)
    clone = copy.deepcopy(model)
    assert vtprune.handle_of(clone) is None and vtprune.handle_of(model) is not None
    references = weakref.ref(model), weakref.ref(clone)
    del model, clone
    gc.collect()
    assert [reference() for reference in references] == [None, None]
