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
    # more merging, less agreement with the unpruned model
    agreement = {label: entry["metrics"]["agreement"] for label, entry in vit_results.items()}
    assert agreement["tome:r=8"] > agreement["tome:r=24"]
    assert agreement["pitome:ratio=0.95"] > agreement["pitome:ratio=0.85"]


MINI_VIT_KEPT = {}  # filled from the measured values below
