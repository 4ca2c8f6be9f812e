"""The benchmark scripts run end to end on a tiny workload (no timings are asserted: they measure, tests don't)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_attention  # noqa: E402
import bench_depth  # noqa: E402
import bench_engine  # noqa: E402
import ratios  # noqa: E402


def test_bench_engine_writes_ratios_for_a_small_workload(tmp_path):
    out = tmp_path / "engine.json"
    assert bench_engine.main(["--models", "mlp", "--batch", "1", "--repeats", "1", "--no-memory", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    (row,) = payload["results"]
    assert payload["meta"]["device"] == "cpu"
    assert set(row["time_ratio"]) == {"first", "cached"} and all(v > 0 for v in row["time_ratio"].values())
    # one round: its paired ratio is that round's own ratio, and so are both quartiles
    for kind in ("first", "cached"):
        own = row["times_ms"][kind][0] / row["times_ms"]["ixg"][0]
        assert row["paired_time_ratio"][kind] == pytest.approx({"median": own, "q1": own, "q3": own})


def test_bench_engine_counts_page_faults_and_keeps_the_heap_on_request(tmp_path):
    runs = {}
    for keep in (False, True):
        out = tmp_path / f"engine_{keep}.json"
        argv = ["--models", "mlp", "--batch", "1", "--repeats", "2", "--no-memory", "--json", str(out)]
        assert bench_engine.main(argv + (["--keep-heap"] if keep else [])) == 0
        runs[keep] = json.loads(out.read_text())
    for keep, payload in runs.items():
        (row,) = payload["results"]
        assert payload["meta"]["keep_heap"] is keep
        assert set(row["minor_faults"]) == {"ixg", "first", "cached"}
        assert all(len(v) == 2 and all(isinstance(n, int) and n >= 0 for n in v) for v in row["minor_faults"].values())
    # the timing child ran under the allocator settings asked for, and only then
    assert runs[True]["results"][0]["timing_malloc_env"] == bench_engine.KEEP_HEAP_MALLOC_ENV
    inherited = {k: os.environ.get(k) for k in bench_engine.KEEP_HEAP_MALLOC_ENV}
    assert runs[False]["results"][0]["timing_malloc_env"] == inherited


def test_bench_engine_times_merged_batch_norm_beside_the_default(tmp_path):
    out = tmp_path / "engine.json"
    argv = ["--models", "resnet18", "--resnet-size", "32", "--batch", "1", "--repeats", "1", "--no-memory",
            "--batch-norm", "both", "--json", str(out)]
    assert bench_engine.main(argv) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert set(row["time_ratio"]) == {"first", "cached", "cached_merge"} and all(v > 0 for v in row["time_ratio"].values())
    assert len(row["times_ms"]["cached_merge"]) == 1


def test_bench_attention_prints_one_ratio_per_length(capsys):
    threads = torch.get_num_threads()
    try:
        assert bench_attention.main(["--seq", "16", "40", "--repeats", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets it process-wide
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[0] for row in rows] == ["16", "40"]
    assert all(float(value) > 0 for row in rows for value in row[1:])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_bench_engine_refuses_cuda_where_there_is_none():
    with pytest.raises(SystemExit):
        bench_engine.main(["--models", "mlp", "--device", "cuda"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_bench_depth_refuses_cuda_where_there_is_none():
    with pytest.raises(SystemExit):
        bench_depth.main(["--depths", "1", "--device", "cuda"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_depth_measure_runs_on_cuda():
    rows = bench_depth.measure([1, 2], width=4, repeats=1, device="cuda")
    assert rows[1]["nodes"] > rows[0]["nodes"] > 0 and all(r["cached_ms"] > 0 for r in rows)


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
    # The shallow stack runs twice per round, so both depths get about the same timed seconds.
    assert [r["calls"] for r in rows] == [4, 2]
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


import run_all  # noqa: E402


def _engine_row(model: str, batch: int, first: float, cached: float, memory: float) -> dict:
    return {"model": model, "batch": batch, "time_ratio": {"first": first, "cached": cached},
            "memory_ratio": {"first": memory, "cached": memory}}


def _peer_row(part: str, model: str, ours_over_peer: float) -> dict:
    return {"part": part, "model": model, "batch": 1, "rules": "epsilon",
            "ours_over_peer": {"first": ours_over_peer, "cached": ours_over_peer},
            "peer_over_ours": {"first": 1 / ours_over_peer, "cached": 1 / ours_over_peer}}


def test_suite_verdicts_name_every_workload_that_misses_a_goal():
    results = {
        "engine.json": {"results": [_engine_row("mlp", 1, 0.9, 0.9, 1.0), _engine_row("resnet50", 8, 1.4, 1.25, 1.35)]},
        "zoo-b1.json": {"results": [_engine_row("gpt2", 1, 1.0, 1.0, float("nan"))]},
        "peers-lxt.json": {"results": [_peer_row("lxt", "llama", 1.1), _peer_row("zennit", "vgg16", 0.5),
                                       {**_peer_row("lxt", "gpt2", 1.05), "input_shape": [1, 512, 768]}]},
        "peers-zennit-ig.json": {"results": [_peer_row("ig", "resnet50", 1 / 15)]},
        "depth.json": [{"nodes": 10, "first_us_per_node": 30.0, "cached_us_per_node": 20.0},
                       {"nodes": 20, "first_us_per_node": 25.0, "cached_us_per_node": 15.0,
                        "first_us_per_added_node": 20.0, "cached_us_per_added_node": 10.0},
                       {"nodes": 40, "first_us_per_node": 25.5, "cached_us_per_node": 13.0,
                        "first_us_per_added_node": 26.0, "cached_us_per_added_node": 11.0}],
    }
    verdicts = {v["goal"]: v for v in run_all.evaluate(results)}
    assert verdicts["time first / IxG"]["met"] and verdicts["time first / IxG"]["worst"] == 1.4
    assert not verdicts["time cached / IxG"]["met"]
    assert verdicts["time cached / IxG"]["misses"] == ["resnet50 b8"]
    # the NaN of a run without memory children is no measurement, not a pass or a miss
    assert verdicts["memory / IxG"]["misses"] == ["resnet50 b8 first", "resnet50 b8 cached"]
    assert verdicts["ours / Zennit"]["met"] and not verdicts["ours / LXT"]["met"]
    assert verdicts["ours / LXT"]["misses"] == ["llama b1 epsilon first", "llama b1 epsilon cached",
                                                "gpt2 b1 epsilon 512 tokens first", "gpt2 b1 epsilon 512 tokens cached"]
    assert not verdicts["IG(50) / ours"]["met"] and verdicts["IG(50) / ours"]["worst"] == pytest.approx(15)
    depth = verdicts["depth: time per added node, max / min"]
    assert depth["misses"] == ["first"] and depth["worst"] == pytest.approx(1.3)
    per_node = verdicts["depth: time per node, max / min"]  # 30 / 25 first, 20 / 13 cached
    assert per_node["misses"] == ["cached"] and per_node["worst"] == pytest.approx(20 / 13)


def test_suite_verdicts_label_rows_below_the_issues_forward_floor():
    small = {**_engine_row("resnet18", 1, 1.1, 1.3, 1.0), "forward_nograd_ms": 37.6}
    large = {**_engine_row("resnet50", 1, 1.1, 1.25, 1.0), "forward_nograd_ms": 120.0}
    verdicts = {v["goal"]: v for v in run_all.evaluate({"engine.json": {"results": [small, large]}})}
    # still counted (the verdict stays strict), but named as below the issue's size floor
    assert verdicts["time cached / IxG"]["misses"] == ["resnet18 b1 (forward 38 ms < 50)", "resnet50 b1"]
    assert verdicts["time cached / IxG"]["worst_at"] == "resnet18 b1 (forward 38 ms < 50)"


def test_paired_ratio_takes_the_rounds_ratios_median_and_quartiles():
    # ratios 2, 2, 3, 4: median 2.5; inclusive quartiles at positions 0.75 and 2.25 of the sorted list
    assert ratios.paired_ratio([2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 2.0, 2.0]) == pytest.approx(
        {"median": 2.5, "q1": 2.0, "q3": 3.25}
    )
    assert ratios.paired_ratio([3.0], [2.0]) == {"median": 1.5, "q1": 1.5, "q3": 1.5}
    with pytest.raises(ValueError):
        ratios.paired_ratio([1.0, 2.0], [1.0])


def test_peer_rows_pair_each_round_with_the_peers_call_of_that_round():
    import bench_peers

    times = {"peer": [1.0, 2.0, 4.0], "first": [1.5, 2.0, 2.0], "cached": [1.0, 1.0, 8.0]}
    row = bench_peers.make_row("lxt", "llama", 1, "attnlrp", "lxt", [1, 8, 16], times)
    # first: rounds 1.5, 1.0, 0.5; cached: 1.0, 0.5, 2.0 (sorted 0.5, 1.0, 2.0 -> quartiles 0.75, 1.5)
    assert row["paired_ours_over_peer"]["first"] == pytest.approx({"median": 1.0, "q1": 0.75, "q3": 1.25})
    assert row["paired_ours_over_peer"]["cached"] == pytest.approx({"median": 1.0, "q1": 0.75, "q3": 1.5})
    assert row["paired_peer_over_ours"]["cached"]["median"] == pytest.approx(1.0)
    assert row["ours_over_peer"]["cached"] == pytest.approx(1.0 / 2.0)  # medians 1.0 and 2.0: unchanged


def test_suite_verdicts_give_each_miss_the_spread_of_its_rounds():
    rounds = {"median": 1.22, "q1": 1.17, "q3": 1.26}
    noisy = {**_engine_row("resnet50", 1, 1.1, 1.23, 1.0), "paired_time_ratio": {"first": rounds, "cached": rounds}}
    clear = _engine_row("resnet50", 8, 1.1, 1.1, 1.0)  # an older file: no rounds, no spread
    verdicts = {v["goal"]: v for v in run_all.evaluate({"zoo.json": {"results": [noisy, clear]}})}
    assert verdicts["time cached / IxG"]["misses"] == ["resnet50 b1 [rounds 1.17-1.26]"]
    assert verdicts["time first / IxG"]["worst_rounds"] == rounds
    assert "[rounds 1.17-1.26]" in run_all.format_verdicts(list(verdicts.values()))


def test_suite_verdicts_say_not_measured_without_results():
    verdicts = run_all.evaluate({})
    assert len(verdicts) == len(run_all.GOALS)
    assert all(v["met"] is None and v["worst"] is None for v in verdicts)
    assert "not measured" in run_all.format_verdicts(verdicts)


def test_suite_commands_skip_lxt_without_its_interpreter(tmp_path):
    runs = dict(run_all.commands(tmp_path, run_all.PARTS, quick=False, device="cpu", lxt_python=str(tmp_path / "none")))
    assert set(runs) == {"engine.json", "zoo-b1.json", "zoo-b8.json", "peers-zennit-ig.json", "depth.json"}
    for name, argv in runs.items():
        assert argv[-2:] == ["--json", str(tmp_path / name)]
    quick = dict(run_all.commands(tmp_path, run_all.PARTS, quick=True, device="cpu", lxt_python=sys.executable))
    assert set(quick) == {"engine.json", "depth.json"}


def test_suite_quick_run_writes_summary(tmp_path, capsys):
    assert run_all.main(["--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    verdicts = {v["goal"]: v for v in summary["verdicts"]}
    assert verdicts["time cached / IxG"]["worst"] > 0 and verdicts["time cached / IxG"]["worst_at"].startswith("mlp b1")
    assert verdicts["depth: time per added node, max / min"]["worst"] >= 1.0
    assert (tmp_path / "depth.png").stat().st_size > 0
    assert "=== goals" in capsys.readouterr().out


def test_suite_rerun_of_one_part_counts_the_others_from_the_folder(tmp_path, capsys):
    depth = [{"nodes": 10}, {"nodes": 20, "first_us_per_added_node": 20.0, "cached_us_per_added_node": 10.0},
             {"nodes": 40, "first_us_per_added_node": 30.0, "cached_us_per_added_node": 10.0}]
    (tmp_path / "depth.json").write_text(json.dumps(depth))
    (tmp_path / "unrelated.json").write_text("{}")
    assert run_all.main(["--quick", "--parts", "engine", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["earlier_files"] == ["depth.json"]
    verdicts = {v["goal"]: v for v in summary["verdicts"]}
    assert verdicts["depth: time per added node, max / min"]["worst"] == pytest.approx(1.5)
    assert "read from an earlier run: depth.json" in capsys.readouterr().out


def test_suite_quick_run_keeps_out_of_the_real_results_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_all.main(["--quick", "--parts", "depth"]) == 0
    assert (tmp_path / "benchmarks" / "results" / "quick" / "summary.json").exists()
    assert not (tmp_path / "benchmarks" / "results" / "depth.json").exists()
