"""`offramp bench`, the load-test data file and the load-test summary (no wall-clock assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from load_tests.data import RequestData, read_request_data, write_request_data
from load_tests.run_locust import metrics_delta, parse_duration, parse_metrics, summary_markdown


@pytest.fixture(scope="module")
def bench_report(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    pytest.importorskip("matplotlib")
    from load_tests.bench import BenchConfig, run_bench
    from load_tests.data import digits_test_split

    out = tmp_path_factory.mktemp("bench")
    test = digits_test_split()  # scikit-learn comes with the export extra tiny_bundle needs
    data = RequestData(test.x[:32], test.y[:32])
    return run_bench(tiny_bundle, out, BenchConfig.quick(), data=data, progress=False), out


def test_bench_writes_json_markdown_and_plots(bench_report: tuple[dict, Path]) -> None:
    report, out = bench_report
    for name in ("bench.json", "bench.md", "throughput_latency.png", "exit_histogram.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "bench.json").read_text())["bundle"]["name"] == report["bundle"]["name"]
    assert (out / "throughput_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert "realisation" in md and "| http | http-early |" in md


def test_bench_covers_every_configuration_with_sane_fields(bench_report: tuple[dict, Path]) -> None:
    report, _ = bench_report
    stages = report["bundle"]["stages"]
    rows = report["results"]
    seen = {(r["config"], r.get("batch", r.get("clients"))) for r in rows}
    for batch in (1, 4):
        assert {("reference-1t", batch), ("reference-ort", batch), ("full", batch), ("early", batch)} <= seen
    for clients in (1, 2):
        assert {("http-reference", clients), ("http-full", clients), ("http-early", clients)} <= seen
    for r in rows:
        assert 0.0 <= r["agreement"] <= 1.0
        assert 1.0 <= r["mean_exit_depth"] <= stages
        assert r["throughput"] > 0 and r["realisation"] > 0 and r["ideal_speedup"] >= 1.0
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert sum(r["exit_counts"]) == r["samples"] and np.isclose(sum(r["exit_histogram"]), 1.0)
    for r in rows:
        if r["config"] in ("reference-1t", "reference-ort", "http-reference", "full", "http-full"):
            # Full depth answers every sample at the last stage, in agreement with itself.
            assert r["mean_exit_depth"] == stages and r["exit_counts"][-1] == r["samples"]
            assert r["ideal_speedup"] == 1.0
        if r["config"] in ("full", "http-full"):
            assert r["agreement"] == 1.0 and r["speedup_vs_full"] == 1.0


def test_every_speed_up_is_over_the_faster_reference_of_the_same_run(bench_report: tuple[dict, Path]) -> None:
    report, out = bench_report
    by = {(r["config"], r.get("batch", r.get("clients"))): r for r in report["results"]}
    for r in report["results"]:
        key = r.get("batch", r.get("clients"))
        if r["mode"] == "in_process":
            base = max((by[("reference-1t", key)], by[("reference-ort", key)]), key=lambda b: b["throughput"])
        else:
            base = by[("http-reference", key)]
        assert r["baseline"] == base["config"]
        assert r["speedup"] == pytest.approx(r["throughput"] / base["throughput"])
        assert r["realisation"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    assert any("early exit / reference" in t["check"] for t in report["targets"])
    assert "vs full" in (out / "bench.md").read_text() and "*" in (out / "bench.md").read_text()


def test_bench_runs_a_text_model_on_sentences(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("transformers")
    from load_tests.bench import BenchConfig, run_bench
    from model_export.text import build_tiny_text_bundle, tiny_text_splits
    from server.text import TextTokenizer

    bundle = build_tiny_text_bundle(tmp_path / "text")
    test = tiny_text_splits(TextTokenizer(bundle / "tokenizer.json", 24)).test
    data = RequestData(np.array(test.texts, dtype=object), test.y)
    report = run_bench(bundle, tmp_path / "out", BenchConfig.quick(), data=data, progress=False)
    rows = {(r["config"], r.get("batch", r.get("clients"))): r for r in report["results"]}
    assert rows[("full", 4)]["agreement"] == 1.0 and rows[("reference-1t", 4)]["agreement"] == 1.0
    assert rows[("http-full", 2)]["agreement"] == 1.0  # sentences over HTTP answer as in-process
    with pytest.raises(ValueError, match="sentences"):
        run_bench(bundle, tmp_path / "out2", BenchConfig.quick(), data=RequestData(np.zeros((4, 3), np.float32)),
                  progress=False)


def test_early_exit_really_exits_early(bench_report: tuple[dict, Path]) -> None:
    report, _ = bench_report
    early = [r for r in report["results"] if r["config"] in ("early", "http-early")]
    stages = report["bundle"]["stages"]
    assert all(r["mean_exit_depth"] < stages for r in early)
    assert report["calibration"]["expected"]["agreement"] >= 0.99


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".json"])
def test_request_data_round_trip(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(1)
    data = RequestData(rng.integers(0, 17, size=(5, 8, 8)).astype(np.float32), np.arange(5, dtype=np.int64))
    back = read_request_data(write_request_data(tmp_path / f"d{suffix}", data))
    np.testing.assert_array_equal(back.x, data.x)
    assert back.x.dtype == np.float32
    if suffix == ".npy":
        assert back.y is None  # .npy holds inputs only
    else:
        np.testing.assert_array_equal(back.y, data.y)
    x, idx = back.batch(3, 4)  # wraps around the end
    assert idx.tolist() == [3, 4, 0, 1] and x.shape == (4, 8, 8)


def test_request_data_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must end in"):
        write_request_data(tmp_path / "d.csv", RequestData(np.zeros((1, 8, 8), np.float32)))
    with pytest.raises(ValueError, match="does not exist"):
        read_request_data(tmp_path / "missing.npz")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a request data JSON"):
        read_request_data(tmp_path / "bad.json")


METRICS_BEFORE = """\
# HELP offramp_exit_stage_total Samples answered at each stage (0-based).
# TYPE offramp_exit_stage_total counter
offramp_exit_stage_total{model="m",stage="0"} 10.0
offramp_exit_stage_total{model="m",stage="2"} 5.0
offramp_exit_stage_total{model="other",stage="0"} 99.0
# HELP offramp_requests_total Inference requests by outcome.
# TYPE offramp_requests_total counter
offramp_requests_total{model="m",outcome="ok"} 4.0
# TYPE offramp_executed_flops_total counter
offramp_executed_flops_total{model="m"} 100.0
# TYPE offramp_full_depth_flops_total counter
offramp_full_depth_flops_total{model="m"} 300.0
"""
METRICS_AFTER = """\
# TYPE offramp_exit_stage_total counter
offramp_exit_stage_total{model="m",stage="0"} 40.0
offramp_exit_stage_total{model="m",stage="1"} 20.0
offramp_exit_stage_total{model="m",stage="2"} 45.0
offramp_exit_stage_total{model="other",stage="0"} 1000.0
# TYPE offramp_requests_total counter
offramp_requests_total{model="m",outcome="ok"} 14.0
offramp_requests_total{model="m",outcome="overloaded"} 2.0
# TYPE offramp_executed_flops_total counter
offramp_executed_flops_total{model="m"} 400.0
# TYPE offramp_full_depth_flops_total counter
offramp_full_depth_flops_total{model="m"} 900.0
"""


def test_summary_reads_the_exit_histogram_from_metrics() -> None:
    delta = metrics_delta(parse_metrics(METRICS_BEFORE), parse_metrics(METRICS_AFTER), "m")
    assert delta["exit_counts"] == [30, 20, 40]  # only model m, only what happened between scrapes
    assert delta["samples"] == 90
    assert delta["exit_histogram"] == pytest.approx([1 / 3, 2 / 9, 4 / 9])
    assert delta["mean_exit_depth"] == pytest.approx((30 * 1 + 20 * 2 + 40 * 3) / 90)
    assert delta["compute_fraction"] == pytest.approx(0.5)
    assert delta["requests"] == {"ok": 10, "overloaded": 2}


def test_summary_matches_the_real_server_metrics() -> None:
    from prometheus_client import generate_latest

    from server.metrics import Metrics

    metrics = Metrics()
    before = parse_metrics(generate_latest(metrics.registry).decode())
    metrics.samples_exited("m", 0, 3, 30.0, 90.0)
    metrics.samples_exited("m", 2, 1, 30.0, 30.0)
    metrics.request_done("m", "ok", 0.01)
    delta = metrics_delta(before, parse_metrics(generate_latest(metrics.registry).decode()), "m")
    assert delta["exit_counts"] == [3, 0, 1] and delta["requests"] == {"ok": 1}
    assert delta["compute_fraction"] == pytest.approx(0.5)


def test_summary_markdown_lists_stats_and_exits() -> None:
    server = metrics_delta(parse_metrics(METRICS_BEFORE), parse_metrics(METRICS_AFTER), "m")
    summary = {
        "config": {"host": "http://127.0.0.1:1", "model": "m", "users": 4, "spawn_rate": 2.0,
                   "run_time": "5s",
                   "format": "json", "early_exit": True, "tags": ["single"]},
        "stats": [{"name": "infer[1]", "requests": 10, "failures": 1, "requests_per_s": 2.0, "p50_ms": 5.0,
                   "p95_ms": 9.0, "p99_ms": 11.0}],
        "server": server,
    }
    md = summary_markdown(summary)
    assert "| infer[1] | 10 | 1 | 2.0 | 5 | 9 | 11 |" in md
    assert "| 1 | 20 | 22.2 % |" in md


def test_run_time_parsing() -> None:
    assert parse_duration("30s") == 30 and parse_duration("2m") == 120 and parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_graph_reference_reuses_its_buffers_and_answers_as_onnxruntime(tiny_bundle: Path) -> None:
    """reference-graph on the CPU provider: the fixed buffers per batch size, written in place
    (the CUDA capture itself is owed to a GPU run)."""
    import onnxruntime as ort

    from load_tests.bench import GraphReference
    from server.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    out = bundle.manifest.reference.outputs[-1]  # type: ignore[union-attr]
    graph = GraphReference(bundle.reference_path(), "cpu", out)  # type: ignore[arg-type]
    plain = ort.InferenceSession(str(bundle.reference_path()), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    addresses = {}
    for n in (1, 5, 5, 3, 5):
        x = rng.uniform(0, 16, (n, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(graph({"pixels": x}), plain.run([out], {"pixels": x})[0], rtol=1e-5, atol=1e-6)
        value, outs, _ = graph._buffers[n]
        ptrs = (value.data_ptr(), *(o.data_ptr() for o in outs.values()))  # type: ignore[attr-defined]
        assert addresses.setdefault(n, ptrs) == ptrs  # the same buffers on every run of that size
    assert sorted(graph._buffers) == [1, 3, 5]


def test_bench_with_cuda_graphs_has_a_graph_reference_among_the_baselines(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from load_tests.bench import BenchConfig, run_bench
    from load_tests.data import digits_test_split

    test = digits_test_split()
    cfg = BenchConfig.quick()
    cfg.cuda_graphs, cfg.http = True, False  # on CPU: the engine warns and runs without graphs
    report = run_bench(tiny_bundle, tmp_path, cfg, data=RequestData(test.x[:16], test.y[:16]), progress=False)
    rows = {(r["config"], r["batch"]) for r in report["results"]}
    assert {("reference-graph", b) for b in cfg.batch_sizes} <= rows
    assert all(r["baseline"] in ("reference-1t", "reference-ort", "reference-graph") for r in report["results"])
    # the graph baseline answers what reference.onnx answers: the full-depth label of every sample
    assert all(r["agreement"] == 1.0 for r in report["results"] if r["config"] == "reference-graph")


def test_the_test_split_is_that_of_the_bundles_own_data_set(tiny_bundle: Path) -> None:
    """bench, conformal, policy_accuracy and coverage read the data set from the bundle: a digits-hard
    or MNIST bundle is never measured on clean digits, a bundle of anything else is refused."""
    from load_tests.data import bundle_dataset, test_split_for
    from model_export.data import HARD_PREPROCESSING
    from model_export.vision import mnist_preprocessing
    from server.bundle import load_bundle

    m = load_bundle(tiny_bundle).manifest
    assert bundle_dataset(m) == "digits"
    data = test_split_for(m)
    assert data.x.shape[1:] == (8, 8) and len(data) == 360

    def with_preprocessing(text: str):  # noqa: ANN202
        return m.model_copy(update={"input": m.input.model_copy(update={"preprocessing": text})})

    assert bundle_dataset(with_preprocessing(HARD_PREPROCESSING)) == "digits-hard"
    assert bundle_dataset(with_preprocessing(mnist_preprocessing())) == "mnist"
    heavy = m.input.preprocessing + "; then upscaled bilinearly to 32x32 inside stage 0"  # the heavy preset's
    assert bundle_dataset(with_preprocessing(heavy)) == "digits"
    assert bundle_dataset(with_preprocessing(HARD_PREPROCESSING + "; then upscaled")) == "digits-hard"
    with pytest.raises(ValueError, match="not a bundle of a built-in data set"):
        bundle_dataset(with_preprocessing("my own pixels"))
