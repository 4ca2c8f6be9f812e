"""The benchmark scripts run end to end on a tiny workload (no timings are asserted: they measure, tests don't)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_depth  # noqa: E402
import bench_engine  # noqa: E402


def test_bench_engine_writes_ratios_for_a_small_workload(tmp_path):
    out = tmp_path / "engine.json"
    assert bench_engine.main(["--models", "mlp", "--batch", "1", "--repeats", "1", "--no-memory", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    (row,) = payload["results"]
    assert payload["meta"]["device"] == "cpu"
    assert set(row["time_ratio"]) == {"first", "cached"} and all(v > 0 for v in row["time_ratio"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_bench_engine_refuses_cuda_where_there_is_none():
    with pytest.raises(SystemExit):
        bench_engine.main(["--models", "mlp", "--device", "cuda"])


def test_depth_slope_removes_a_fixed_cost():
    # 5 ms per call plus 20 us per node: time per node falls with depth, the slope is flat at 20 us.
    rows = [{"nodes": n, "first_ms": 5 + 0.02 * n, "cached_ms": 5 + 0.02 * n} for n in (100, 200, 400)]
    bench_depth.add_marginal(rows)
    assert "first_us_per_added_node" not in rows[0]
    for row in rows[1:]:
        assert row["first_us_per_added_node"] == pytest.approx(20.0)
        assert row["cached_us_per_added_node"] == pytest.approx(20.0)


def test_depth_measure_runs_every_depth_interleaved():
    rows = bench_depth.measure([1, 2], width=4, repeats=2)
    assert [r["depth"] for r in rows] == [1, 2]
    assert rows[1]["nodes"] > rows[0]["nodes"] > 0
    for row in rows:
        for kind in ("first", "cached"):
            assert 0 < row[f"{kind}_ms"] <= row[f"{kind}_median_ms"]
            assert row[f"{kind}_us_per_node"] == pytest.approx(row[f"{kind}_ms"] * 1e3 / row["nodes"])


def test_depth_main_writes_json_and_plot(tmp_path, capsys):
    bench_depth.main(["--depths", "1", "2", "--width", "4", "--repeats", "1",
                      "--json", str(tmp_path / "d.json"), "--plot", str(tmp_path / "d.png")])
    assert "cached_us_per_added_node: max/min" in capsys.readouterr().out
    rows = json.loads((tmp_path / "d.json").read_text())
    assert [r["depth"] for r in rows] == [1, 2] and "first_us_per_added_node" in rows[1]
    assert (tmp_path / "d.png").stat().st_size > 0
