"""`vtprune eval` with no model: the vtprune-mini laboratory (evals/mini/lab.py)."""
import dataclasses
import json
import re

from vtprune import make_policy
from vtprune.evals import cli
from vtprune.evals.mini import lab
from vtprune.evals.runner import canonical


LAB_SUITE = lab.suite


def small_suite(full=False):
    """The laboratory's runs with fewer samples (the classification folders are in class order, so the
    first 40 images are t-shirts)."""
    limits = {"classification": 40, "zeroshot": 40, "vqa": 12}
    return tuple(dataclasses.replace(run, limit=limits[run.task], batch_size=20) for run in LAB_SUITE(full))


def test_every_policy_runs_at_three_budgets_where_it_applies():
    runs = {run.model: run for run in lab.suite()}
    names = lambda run: [make_policy(spec).name for spec in run.policies]  # noqa: E731  (also validates specs)
    for model in ("mini:vit", "mini:clip"):
        assert sorted(set(names(runs[model]))) == ["pitome", "tome"]
        assert all(names(runs[model]).count(name) == 3 for name in ("tome", "pitome"))
    llava = names(runs["mini:llava"])
    assert sorted(set(llava)) == ["fastv", "flowcut", "pdrop", "pitome", "pool2d", "randomkeep", "tome",
                                  "transprune", "visionzip"]
    assert all(llava.count(name) == 3 for name in set(llava) - {"pool2d"})
    assert llava.count("pool2d") == 1  # 49 is the only one of the budgets that tiles the 14 x 14 grid
    assert len(set(map(canonical, runs["mini:llava"].policies))) == len(llava)
    assert {run.limit for run in lab.suite(full=True)} == {None}


def test_vtprune_eval_without_a_model_runs_the_laboratory(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lab, "suite", small_suite)
    out = tmp_path / "lab"
    assert cli.main(["eval", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# vtprune eval: the vtprune-mini laboratory") and "small laboratory" in printed
    record = json.loads((out / "lab.json").read_text())
    assert [run["name"] for run in record["runs"]] == ["vit-classification", "clip-zeroshot", "llava-vqa"]
    for run, expected in zip(record["runs"], small_suite()):
        labels = [entry["configuration"] for entry in run["summary"]["results"]]
        assert labels == ["none (unpruned)", *map(canonical, expected.policies)]
        assert all(entry["samples"] == expected.limit for entry in run["summary"]["results"])
        assert (out / run["name"] / "report.md").exists() and (out / run["name"] / "accuracy_vs_flops.png").exists()
        assert f"## {run['model']} · {run['task']}" in printed
    kinds = record["runs"][2]["by_kind"]["none (unpruned)"]
    assert sorted(kinds) == ["count", "position", "presence"]  # 12 questions, the three kinds in turn
    report = (out / "report.md").read_text()
    assert "| pool2d:keep=49 |" in report and "position %" in report
    assert (out / "lab.png").stat().st_size > 10_000
    # the docs' results page: the report under its own title, every image it links copied beside it
    page = lab.write_results_page(out, tmp_path / "docs").read_text()
    assert page.startswith("# Results: the default `vtprune eval`") and "| pool2d:keep=49 |" in page
    links = re.findall(r"\]\((img/results/[^)]+)\)", page)
    assert "img/results/lab.png" in links and len(links) == 7
    assert all((tmp_path / "docs" / link).is_file() for link in links)
    # a second call resumes: every row is already there, nothing is recomputed, the report is the same
    rows = (out / "llava-vqa" / "results.jsonl").read_text()
    assert cli.main(["eval", "--out", str(out), "--quiet"]) == 0
    assert (out / "llava-vqa" / "results.jsonl").read_text() == rows


def test_laboratory_flags_are_checked(tmp_path, capsys):
    assert cli.main(["eval", "--out", str(tmp_path), "--policies", "tome:r=8", "--quiet"]) == 2
    assert "--policies apply to a run of one model" in capsys.readouterr().err
    assert cli.main(["eval", "--model", "mini:vit", "--task", "classification", "--data", "mini", "--full",
                     "--out", str(tmp_path)]) == 2
    assert "--full applies to the vtprune-mini laboratory" in capsys.readouterr().err


def test_the_laboratory_is_chosen_only_without_model_task_data_or_config():
    from vtprune.evals.eval_cli import is_lab

    parse = cli.build_parser().parse_args
    assert is_lab(parse(["eval"])) and is_lab(parse(["eval", "--full", "--weights", "random", "--out", "x"]))
    for flags in (["--model", "mini:vit"], ["--task", "vqa"], ["--data", "mini"], ["--config", "run.yaml"]):
        assert not is_lab(parse(["eval", *flags]))
