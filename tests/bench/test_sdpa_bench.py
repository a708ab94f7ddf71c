"""bench/sdpa_bench.py's kernel table: a run replaces its own device's rows and keeps the others'."""

from __future__ import annotations

import json

from tests.bench import load_bench


def _report(device: str, sites: list[str], date: str) -> dict:
    machine = {"device": device, "capability": [9, 0], "torch": "2.11.0"}
    rows = [{"site": s, "device": device, "capability": [9, 0], "best": "flash"} for s in sites]
    return {"bench": "sdpa_bench", "date": date, "machine": machine, "tolerance": {}, "rows": rows}


def test_a_run_replaces_its_devices_rows_and_keeps_the_other_devices(tmp_path):
    bench = load_bench("sdpa_bench")
    table = tmp_path / "sdpa_table.json"
    table.write_text(json.dumps(_report("NVIDIA H200", ["dit", "decoder"], "d1")))  # the old layout
    merged = bench.merged_table(table, _report("NVIDIA H100 80GB HBM3", ["dit"], "d2"))
    assert [(r["device"], r["site"]) for r in merged["rows"]] == [
        ("NVIDIA H200", "dit"), ("NVIDIA H200", "decoder"), ("NVIDIA H100 80GB HBM3", "dit"),
    ]  # fmt: skip
    assert [m["device"] for m in merged["machines"]] == ["NVIDIA H200", "NVIDIA H100 80GB HBM3"]
    table.write_text(json.dumps(merged))
    again = bench.merged_table(table, _report("NVIDIA H200", ["vae"], "d3"))
    assert [(r["device"], r["site"]) for r in again["rows"]] == [
        ("NVIDIA H100 80GB HBM3", "dit"), ("NVIDIA H200", "vae"),
    ]  # fmt: skip
    assert [m["device"] for m in again["machines"]] == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    assert bench.merged_table(tmp_path / "none.json", _report("X", ["a"], "d"))["rows"][0]["site"] == "a"
