"""recorun-server's start and stop: the ONNX cache, a start that does not import torch, a stop
that does not wait for timeouts when nothing is in flight and still lets in-flight requests
finish (recorun.server.onnx_cache, recorun.server.serve).

The cache tests export FACILE with torch for real (once per module) and serve it with
onnxruntime; the server tests run real recorun-servers (tritonserver through pytriton), each
with a cache folder of its own. Processes are only ever signalled by PID or process group.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from recorun.model_specs import SPECS
from recorun.server.onnx_cache import (
    CACHE_VARIABLE,
    KEEP_PER_MODEL,
    OnnxCache,
    cache_dir,
    export_fingerprint,
    fingerprint_key,
)

from proc_session import session_members

RTOL, ATOL = 1e-4, 1e-5


# --- the cache, without a server ------------------------------------------------------------------

@pytest.fixture(scope="module")
def facile_export(tmp_path_factory):
    """FACILE exported to ONNX and checked against torch, as a server does it the first time:
    ``(path, reference, max_diff, origin, fingerprint)``."""
    from recorun.server.export import check_onnx, export_onnx, torch_reference
    from recorun.server.weights import load_model, origin

    model = load_model("facile")
    path = export_onnx("facile", model, tmp_path_factory.mktemp("export") / "model.onnx")
    reference = torch_reference("facile", model)
    diff = check_onnx("facile", model, path, reference=reference)
    return path, reference, diff, origin("facile"), export_fingerprint("facile")


def store(cache: OnnxCache, export, fingerprint=None, **kwargs):
    path, reference, diff, origin, default = export
    return cache.store("facile", fingerprint or default, path, origin=origin,
                       reference=reference, max_diff=diff, check_seed=1, **kwargs)


def test_where_the_cache_is(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "recorun" / "onnx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "recorun" / "onnx"
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    assert cache_dir(tmp_path / "option") == tmp_path / "option"      # --onnx-cache wins
    for off in ("off", "OFF", "none", "0", "false"):
        monkeypatch.setenv(CACHE_VARIABLE, off)
        assert cache_dir() is None and OnnxCache.open() is None
    assert cache_dir("off") is None
    monkeypatch.setenv(CACHE_VARIABLE, "")                             # empty: the default
    assert cache_dir() == Path.home() / ".cache" / "recorun" / "onnx"


def test_a_stored_export_is_read_back_whole_and_checked(tmp_path, facile_export):
    from recorun.server.export import onnx_session

    cache = OnnxCache(tmp_path / "cache")
    fingerprint = facile_export[4]
    assert cache.lookup("facile", fingerprint) is None                  # empty: a miss
    entry = store(cache, facile_export)
    assert entry == cache.entry_path("facile", fingerprint_key(fingerprint))
    assert sorted(p.name for p in entry.iterdir()) == ["entry.json", "model.onnx"]
    assert [p.name for p in cache.root.iterdir()] == [entry.name]        # no temporary folder
    hit = cache.lookup("facile", fingerprint)
    assert hit is not None and hit.data == facile_export[0].read_bytes()
    assert hit.origin == facile_export[3]
    np.testing.assert_array_equal(hit.reference, facile_export[1])
    assert hit.verify(onnx_session(hit.data)) <= ATOL + RTOL * np.abs(hit.reference).max()
    recorded = json.loads((entry / "entry.json").read_text())
    assert recorded["fingerprint"]["versions"]["torch"].startswith("2.")
    assert recorded["check"]["max_abs_diff"] == pytest.approx(facile_export[2])


def test_a_corrupt_or_unreadable_entry_is_a_miss_and_is_replaced(tmp_path, facile_export,
                                                                  caplog):
    cache = OnnxCache(tmp_path / "cache")
    fingerprint = facile_export[4]
    entry = store(cache, facile_export)
    onnx = entry / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF                                        # same size, one byte off
    onnx.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="recorun.server"):
        assert cache.lookup("facile", fingerprint) is None
    assert "corrupt entry" in caplog.text and str(entry) in caplog.text
    assert store(cache, facile_export) == entry                        # replaced, not kept
    assert cache.lookup("facile", fingerprint).data == facile_export[0].read_bytes()

    (entry / "entry.json").write_text("{not json")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recorun.server"):
        assert cache.lookup("facile", fingerprint) is None
    assert "unreadable entry" in caplog.text
    store(cache, facile_export)
    assert cache.lookup("facile", fingerprint) is not None
    assert sorted(p.name for p in cache.root.iterdir()) == [entry.name]  # nothing else left


def test_a_sound_entry_stays_unless_its_check_failed(tmp_path, facile_export):
    """A second server storing the same export keeps the first one's file; a server whose check
    of the cached file failed replaces it."""
    cache = OnnxCache(tmp_path / "cache")
    entry = store(cache, facile_export)
    inode = (entry / "model.onnx").stat().st_ino
    store(cache, facile_export)
    assert (entry / "model.onnx").stat().st_ino == inode
    store(cache, facile_export, replace=True)
    assert (entry / "model.onnx").stat().st_ino != inode
    assert cache.lookup("facile", facile_export[4]) is not None


def test_servers_storing_at_once_leave_one_sound_entry(tmp_path, facile_export):
    cache = OnnxCache(tmp_path / "cache")
    barrier = threading.Barrier(8)
    results, errors = [], []

    def one():
        try:
            barrier.wait(10)
            results.append(store(cache, facile_export))
        except Exception as exc:                   # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(set(results)) == 1
    assert [p.name for p in cache.root.iterdir()] == [results[0].name]
    assert cache.lookup("facile", facile_export[4]) is not None


def test_the_key_follows_the_weights_and_the_tools(tmp_path):
    import torch

    from recorun.server.models import make_model

    weights = tmp_path / "weights"
    weights.mkdir()
    seeded = fingerprint_key(export_fingerprint("facile", weights))    # no facile.pt there
    torch.manual_seed(3)
    torch.save({"state_dict": make_model("facile").state_dict(), "origin": "a"},
               weights / "facile.pt")
    first = fingerprint_key(export_fingerprint("facile", weights))
    assert first == fingerprint_key(export_fingerprint("facile", weights))
    torch.manual_seed(4)
    torch.save({"state_dict": make_model("facile").state_dict(), "origin": "b"},
               weights / "facile.pt")
    assert len({seeded, first, fingerprint_key(export_fingerprint("facile", weights))}) == 3
    fields = export_fingerprint("facile")
    assert set(fields["versions"]) == {"torch", "onnx", "onnxscript", "onnxruntime"}
    assert set(fields["code"]) == {"models.py", "export.py"}
    assert export_fingerprint("deepcalo")["inputs"] == [["electron_images", [4, 56, 11],
                                                         "float32"]]


def test_only_the_most_recently_used_entries_are_kept(tmp_path, facile_export):
    cache = OnnxCache(tmp_path / "cache")
    entries = []
    for n in range(KEEP_PER_MODEL + 2):
        fingerprint = {**facile_export[4], "weights": f"test weights {n}"}
        entries.append(store(cache, facile_export, fingerprint))
        os.utime(entries[-1], (n, 1_000_000 + n))                     # older to newer
    kept = sorted(p for p in cache.root.iterdir())
    assert len(kept) == KEEP_PER_MODEL and entries[-1] in kept
    assert entries[0] not in kept


def test_a_folder_others_may_write_to_is_not_used(tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="recorun.server"):
        assert OnnxCache.open(shared) is None
    assert "others may write to it" in caplog.text
    shared.chmod(0o700)
    assert OnnxCache.open(shared).root == shared


def test_cached_exports_need_no_torch():
    """What a start from the cache imports: the cache, the runtime and pytriton, no torch."""
    code = ("import sys; import recorun.server.serve, recorun.server.onnx_cache, "
            "recorun.server.export, recorun.server.weights; import onnxruntime; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- real servers -------------------------------------------------------------------------------

def work_directory(log: str) -> Path:
    for line in log.splitlines():
        if "work directory " in line:
            return Path(line.split("work directory ", 1)[1].split()[0])
    raise AssertionError("the server does not log its work directory")


def torch_answer(name: str, x: np.ndarray) -> np.ndarray:
    import torch

    from recorun.server.weights import load_model

    with torch.no_grad():
        return load_model(name)(torch.from_numpy(x)).numpy()


def infer(address: str, name: str, x: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    spec = SPECS[name]
    with grpcclient.InferenceServerClient(address) as client:
        tensor = grpcclient.InferInput(spec.inputs[0].name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer(name, [tensor]).as_numpy(spec.outputs[0].name)


def serve_facile(recorun_server_process, tmp_path, cache: Path, *, importtime=False):
    command = None
    if importtime:           # every module the server imports goes to its log (stderr)
        command = [sys.executable, "-X", "importtime", "-m", "recorun.server.cli"]
    return recorun_server_process.launch(
        "--models", "facile", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        log_dir=tmp_path, command=command,
        env=recorun_server_process.environment(**{CACHE_VARIABLE: str(cache)}))


def stop_cleanly(server) -> str:
    """SIGTERM, exit code 0, nothing left behind; the server's log."""
    shm_before = set(os.listdir("/dev/shm"))
    code = server.stop(signal.SIGTERM, timeout=60)
    log = server.log()
    assert code == 0, log[-4000:]
    assert session_members(server.pid) == [], "processes left behind"
    new_shm = {e for e in set(os.listdir("/dev/shm")) - shm_before
               if e.startswith(("pytrtion", "psm_"))}
    assert new_shm == set()
    assert not any(e.startswith(f"pytrtion{server.pid}-") for e in os.listdir("/dev/shm"))
    assert not work_directory(log).exists(), "work directory left behind"
    return log


@pytest.mark.server
def test_the_second_start_serves_the_cached_export_without_torch(tmp_path,
                                                                  recorun_server_process):
    cache = tmp_path / "cache"
    x = np.random.default_rng(7).standard_normal((64, 15)).astype(np.float32)
    want = torch_answer("facile", x)

    first = serve_facile(recorun_server_process, tmp_path, cache)
    np.testing.assert_allclose(infer(first.grpc, "facile", x), want, rtol=RTOL, atol=ATOL)
    log = stop_cleanly(first)
    assert "exported to ONNX and checked against torch, cached in" in log
    (entry,) = cache.iterdir()
    assert (entry / "model.onnx").is_file()

    second = serve_facile(recorun_server_process, tmp_path, cache, importtime=True)
    np.testing.assert_allclose(infer(second.grpc, "facile", x), want, rtol=RTOL, atol=ATOL)
    log = stop_cleanly(second)
    assert f"ONNX export from the cache {entry}" in log
    imported = {line.rsplit("|", 1)[1].strip() for line in log.splitlines()
                if line.startswith("import time:")}
    assert "pytriton" in imported and "onnxruntime" in imported     # the log is complete
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, \
        "a start from the cache imported torch"
    # the stop: models unloaded first, tritonserver had nothing left to wait for
    assert "tritonserver stopped" in log and "models unloaded first" in log
    assert "Found 1 live models" not in log


@pytest.mark.server
def test_a_corrupt_cache_entry_is_exported_again(tmp_path, recorun_server_process):
    cache = tmp_path / "cache"
    stop_cleanly(serve_facile(recorun_server_process, tmp_path, cache))
    (entry,) = cache.iterdir()
    onnx = entry / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])                         # a truncated write
    server = serve_facile(recorun_server_process, tmp_path, cache)
    x = np.random.default_rng(8).standard_normal((16, 15)).astype(np.float32)
    np.testing.assert_allclose(infer(server.grpc, "facile", x), torch_answer("facile", x),
                               rtol=RTOL, atol=ATOL)
    log = stop_cleanly(server)
    assert f"corrupt entry {entry}" in log
    assert "exported to ONNX and checked against torch, cached in" in log
    assert OnnxCache(cache).lookup("facile", export_fingerprint("facile")) is not None


@pytest.mark.server
def test_a_stop_with_a_request_in_flight_lets_it_finish(tmp_path, monkeypatch):
    """In this process, as a fallback server runs it: a DeepCalo batch is being computed when
    the stop comes; the stop takes pytriton's way (tritonserver lets it finish) and the client
    gets its answer."""
    import io

    import tritonclient.grpc as grpcclient

    from recorun.server.serve import RecorunServer, ServerOptions

    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "cache"))
    server = RecorunServer(ServerOptions(models=("deepcalo",), grpc_port=0, http_port=0,
                                         metrics_port=0), log=io.StringIO())
    endpoints = server.start()
    x = np.random.default_rng(9).standard_normal((1024, 4, 56, 11)).astype(np.float32)
    answers: list = []
    client = grpcclient.InferenceServerClient(endpoints.grpc)
    try:
        tensor = grpcclient.InferInput("electron_images", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        client.async_infer("deepcalo", [tensor],
                           callback=lambda result, error: answers.append((result, error)))
        deadline = time.monotonic() + 30
        while server._running.count == 0:                  # until the batch is being computed
            assert not answers, "the request was answered before it was seen running"
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.001)
        server.stop()
    finally:
        client.close()
        server.stop()
    (result, error), = answers
    assert error is None, error
    np.testing.assert_allclose(result.as_numpy("energy"), torch_answer("deepcalo", x),
                               rtol=1e-3, atol=1e-4)
    assert "in flight" in server.stop_path and not server.is_alive()
