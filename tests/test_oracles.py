"""The independent oracles in ``tests/oracles.py`` reproduce the official ToMe / PiToMe golden fixtures.

Fixtures were produced by ``tests/fixtures/make_golden.py`` from the official code (see
``tests/fixtures/README.md``); everything here is float64 on CPU, so merge decisions must agree
exactly and the logits to round-off.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
ATOL = 1e-10


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


oracles = _load("_vtprune_test_oracles", TESTS / "oracles.py")
seeded = _load("_vtprune_test_seeded", TESTS / "seeded.py")

TOME = torch.load(FIXTURES / "tome_golden.pt", weights_only=True)
PITOME = torch.load(FIXTURES / "pitome_golden.pt", weights_only=True)


def _case_id(case: dict) -> str:
    knob = case["r"] if "r" in case else case["ratio"]
    kwargs = "-".join(f"{k}={v}" for k, v in case["model_kwargs"].items())
    variant = case.get("variant", "")
    variant = "" if variant == "official" else variant
    return "-".join(filter(None, [case["model"], kwargs, f"{knob}", "prop" if case["prop_attn"] else "noprop",
                                  variant]))


@functools.lru_cache(maxsize=None)
def _model(name: str, kwargs_items: tuple):
    model = timm.create_model(name, pretrained=False, **dict(kwargs_items))
    seeded.seeded_init_(model, seed=0)
    return model.double().eval()


def model_for(case: dict):
    return _model(case["model"], tuple(sorted(case["model_kwargs"].items())))


@functools.lru_cache(maxsize=None)
def _images():
    return seeded.seeded_images(batch=4, size=224, seed=1, dtype=torch.float64)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """One intra-op thread: these small fp64 forwards get much slower when threads oversubscribe a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _n0(case: dict) -> int:
    return 196 + int(case["model_kwargs"].get("class_token", True)) + int("distilled" in case["model"])


def _assert_matches(out: dict, case: dict) -> None:
    assert out["tokens_per_layer"] == case["tokens_per_layer"]
    assert out["size"].dtype == torch.float64
    assert torch.equal(out["size"], case["size"]), "token sizes differ"
    assert torch.equal(out["assignment"], case["assignment"]), "token assignment (source) differs"
    torch.testing.assert_close(out["logits"], case["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["pre_logits"], case["pre_logits"], atol=ATOL, rtol=0)
    if case["features"] is not None:
        torch.testing.assert_close(out["features"], case["features"], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------
# fixture sanity
# --------------------------------------------------------------------------------------------------
def test_fixture_meta():
    assert TOME["meta"]["source"] == "facebookresearch/ToMe@af95e4b"
    assert PITOME["meta"]["source"] == "hchautran/PiToMe@550b5de"
    assert PITOME["meta"]["timm"] == "0.4.12"
    for golden in (TOME, PITOME):
        meta = golden["meta"]
        assert (meta["weights_seed"], meta["images_seed"], meta["batch"], meta["dtype"]) == (0, 1, 4, "float64")
    assert len(TOME["cases"]) == 17
    assert [(c["ratio"], c["variant"]) for c in PITOME["cases"]] == [
        (1.0, "official"), (0.975, "official"), (0.95, "official"), (0.925, "official"), (0.9, "official"),
        (0.8, "official")]
    assert [(c["ratio"], c["variant"]) for c in PITOME["variant_cases"]] == [(0.9, "all_bsm"), (0.9, "all_pure")]
    official_map = [True] * 6 + [False] * 6
    assert [c["use_bsm_pitome"] for c in PITOME["cases"]] == [official_map] * 6
    assert [c["use_bsm_pitome"] for c in PITOME["variant_cases"]] == [[True] * 12, [False] * 12]
    assert PITOME["meta"]["margins"] == oracles.pitome_margins(12)


@pytest.mark.parametrize("case", TOME["cases"] + PITOME["cases"] + PITOME["variant_cases"], ids=_case_id)
def test_fixture_self_consistent(case):
    n0 = _n0(case)
    size, assignment = case["size"], case["assignment"]
    assert len(case["tokens_per_layer"]) == 12
    assert size.shape == (4, case["tokens_per_layer"][-1])
    assert assignment.shape == (4, n0) and assignment.dtype == torch.int64
    assert torch.all(size.sum(1) == n0)
    counts = torch.stack([torch.bincount(a, minlength=size.shape[1]) for a in assignment])
    assert torch.equal(counts.to(size.dtype), size)
    assert case["logits"].shape == (4, 1000) and case["logits"].dtype == torch.float64
    assert (case["features"] is not None) == (case["model_kwargs"].get("class_token", True) is False)


def test_fixture_token_counts_match_notes():
    final = {(c["model"], repr(c["model_kwargs"]), repr(c["r"]), c["prop_attn"]): c["tokens_per_layer"][-1]
             for c in TOME["cases"]}
    deit, dist, nocls = "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", repr(
        {"class_token": False, "global_pool": "avg"})
    expected = {
        (deit, "{}", "0", True): 197, (deit, "{}", "8", True): 101, (deit, "{}", "13", True): 41,
        (deit, "{}", "16", True): 11, (deit, "{}", "(16, -1.0)", True): 10, (deit, "{}", "(8, -1.0)", True): 106,
        (deit, "{}", repr([25] * 8), True): 13, (deit, "{}", "100", True): 2, (deit, "{}", "16", False): 11,
        (dist, "{}", "0", True): 198, (dist, "{}", "8", True): 102, (dist, "{}", "13", True): 42,
        (dist, "{}", "16", True): 12, (dist, "{}", "(16, -1.0)", True): 11, (dist, "{}", "100", True): 3,
        (deit, nocls, "8", True): 100, (deit, nocls, "16", True): 10,
    }
    assert final == expected
    pitome = {c["ratio"]: (c["tokens_per_layer"][-1], round(c["flops"], 4)) for c in PITOME["cases"]}
    assert pitome == {1.0: (197, 1.2246), 0.975: (151, 1.0715), 0.95: (111, 0.9264),
                      0.925: (82, 0.8125), 0.9: (60, 0.7116), 0.8: (17, 0.4559)}


# --------------------------------------------------------------------------------------------------
# oracles vs official
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", TOME["cases"], ids=_case_id)
def test_tome_oracle_matches_official(case):
    out = oracles.tome_forward(model_for(case), _images(), case["r"], prop_attn=case["prop_attn"],
                               trace_source=True)
    _assert_matches(out, case)


@pytest.mark.parametrize("case", PITOME["cases"] + PITOME["variant_cases"], ids=_case_id)
def test_pitome_oracle_matches_official(case):
    out = oracles.pitome_forward(model_for(case), _images(), case["ratio"], bsm_layers=case["use_bsm_pitome"])
    _assert_matches(out, case)
    assert out["flops"] == pytest.approx(case["flops"], abs=1e-12)


def test_tome_schedule():
    assert oracles.tome_schedule(12, (16, -1.0)) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert oracles.tome_schedule(12, 8) == [8] * 12
    assert oracles.tome_schedule(12, [25] * 8) == [25] * 8 + [0] * 4
    assert oracles.tome_schedule(3, [1, 2, 3, 4]) == [1, 2, 3]


def test_pitome_margins():
    assert oracles.pitome_margins(12) == pytest.approx([0.75 - 0.0625 * layer for layer in range(12)], abs=1e-15)


# --------------------------------------------------------------------------------------------------
# cross-version agreement and negative controls (the comparisons above are discriminative)
# --------------------------------------------------------------------------------------------------
def test_unpatched_timm_versions_agree():
    """Same seeded weights: unpatched current timm vs the unpatched timm 0.4.12 logits in the PiToMe fixture."""
    with torch.no_grad():
        logits = _model("deit_tiny_patch16_224", ())(_images())
    torch.testing.assert_close(logits, PITOME["meta"]["unpatched_logits"], atol=1e-12, rtol=0)
    tome_r0 = next(c for c in TOME["cases"] if c["model"] == "deit_tiny_patch16_224" and c["r"] == 0)
    torch.testing.assert_close(logits, tome_r0["logits"], atol=1e-12, rtol=0)


def test_prop_attn_is_visible_in_logits():
    case = next(c for c in TOME["cases"] if c["model"] == "deit_tiny_patch16_224" and c["r"] == 16
                and c["prop_attn"])
    out = oracles.tome_forward(model_for(case), _images(), 16, prop_attn=False)
    assert (out["logits"] - case["logits"]).abs().max() > 1e-6


def test_pitome_default_variant_map_is_official():
    """Without ``bsm_layers`` the oracle uses the deit schedule (BSM-PiToMe in the first ceil(L/2) layers)."""
    case = next(c for c in PITOME["cases"] if c["ratio"] == 0.9 and c["variant"] == "official")
    out = oracles.pitome_forward(model_for(case), _images(), 0.9)
    assert torch.equal(out["assignment"], case["assignment"])


@pytest.mark.parametrize("variant", ["all_bsm", "all_pure"])
def test_pitome_variant_is_visible_in_assignment(variant):
    official = next(c for c in PITOME["cases"] if c["ratio"] == 0.9 and c["variant"] == "official")
    other = next(c for c in PITOME["variant_cases"] if c["ratio"] == 0.9 and c["variant"] == variant)
    assert other["tokens_per_layer"] == official["tokens_per_layer"]
    assert not torch.equal(other["assignment"], official["assignment"])
