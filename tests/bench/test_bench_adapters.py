"""bench/adapters.py in quick mode on a tiny seeded Llama: it trains, quantizes, scores and writes its report."""

from __future__ import annotations

import json

import pytest

from bench_scripts import load_bench



@pytest.fixture(scope="module")
def bench():
    return load_bench("adapters.py", "bench_adapters")


def test_quick_run(bench, tiny_llama_dir, tiny_text_file, tmp_path):
    out, cache = tmp_path / "report", tmp_path / "cache"
    argv = ["--quick", "--model", str(tiny_llama_dir), "--text", str(tiny_text_file), "--cache", str(cache),
            "--out", str(out), "--fleet-budgets", "2.4"]
    assert bench.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["adapters"]) == {"lm", "add"}
    for name, info in res["adapters"].items():
        by = {r["method"]: r for r in info["rows"]}
        assert {"fp16", "RTN 2-bit", "RTN 1-bit", "LoRAQuant 2@0.8", "bitalloc act @ 3@0.9", "bitalloc plain @ 2.4"} <= set(by)
        for text in bench.VARIANTS:  # the solver is held to the bits each rule reaches
            for objective in bench.OBJECTIVES:
                assert by[f"bitalloc {objective} @ {text}"]["bits_per_param"] <= by[f"LoRAQuant {text}"]["bits_per_param"] + 1e-9
        assert by["RTN 1-bit"]["bits_per_param_codes"] == pytest.approx(1.0)
        assert by["RTN 2-bit"]["bits_per_param_codes"] == pytest.approx(2.0)
        assert by["fp16"]["bytes"] == 2 * by["fp16"]["params"]
        assert by["RTN 1-bit"]["bytes"] < by["RTN 2-bit"]["bytes"] < by["fp16"]["bytes"]
    assert res["adapters"]["lm"]["rows"][1]["metric"] > 1.0  # a perplexity
    assert 0.0 <= res["adapters"]["add"]["rows"][1]["metric"] <= 1.0  # an exact-match rate
    assert {f["mode"] for f in res["fleet"]} == {"fleet", "per-adapter"}
    fleet = {f["mode"]: f for f in res["fleet"]}
    assert fleet["fleet"]["objective"] <= fleet["per-adapter"]["objective"] * (1 + 1e-9)
    page = (out / "results.md").read_text()
    assert "## Goals" in page and (out / "metric_vs_bits.png").stat().st_size > 0
    assert not list(out.rglob("*.safetensors"))  # no adapter weights in the report
    # a rerun reuses the trained adapters and the scores
    assert bench.main(argv) == 0
    assert all(info["training"]["cached"] for info in json.loads((out / "results.json").read_text())["adapters"].values())
