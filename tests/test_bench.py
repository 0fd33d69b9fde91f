"""``recorun-bench``: a tiny clients scan, the HLT comparison and a short open-loop load
against the session's Triton server, the projection against the paper's section 6, and bad
arguments."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.server, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("recorun-bench")
    command = [str(script)] if script.exists() else [sys.executable, "-m",
                                                      "recorun.benchmarks.studies.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def assert_png(path: str | Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG and len(data) > 5000, path


def test_clients_scan_writes_json_and_plots(triton_server, tmp_path):
    events = 22                    # more than the sample's 20: its file is read twice over
    run = bench("clients", "--workflow", "workflows/workflow_facile.yaml", "--clients", "1,2",
                "--events", str(events), "--server", triton_server.grpc, "--out", str(tmp_path),
                "--start-delay", "4")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = last_json(run.stdout)
    data = json.loads(Path(summary["json"]).read_text())
    assert [p["clients"] for p in data["points"]] == [1, 2]
    for point in data["points"]:
        n = point["clients"]
        assert point["events"] == n * events and len(point["event_ms"]) == n * events
        assert len(point["per_client_hz"]) == n and min(point["per_client_hz"]) > 0
        assert point["throughput_hz"] == pytest.approx(sum(point["per_client_hz"]))
        # FACILE's input: 16000 channels x 15 float32 per event
        assert point["input_bytes_per_event"] == pytest.approx(16000 * 15 * 4, rel=0.01)
    assert summary["throughput_hz"] == {str(p["clients"]): p["throughput_hz"]
                                        for p in data["points"]}
    assert data["machine"]["cores"] >= 1
    assert len(data["plots"]) == 2
    for plot in data["plots"]:
        assert_png(plot)


def test_hlt_comparison(triton_server, tmp_path):
    run = bench("hlt", "--events", "3", "--server", triton_server.grpc, "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(Path(last_json(run.stdout)["json"]).read_text())
    for side in ("sonic", "nominal"):
        assert data[side]["events"] == 3 and len(data[side]["event_ms"]) == 3
        assert 0 < data[side]["hcal_share"] < 1
    # the nominal fit costs more CPU than packing and unpacking FACILE's requests
    assert data["nominal"]["hcal_cpu_ms"] > data["sonic"]["hcal_cpu_ms"]
    assert data["time_change"] == pytest.approx(
        data["sonic"]["event_ms_mean"] / data["nominal"]["event_ms_mean"] - 1)
    assert_png(data["plots"][0])


def test_projection_reproduces_the_papers_offline_figures(tmp_path):
    run = bench("projection", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    rows = {(r["scenario"], r["model"]): r
            for r in json.loads((tmp_path / "projection.json").read_text())["rows"]}
    # paper section 6: FACILE offline 10 GPUs and 39 Gb/s; DeepCalo one GPU; ResNet-50
    # 200 GPUs and 240 Gb/s (their per-GPU throughputs, our models' request sizes)
    assert rows["offline", "facile"]["gpus"] == 10
    assert rows["offline", "facile"]["bandwidth_gbps"] == pytest.approx(39, abs=1)
    assert rows["offline", "deepcalo"]["gpus"] == 1
    assert rows["offline", "resnet50"]["gpus"] == 200
    assert rows["offline", "resnet50"]["bandwidth_gbps"] == pytest.approx(240, abs=2)


def test_bad_arguments_exit_2(tmp_path):
    run = bench("clients", "--workflow", "nope.yaml", "--out", str(tmp_path))
    assert run.returncode == 2 and "nope.yaml" in run.stderr
    run = bench("clients", "--clients", "0,2", "--out", str(tmp_path))
    assert run.returncode == 2 and "positive" in run.stderr
    run = bench("batching", "--configs", "on-9", "--out", str(tmp_path))
    assert run.returncode == 2 and "on-9" in run.stderr


def test_load_open_loop_against_the_server(triton_server, tmp_path):
    run = bench("load", "--model", "facile", "--rate", "20,40", "--duration", "2",
                "--server", triton_server.grpc, "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    summary = last_json(run.stdout)
    assert summary["study"] == "load" and summary["model"] == "facile"
    data = json.loads(Path(summary["json"]).read_text())
    assert [p["offered_hz"] for p in data["points"]] == [20.0, 40.0]
    assert summary["points"] == [{k: p[k] for k in summary["points"][0]}
                                 for p in data["points"]]
    for point in data["points"]:
        assert point["errors"] == 0 and point["dropped"] == 0
        assert point["answered"] > 0 and point["sent"] == point["scheduled"]
        assert point["answered"] + point["lagging"] == point["sent"]
        # Poisson arrivals over 2 s: the rate sent is near the offered one
        assert 0.4 * point["offered_hz"] <= point["sent_hz"] <= 1.6 * point["offered_hz"]
        assert 0.4 * point["offered_hz"] <= point["achieved_hz"] <= 1.6 * point["offered_hz"]
        assert 0 < point["latency_ms_p50"] <= point["latency_ms_p90"] <= point["latency_ms_p99"]
        assert point["latency_ms_p99"] <= point["latency_ms_max"]
        assert point["latency_ms_mean"] > 0
    # FACILE's HLT requests: one event's 4500 channels x 15 float32
    assert data["batch_sizes"][0] == 4500
    assert data["request_bytes_mean"] == pytest.approx(4500 * 15 * 4)
    assert len(data["plots"]) == 1
    assert_png(data["plots"][0])


def test_load_bad_arguments_exit_2(triton_server, tmp_path):
    run = bench("load", "--model", "facile", "--rate", "10,0", "--server", triton_server.grpc,
                "--out", str(tmp_path))
    assert run.returncode == 2 and "> 0" in run.stderr
    run = bench("load", "--model", "nosuchnet", "--rate", "10", "--out", str(tmp_path))
    assert run.returncode == 2 and "nosuchnet" in run.stderr
    run = bench("load", "--model", "facile", "--rate", "10", "--server", "127.0.0.1:1",
                "--out", str(tmp_path))
    assert run.returncode == 2 and "127.0.0.1:1" in run.stderr
    run = bench("load", "--model", "facile", "--rate", "10", "--sample", "nope.root",
                "--server", triton_server.grpc, "--out", str(tmp_path))
    assert run.returncode == 2 and "nope.root" in run.stderr
    assert not list(tmp_path.iterdir())


def test_intra_event_benchmark_smoke(capsys):
    """benchmarks/intra_event.py with tiny matrices, a few events and one repeat: the figures
    are all in its last line of JSON and both thread counts gave the same products (its speed
    is not checked)."""
    from recorun.benchmarks import intra_event

    figures = intra_event.main(["--events", "4", "--repeat", "1", "--size", "16"])
    printed = last_json(capsys.readouterr().out)
    assert printed == figures
    assert figures["products_identical"] is True
    assert figures["events"] == 4 and figures["streams"] == 1 and figures["size"] == 16
    for key in ("two_threads_over_one", "ideal_two_threads_over_one", "throughput_hz_1thread",
                "throughput_hz_2threads", "wall_s_1thread", "wall_s_2threads"):
        assert figures[key] > 0, key
    assert figures["two_threads_over_one"] == pytest.approx(
        figures["throughput_hz_2threads"] / figures["throughput_hz_1thread"], rel=1e-3, abs=1e-4)
    assert [len(figures["throughput_hz_runs"][t]) for t in ("1", "2")] == [1, 1]
    assert set(figures["producer_ms"]) == set(intra_event.LABELS)
