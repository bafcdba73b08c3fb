"""Policy regression checks on vtprune-mini: the shipped mini-vit and mini-llava reach their accuracy, and
every policy keeps a stated share of it at a moderate budget. Thresholds are the measured values of the
shipped models (docs/mini.md) with a margin; where a reference method does not beat RandomKeep here, the
test states it instead of asserting it (docs/mini.md reports it)."""
import pytest

from vtprune.evals.runner import EvalConfig, run

VIT_POLICIES = ("tome:r=8", "tome:r=16", "tome:r=24", "pitome:ratio=0.95", "pitome:ratio=0.9", "pitome:ratio=0.85")


@pytest.fixture(scope="module")
def vit_results(tmp_path_factory):
    summary = run(EvalConfig(model="mini:vit", task="classification", data="mini", batch_size=250,
                             out=str(tmp_path_factory.mktemp("mini-vit")), policies=VIT_POLICIES), progress=False)
    return {entry["configuration"]: entry for entry in summary["results"]}


def test_mini_vit_reaches_its_accuracy(vit_results):
    top1 = vit_results["none (unpruned)"]["metrics"]["top1"]
    assert top1 >= 0.88  # the figure; measured 0.8945 on the shipped 2 000 (0.8936 on the test split)


def test_merging_keeps_most_of_mini_vits_accuracy(vit_results):
    kept = {label: entry["percent_of_unpruned"]["top1"] for label, entry in vit_results.items()}
    tokens = {label: entry["tokens_final"] for label, entry in vit_results.items()}
    assert [tokens[f"tome:r={r}"] for r in (8, 16, 24)] == [165, 133, 101]
    for label, floor in MINI_VIT_KEPT.items():
        assert kept[label] >= floor, (label, kept[label])
    # PiToMe's paper has it ahead of ToMe at the same FLOPs; on mini-vit ToMe is ahead at about the same
    # token count (88.20 % at 133 tokens against PiToMe's 87.70 % at 131; docs/mini.md), so no order is asserted
    # more merging, less agreement with the unpruned model
    agreement = {label: entry["metrics"]["agreement"] for label, entry in vit_results.items()}
    assert agreement["tome:r=8"] > agreement["tome:r=24"]
    assert agreement["pitome:ratio=0.95"] > agreement["pitome:ratio=0.85"]


# % of unpruned top-1 kept; measured 99.4 / 98.6 / 97.8 (ToMe) and 98.9 / 98.0 / 96.9 (PiToMe)
MINI_VIT_KEPT = {"tome:r=8": 98.5, "tome:r=16": 97.5, "tome:r=24": 96.5,
                 "pitome:ratio=0.95": 98.0, "pitome:ratio=0.9": 96.5, "pitome:ratio=0.85": 95.5}


BUDGET_49 = ("tome:r=37", "pitome:ratio=0.71", "flowcut:keep=49", "visionzip:keep=49", "randomkeep:keep=49",
             "pool2d:keep=49", "fastv:k=1,r=0.75", "pdrop:layers=(1,2,3),lam=0.63",
             "transprune:layers=(1,2,3),ratios=(0.5,0.25,0.25),accumulate=(1,2,3)")


@pytest.fixture(scope="module")
def llava_results(tmp_path_factory):
    """The 600 held-out grid questions, unpruned and with every policy at 49 of the 196 visual tokens."""
    from vtprune.evals.runner import canonical

    summary = run(EvalConfig(model="mini:llava", task="vqa", data="mini", batch_size=100, baselines=False,
                             out=str(tmp_path_factory.mktemp("mini-llava")), policies=BUDGET_49), progress=False)
    results = {entry["configuration"]: entry["metrics"]["exact"] for entry in summary["results"]}
    return {spec: results[canonical(spec)] for spec in BUDGET_49} | {"unpruned": results["none (unpruned)"]}


def test_mini_llava_reaches_its_measured_accuracy(llava_results):
    # measured 0.8400; the target of 0.90 is not reached yet (docs/mini.md), so this guards the
    # shipped model against regressions only
    assert llava_results["unpruned"] >= 0.82


LLM_SITE = ("fastv:k=1,r=0.75", "pdrop:layers=(1,2,3),lam=0.63",
            "transprune:layers=(1,2,3),ratios=(0.5,0.25,0.25),accumulate=(1,2,3)")


def test_every_policy_keeps_its_measured_share_at_49_tokens(llava_results):
    """Measured % of unpruned: the policies inside the decoder keep 72.8 (FastV), 78.8 (PDrop) and 73.6
    (TransPrune); those before it keep 35.5 (VisionZip) to 64.9 (Pool2d) (mini-llava's decoder was trained
    on all 196 tokens in their grid order only)."""
    kept = {spec: 100 * value / llava_results["unpruned"] for spec, value in llava_results.items()}
    for spec in BUDGET_49:
        assert kept[spec] >= (65 if spec in LLM_SITE else 30), (spec, kept[spec])


def test_the_reference_methods_against_randomkeep(llava_results):
    """FastV, PDrop and TransPrune beat RandomKeep at 49 visual tokens, as their papers report (61.2, 66.2,
    61.8 % against 48.8 %; they also see all 196 tokens in the layers before their cuts). FlowCut (38.3 %),
    VisionZip (29.8 %), ToMe (45.0 %) and PiToMe (44.0 %) do not beat RandomKeep on mini-llava, unlike in
    their papers; this is reported in docs/mini.md and not asserted either way."""
    for spec in LLM_SITE:
        assert llava_results[spec] >= llava_results["randomkeep:keep=49"] + 0.08, spec
