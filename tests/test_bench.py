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
    assert base["speedup"] == 1.0 and base["predicted_speedup"] == 1.0
    assert base["block_tokens"] == [[17, 17]] * 12
    assert base["final_tokens"] == 17
    # 16 patches + CLS; ToMe's r is capped at half the unprotected tokens: 17 -> 9 -> 5 -> 3 -> 2.
    assert tome["block_tokens"][:4] == [[17, 9], [9, 5], [5, 3], [3, 2]]
    assert tome["predicted_speedup"] > pitome["predicted_speedup"] > 1.0
    for row in results["rows"]:
        assert len(row["times_s"]) == 1 and row["images_per_s"] > 0
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
