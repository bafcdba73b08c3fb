"""The speed benchmark: its analytic MAC count and the structure of its output (no timing assertions)."""
from __future__ import annotations

import json

import pytest

from vtprune.evals import bench, cli


def _tome_tokens(num_tokens: int, depth: int, r: int, protected: int = 1) -> list[tuple[int, int]]:
    pairs = []
    for _ in range(depth):
        out = num_tokens - min(r, (num_tokens - protected) // 2)
        pairs.append((num_tokens, out))
        num_tokens = out
    return pairs


def test_vit_macs_reproduces_the_published_vit_b16_numbers():
    # ViT-B/16 at 224: 197 tokens, C=768, 12 blocks, mlp_ratio 4. Unit: multiply-accumulates.
    unmerged = bench.vit_macs([(197, 197)] * 12, dim=768, mlp_ratio=4)
    tome = bench.vit_macs(_tome_tokens(197, 12, 16), dim=768, mlp_ratio=4)
    assert _tome_tokens(197, 12, 16)[-1] == (21, 11)
    assert unmerged["blocks"] / 1e9 == pytest.approx(17.45, abs=0.005)
    assert tome["blocks"] / 1e9 == pytest.approx(8.66, abs=0.005)
    assert unmerged["total"] == unmerged["blocks"]  # no embedding or head unless given

    full = bench.vit_macs([(197, 197)] * 12, dim=768, mlp_ratio=4, num_patches=196, patch_dim=3 * 16 * 16,
                          num_classes=1000)
    assert full["patch_embed"] == 196 * 768 * 768
    assert full["head"] == 768 * 1000
    assert full["total"] / 1e9 == pytest.approx(17.56, abs=0.005)


def test_vit_macs_counts_attention_at_tokens_in_and_mlp_at_tokens_out():
    macs = bench.vit_macs([(10, 4)], dim=8, mlp_ratio=4)
    assert macs["blocks"] == 4 * 10 * 64 + 2 * 100 * 8 + 8 * 4 * 64


def test_bench_cli_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = cli.main(["bench", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--batch-size", "2",
                       "--runs", "1", "--warmup", "0", "--overhead-runs", "1", "--json", str(out), "--quiet"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "| configuration |" in printed and "predicted speed-up" in printed
    assert "Pruning overhead" in printed and printed.startswith("Machine:")

    results = json.loads(out.read_text())
    assert set(results) >= {"machine", "config", "method", "rows", "overhead", "official_comparison"}
    assert results["machine"]["torch_threads"] >= 1 and results["machine"]["cpu"]
    assert results["official_comparison"] is None
    labels = [row["label"] for row in results["rows"]]
    assert labels == ["none (unpatched)", "vtprune tome:r=16", "vtprune pitome:ratio=0.9"]
    base, tome, pitome = results["rows"]
    # the predicted speed-up is the MACs ratio of the token counts, recomputed here from the block tokens
    # (vit_tiny: width 192, MLP ratio 4, 16 patches of 3 x 16 x 16 at 64 px, 1000 classes)
    def macs(tokens):
        return bench.vit_macs(tokens, dim=192, mlp_ratio=4, num_patches=16, patch_dim=768, num_classes=1000)["total"]

    for row in (tome, pitome):
        assert row["predicted_speedup"] == pytest.approx(macs(base["block_tokens"]) / macs(row["block_tokens"]))
    assert base["block_tokens"] == [[17, 17]] * 12
    assert base["final_tokens"] == 17
    # 16 patches + CLS; ToMe's r is capped at half the unprotected tokens: 17 -> 9 -> 5 -> 3 -> 2.
    assert tome["block_tokens"][:4] == [[17, 9], [9, 5], [5, 3], [3, 2]]
    assert tome["predicted_speedup"] > pitome["predicted_speedup"] > 1.0
    for row in results["rows"]:
        assert len(row["times_s"]) == 1 and row["images_per_s"] == pytest.approx(2 / row["times_s"][0])
        assert row["macs"]["total"] == sum(row["macs"][part] for part in ("blocks", "patch_embed", "head"))
        assert row["measured_over_predicted"] == pytest.approx(row["speedup"] / row["predicted_speedup"])
    assert [item["policy"] for item in results["overhead"]] == ["tome:r=16", "pitome:ratio=0.9"]
    for item in results["overhead"]:
        assert len(item["layers"]) == 12 and item["fraction"] >= 0
        assert all(layer["block_ms"] > 0 for layer in item["layers"])


def test_bench_rejects_a_bad_policy_spec_and_a_missing_official_checkout(tmp_path):
    with pytest.raises(SystemExit, match="unknown policy 'nope'"):
        cli.main(["bench", "--policies", "nope:r=1"])
    with pytest.raises(SystemExit, match="tome/patch/timm.py"):
        bench.run(model_name="vit_tiny_patch16_224", img_size=32, batch_size=1, runs=1,
                  official_tome=str(tmp_path), verbose=False)


def test_cost_report_on_a_tiny_vit(tmp_path):
    from vtprune import flops
    from vtprune.evals import cost

    results = cost.run(model_name="vit_tiny_patch16_224", img_size=64, batch_size=2, runs=1, warmup=0,
                       policies=["none", "tome:r=16"], verbose=False, depth=2)
    base, tome = results["rows"]
    assert [base["label"], tome["label"]] == ["none (unpruned)", "tome:r=16"]
    assert set(base["ratios"]) == {"final_tokens", "mean_tokens", "flops_paper", "flops_full", "flops_full_prefill",
                                   "latency_vision encoding", "peak_memory", "kv_cache"}
    assert tome["ratios"]["final_tokens"] == pytest.approx(5 / 17) and tome["ratios"]["mean_tokens"] == pytest.approx(13 / 17)
    assert base["ratios"]["kv_cache"] is None and base["kv_cache_bytes"] is None and tome["kv_cache_bytes"] is None
    assert base["tokens_per_layer"] == [[17, 17]] * 2 and base["final_tokens"] == 17 and base["mean_tokens"] == 17
    assert tome["tokens_per_layer"] == [[17, 9], [9, 5]] and tome["final_tokens"] == 5 and tome["mean_tokens"] == 13
    assert tome["flops"]["paper"]["unit"] == "MACs" and tome["flops"]["full"]["unit"] == "FLOPs"
    for name in ("paper", "full"):
        assert tome["flops"][name]["total"] < base["flops"][name]["total"]
        assert tome["ratios"][f"flops_{name}"] < 1
    for row in results["rows"]:
        assert row["attention_backend"] == "sdpa" and row["attention_backend_per_layer"] == ["sdpa"] * 2
        assert row["peak_memory_bytes"] > 0 and row["ratios"]["peak_memory"] > 0
        latency = row["latency"]["vision encoding"]
        assert len(latency["times_s"]) == 1 and latency["median_s"] == latency["min_s"] == latency["times_s"][0] > 0

    # The FLOPs are vtprune.flops.estimate on the trace of the same patched model.
    import timm
    import torch
    import vtprune

    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, pretrained=False).eval()
    with vtprune.applied(model, "tome:r=16") as handle, torch.inference_mode():
        model(torch.randn(2, 3, 64, 64))
        for name in ("paper", "full"):
            expected = flops.estimate(model, schedule=handle.trace, policy=handle.policies[0],
                                      convention=name)
            assert tome["flops"][name]["total"] == expected.total

    out = tmp_path / "cost.json"
    out.write_text(json.dumps(results))
    assert json.loads(out.read_text())["rows"][1]["flops"]["full"]["total"] == tome["flops"]["full"]["total"]
    table = cost.format_report(results)
    assert "| configuration | attention | final tokens |" in table and "| - |" in table


def test_cost_report_cli(tmp_path, capsys):
    out = tmp_path / "cost.json"
    status = cli.main(["bench", "--report", "cost", "--model", "vit_tiny_patch16_224", "--img-size", "32",
                       "--batch-size", "1", "--runs", "1", "--warmup", "0", "--policies", "none", "pitome:ratio=0.9",
                       "--json", str(out), "--quiet"])
    assert status == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Machine:") and "vision encoding s/batch" in printed and "pitome:ratio=0.9" in printed
    results = json.loads(out.read_text())
    assert [row["label"] for row in results["rows"]] == ["none (unpruned)", "pitome:ratio=0.9"]
    assert results["rows"][0]["kv_cache_bytes"] is None and results["config"]["device"] == "cpu"
    with pytest.raises(SystemExit, match="--report cost only"):
        cli.main(["bench", "--device", "cuda", "--policies", "none"])


def test_cost_harness_times_prefill_and_decode_of_an_unpruned_tiny_llava():
    import torch

    from conftest import build_tiny_llava
    from vtprune import flops
    from vtprune.evals import cost

    model = build_tiny_llava()
    input_ids = torch.cat([torch.tensor([[1, 5, 6]]), torch.full((1, 16), 127), torch.tensor([[7, 8, 9, 10]])], 1)
    inputs = {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, 32, 32)}

    (row,) = cost.measure(model, inputs, ["none"], family=cost.hf_llava(decode_steps=3), warmup=0, runs=1)
    assert list(row["latency"]) == ["prefill", "decode per token"]
    assert all(value["median_s"] > 0 for value in row["latency"].values())
    assert row["tokens_per_layer"] == [[16, 16]] * 2 and row["final_tokens"] == 16
    # 2 layers x (keys + values) x [1 batch, 2 kv heads, 23 positions, 16 head dim] x 4 bytes
    assert row["kv_cache_bytes"] == 2 * 2 * 2 * 23 * 16 * 4 and row["ratios"]["kv_cache"] == 1
    assert row["peak_memory_bytes"] > 0 and row["attention_backend_per_layer"] == [row["attention_backend"]] * 2
    expected = flops.estimate(model, schedule=[16, 16], convention="full", prompt_tokens=7)
    assert row["flops"]["full"]["total"] == expected.total


def test_cost_report_of_a_pruned_tiny_llava_and_its_cli(capsys):
    from vtprune.evals import cost

    results = cost.run_llava("llava-tiny", prompt_tokens=6, runs=1, warmup=0, decode_steps=2, verbose=False,
                             policies=["none", "flowcut:keep=4", "visionzip:keep=4", "pool2d:keep=4"])
    rows = {row["label"]: row for row in results["rows"]}
    assert [row["final_tokens"] for row in results["rows"]] == [16, 4, 4, 4]
    assert rows["none (unpruned)"]["tokens_per_layer"] == [[16, 16]] * 2
    for label, row in rows.items():
        if label.startswith("none"):
            continue
        assert row["tokens_per_layer"] == [[4, 4]] * 2
        assert row["ratios"]["flops_paper"] < 1 and row["ratios"]["flops_full_prefill"] < 1
        # KV cache holds prompt + visual tokens: (6 + 4) / (6 + 16) of the unpruned positions
        assert row["kv_cache_bytes"] * 22 == rows["none (unpruned)"]["kv_cache_bytes"] * 10
    report = cost.format_report(results)
    assert "predicted prefill speed-up" in report and "prompt: 6 text tokens + 16 image placeholders" in report

    assert cli.main(["bench", "--report", "cost", "--model", "llava-tiny", "--runs", "1", "--warmup", "0",
                     "--batch-size", "1", "--prompt-tokens", "4", "--policies", "none", "randomkeep:keep=9",
                     "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "randomkeep:keep=9" in printed and "| 9 (0.56x)" in printed
    with pytest.raises(SystemExit, match="unknown LLaVA model 'llava-huge'; known: llava-mid"):
        cost.run_llava("llava-huge", verbose=False)
