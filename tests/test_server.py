"""``recorun-server``: a real Triton server (pytriton) answering real gRPC requests.

One server with all three models runs for the whole session (``triton_server`` in conftest.py,
free ports); the shutdown tests start their own FACILE-only servers, and the failure and export
tests run the command to completion. Processes are only ever signalled by PID or process group.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException
from recorun.server.export import TritonModelOptions, config_pbtxt, import_onnxruntime
from recorun.model_specs import SPECS
from recorun.server.models import make_model
from recorun.server.weights import INIT_SEED, load_model, origin

from proc_session import session_members

pytestmark = pytest.mark.server

MODELS = tuple(SPECS)
REPO = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-4, 1e-5          # onnxruntime (server) against torch (here), float32


@pytest.fixture
def run_cli(recorun_server_process):
    """``run_cli(*args, timeout=180, env=None)``: recorun-server run to completion."""
    def run(*args: str, timeout: float = 180, env: dict | None = None
            ) -> subprocess.CompletedProcess:
        return subprocess.run([*recorun_server_process.command(), *args], capture_output=True,
                              check=False, text=True, timeout=timeout, start_new_session=True,
                              env=env or recorun_server_process.environment())
    return run


def random_batch(name: str, batch: int, seed: int = 0) -> np.ndarray:
    shape = SPECS[name].inputs[0].shape
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


def infer(client, name: str, x: np.ndarray) -> np.ndarray:
    spec = SPECS[name]
    request = grpcclient.InferInput(spec.inputs[0].name, list(x.shape), "FP32")
    request.set_data_from_numpy(x)
    result = client.infer(name, [request],
                          outputs=[grpcclient.InferRequestedOutput(spec.outputs[0].name)])
    return result.as_numpy(spec.outputs[0].name)


def torch_reference(name: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return load_model(name)(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def client(triton_server):
    with grpcclient.InferenceServerClient(triton_server.grpc) as c:
        yield c


def metric(server, line_start: str) -> float:
    text = urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starting with {line_start!r}")


# --- the session server -------------------------------------------------------------------------

def test_ready_line_names_free_ports_on_localhost(triton_server, client):
    assert re.fullmatch(r"READY grpc=127\.0\.0\.1:\d+ http=127\.0\.0\.1:\d+ "
                        r"metrics=127\.0\.0\.1:\d+", triton_server.ready_line)
    ports = {int(a.rsplit(":", 1)[1]) for a in (triton_server.grpc, triton_server.http,
                                                triton_server.metrics)}
    assert len(ports) == 3 and 0 not in ports
    assert client.is_server_ready()
    assert all(client.is_model_ready(name) for name in MODELS)
    health = urllib.request.urlopen(f"http://{triton_server.http}/v2/health/ready", timeout=10)
    assert health.status == 200


@pytest.mark.parametrize("name, batch", [("facile", 4500), ("deepcalo", 7), ("resnet50", 3)])
def test_inference_matches_torch(client, name, batch):
    x = random_batch(name, batch, seed=batch)
    got = infer(client, name, x)
    want = torch_reference(name, x)
    assert got.shape == want.shape == (batch, *SPECS[name].outputs[0].shape)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", MODELS)
def test_metadata_and_config(client, name):
    spec = SPECS[name]
    meta = client.get_model_metadata(name, as_json=True)
    assert meta["name"] == name
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] \
        == [(t.name, "FP32", [-1, *t.shape]) for t in spec.inputs]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] \
        == [(t.name, "FP32", [-1, *t.shape]) for t in spec.outputs]

    config = client.get_model_config(name).config
    assert config.name == name
    assert config.max_batch_size == spec.max_batch_size >= spec.event_batch
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] \
        == [(t.name, model_config_pb2.TYPE_FP32, list(t.shape)) for t in spec.inputs]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] \
        == [(t.name, model_config_pb2.TYPE_FP32, list(t.shape)) for t in spec.outputs]
    assert config.HasField("dynamic_batching")
    wanted = [b for b in (10, 4500) if b <= spec.max_batch_size]
    assert list(config.dynamic_batching.preferred_batch_size) == wanted
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert sum(group.count for group in config.instance_group) == 1
    # the weights' origin is published with the model
    assert config.parameters["weights_origin"].string_value == origin(name)
    assert "onnxruntime" in config.parameters["recorun_runtime"].string_value


def test_batch_above_max_batch_size_is_rejected(client):
    too_big = SPECS["facile"].max_batch_size + 1
    with pytest.raises(InferenceServerException) as error:
        infer(client, "facile", np.zeros((too_big, 15), np.float32))
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"batch-size must be <= {too_big - 1}" in error.value.message()


def test_wrong_shape_is_rejected(client):
    with pytest.raises(InferenceServerException) as error:
        infer(client, "facile", np.zeros((4, 14), np.float32))
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("name", MODELS)
def test_paper_batch_per_event_is_accepted(client, name):
    batch = SPECS[name].event_batch            # FACILE 16000, DeepCalo 5, ResNet-50 10
    out = infer(client, name, random_batch(name, batch, seed=3))
    assert out.shape == (batch, *SPECS[name].outputs[0].shape)
    assert np.isfinite(out).all()


def test_prometheus_metrics_count_inferences(triton_server, client):
    count = 'nv_inference_count{model="deepcalo",version="1"}'
    executions = 'nv_inference_exec_count{model="deepcalo",version="1"}'
    before, exec_before = metric(triton_server, count), metric(triton_server, executions)
    for _ in range(3):
        infer(client, "deepcalo", random_batch("deepcalo", 5))
    deadline = time.monotonic() + 10
    while metric(triton_server, count) < before + 15 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(triton_server, count) == before + 15
    assert metric(triton_server, executions) >= exec_before + 1
    for name in ("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                 "nv_inference_request_success"):
        assert metric(triton_server, f'{name}{{model="deepcalo"') >= 0


def test_statistics_open_model_repository_restricted(client):
    stats = client.get_inference_statistics("facile", as_json=True)
    assert stats["model_stats"][0]["name"] == "facile"
    # model-repository stays behind pytriton's token (a name that does not exist, so that
    # nothing could be unloaded if it were open)
    with pytest.raises(InferenceServerException) as error:
        client.unload_model("no_such_model")
    assert "access-token" in error.value.message()


# --- the command line ---------------------------------------------------------------------------

def test_list_shows_models_shapes_and_origin(run_cli):
    result = run_cli("--list")
    assert result.returncode == 0, result.stderr
    for name, spec in SPECS.items():
        assert re.search(rf"^{name}$", result.stdout, re.MULTILINE)
        assert f"max_batch_size {spec.max_batch_size}" in result.stdout
        assert f"{spec.inputs[0].name} [-1, {', '.join(map(str, spec.inputs[0].shape))}]" \
            in result.stdout
        assert f"weights {origin(name)}" in result.stdout


def test_list_reads_a_weights_dir(tmp_path, run_cli):
    torch.manual_seed(INIT_SEED + 1)
    torch.save({"state_dict": make_model("facile").state_dict(),
                "origin": "test checkpoint: seed 2022"}, tmp_path / "facile.pt")
    result = run_cli("--list", "--models", "facile", "--weights-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "weights test checkpoint: seed 2022" in result.stdout


def test_list_with_unusable_weights_fails_and_a_missing_weights_dir_is_a_usage_error(
        tmp_path, run_cli):
    (tmp_path / "facile.pt").write_bytes(b"not a checkpoint")
    result = run_cli("--list", "--models", "facile", "--weights-dir", str(tmp_path))
    assert result.returncode == 1
    assert "weights UNUSABLE" in result.stdout and "cannot be read as a checkpoint" in result.stdout
    assert "unusable weights for facile" in result.stderr
    result = run_cli("--list", "--weights-dir", str(tmp_path / "typo"))
    assert result.returncode == 2
    assert f"{tmp_path / 'typo'} is not a directory" in result.stderr


def test_unknown_model_is_a_usage_error(run_cli):
    result = run_cli("--models", "facile,bert")
    assert result.returncode == 2
    assert "unknown model 'bert'" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_device_is_a_clear_error(run_cli):
    result = run_cli("--models", "facile", "--device", "cuda", "--grpc-port", "0",
                     "--http-port", "0", "--metrics-port", "0")
    assert result.returncode == 2
    assert "--device cuda" in result.stderr and "CUDA" in result.stderr
    assert "READY" not in result.stdout


# --- failures and shutdown ----------------------------------------------------------------------

def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def work_directory(log: str) -> Path:
    match = re.search(r"work directory (\S+)", log)
    assert match, "the server does not log its work directory"
    return Path(match.group(1))


def assert_nothing_left(pid: int, shm_before: set[str], log: str, cache_home: Path) -> None:
    deadline = time.monotonic() + 10
    while session_members(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_members(pid) == [], "processes left behind"
    new_shm = {e for e in shm_entries() - shm_before
               if e.startswith(("pytrtion", "psm_"))}
    assert new_shm == set(), f"/dev/shm regions left behind: {new_shm}"
    assert not any(e.startswith(f"pytrtion{pid}-") for e in shm_entries())
    assert not work_directory(log).exists(), "work directory (PYTRITON_HOME) left behind"
    written = sorted(str(p.relative_to(cache_home)) for p in cache_home.rglob("*")
                     if p.is_file())            # recorun's ONNX cache, and nothing else
    assert all(w.startswith("recorun/onnx/") for w in written), \
        f"something other than recorun's ONNX cache wrote to the user's cache: {written}"


@pytest.fixture
def cache_home(tmp_path):
    """An empty XDG_CACHE_HOME for a server: pytriton's default home (~/.cache/pytriton) and
    onnxruntime's telemetry must stay unused; only recorun's ONNX cache goes there."""
    home = tmp_path / "xdg-cache"
    home.mkdir()
    return home


def test_sigterm_stops_cleanly_torch_backend_without_dynamic_batching(tmp_path, cache_home, recorun_server_process):
    shm_before = shm_entries()
    server = recorun_server_process.launch(
        "--models", "facile", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        "--backend", "torch", "--no-dynamic-batching", "--max-batch-size", "64",
        "--instances", "2", log_dir=tmp_path,
        env=recorun_server_process.environment(XDG_CACHE_HOME=str(cache_home)))
    try:
        with grpcclient.InferenceServerClient(server.grpc) as c:
            config = c.get_model_config("facile").config
            assert config.max_batch_size == 64
            assert not config.HasField("dynamic_batching")
            assert sum(group.count for group in config.instance_group) == 2
            assert "torch" in config.parameters["recorun_runtime"].string_value
            x = random_batch("facile", 64, seed=5)
            np.testing.assert_allclose(infer(c, "facile", x), torch_reference("facile", x),
                                       rtol=1e-5, atol=1e-6)
            with pytest.raises(InferenceServerException, match="batch-size must be <= 64"):
                infer(c, "facile", random_batch("facile", 65))
    finally:
        code = server.stop(signal.SIGTERM, timeout=30)   # fails the test past 30 s
    assert code == 0, server.log()[-4000:]
    assert server.rest_of_stdout == ""
    assert_nothing_left(server.pid, shm_before, server.log(), cache_home)


def test_sigint_to_the_process_group_stops_cleanly(tmp_path, cache_home, recorun_server_process):
    """A terminal's Ctrl-C: SIGINT to recorun-server, tritonserver and the helpers at once."""
    shm_before = shm_entries()
    server = recorun_server_process.launch(
        "--models", "facile", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        log_dir=tmp_path, env=recorun_server_process.environment(XDG_CACHE_HOME=str(cache_home)))
    code = server.stop(signal.SIGINT, group=True, timeout=30)   # fails the test past 30 s
    assert code == 0, server.log()[-4000:]
    assert "SIGINT received" in server.log()
    assert_nothing_left(server.pid, shm_before, server.log(), cache_home)


def test_corrupt_weights_fail_to_load_with_a_clear_message(tmp_path, cache_home, recorun_server_process, run_cli):
    """A real fault: a facile.pt that is not a checkpoint (the first KiB of a valid one)."""
    weights = tmp_path / "weights"
    weights.mkdir()
    buffer = tmp_path / "valid.pt"
    torch.save({"state_dict": make_model("facile").state_dict(), "origin": "x"}, buffer)
    (weights / "facile.pt").write_bytes(buffer.read_bytes()[:1024])
    shm_before = shm_entries()
    result = run_cli("--models", "facile,deepcalo", "--weights-dir", str(weights),
                     "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
                     env=recorun_server_process.environment(XDG_CACHE_HOME=str(cache_home)),
                     timeout=120)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "a model failed to load: model 'facile': " in result.stderr
    assert "cannot be read as a checkpoint (damaged, truncated or not one)" in result.stderr
    assert str(weights / "facile.pt") in result.stderr
    assert not work_directory(result.stderr).exists()
    new_shm = {e for e in shm_entries() - shm_before if e.startswith(("pytrtion", "psm_"))}
    assert new_shm == set()


def test_in_process_server_retries_when_a_chosen_port_is_taken(monkeypatch):
    """RecorunServer in this process (as a fallback server would run it): the first free port
    it picks is taken by someone else before tritonserver binds it; it retries with others."""
    import io
    import socket

    from recorun.server import serve

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    picks, original = [], serve.free_ports

    def free_ports(address, count):
        ports = original(address, count)
        if not picks:
            ports[0] = squatter.getsockname()[1]          # the gRPC port, already taken
        picks.append(ports)
        return ports

    monkeypatch.setattr(serve, "free_ports", free_ports)
    home_before = os.environ.get("PYTRITON_HOME")
    log = io.StringIO()
    server = serve.RecorunServer(serve.ServerOptions(
        models=("facile",), grpc_port=0, http_port=0, metrics_port=0), log=log)
    try:
        with server:
            workdir = server._tmp
            assert len(picks) == 2
            assert server.endpoints.grpc_port != squatter.getsockname()[1]
            assert "already in use" in log.getvalue()
            with grpcclient.InferenceServerClient(server.endpoints.grpc) as c:
                x = random_batch("facile", 16)
                np.testing.assert_allclose(infer(c, "facile", x), torch_reference("facile", x),
                                           rtol=RTOL, atol=ATOL)
    finally:
        squatter.close()
    assert not server.is_alive()
    assert not workdir.exists()
    assert os.environ.get("PYTRITON_HOME") == home_before


def test_a_model_tritonserver_refuses_is_a_start_error_with_its_log(monkeypatch):
    """Fault injection on tritonserver's side: the python backend is pointed at an execution
    environment that does not exist, so tritonserver fails to load the model."""
    import io

    from recorun.server import serve

    publish = serve.RecorunServer._publish_parameters

    def publish_and_break(self, triton):
        done = publish(self, triton)
        for model in triton._model_manager.models:
            model._get_triton_model_config().backend_parameters["EXECUTION_ENV_PATH"] = \
                "/nonexistent/fault-injection.tar.gz"
        return done

    monkeypatch.setattr(serve.RecorunServer, "_publish_parameters", publish_and_break)
    server = serve.RecorunServer(serve.ServerOptions(
        models=("facile",), grpc_port=0, http_port=0, metrics_port=0), log=io.StringIO())
    with pytest.raises(serve.ServerStartError, match="load failed for model 'facile'") as error:
        server.start()
    assert "fault-injection.tar.gz" in error.value.log
    assert server._tmp is None and not server.is_alive()


# --- the Triton model repository for the official container -------------------------------------

def test_export_writes_a_model_repository(tmp_path, run_cli):
    repo = tmp_path / "repo"
    result = run_cli("export", str(repo), "--models", "all", "--instances", "2",
                     "--preferred-batch-size", "5", "4500", "--max-queue-delay-us", "50",
                     "--device-kind", "gpu", timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ort = import_onnxruntime()
    for name, spec in SPECS.items():
        files = sorted(str(p.relative_to(repo / name)) for p in (repo / name).rglob("*"))
        assert files == ["1", "1/model.onnx", "config.pbtxt"]      # no .onnx.data side file
        config = text_format.Parse((repo / name / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        assert config.name == name
        assert config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == spec.max_batch_size
        assert [(t.name, t.data_type, list(t.dims)) for t in config.input] \
            == [(t.name, model_config_pb2.TYPE_FP32, list(t.shape)) for t in spec.inputs]
        assert [(t.name, t.data_type, list(t.dims)) for t in config.output] \
            == [(t.name, model_config_pb2.TYPE_FP32, list(t.shape)) for t in spec.outputs]
        assert list(config.dynamic_batching.preferred_batch_size) \
            == [b for b in (5, 4500) if b <= spec.max_batch_size]
        assert config.dynamic_batching.max_queue_delay_microseconds == 50
        assert [(g.count, g.kind) for g in config.instance_group] \
            == [(2, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
        assert config.parameters["weights_origin"].string_value == origin(name)

        session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [spec.inputs[0].name]
        assert [o.name for o in session.get_outputs()] == [spec.outputs[0].name]
        x = random_batch(name, 4, seed=11)
        np.testing.assert_allclose(session.run(None, {spec.inputs[0].name: x})[0],
                                   torch_reference(name, x), rtol=RTOL, atol=ATOL)


def test_config_pbtxt_without_dynamic_batching_on_cpu():
    text = config_pbtxt(SPECS["deepcalo"], TritonModelOptions(
        max_batch_size=8, instances=3, dynamic_batching=False, device_kind="cpu"),
        origin='a "quoted"\norigin, \u00e9')
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.max_batch_size == 8
    assert not config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] \
        == [(3, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert config.parameters["weights_origin"].string_value == 'a "quoted"\norigin, \u00e9'


def test_model_code_imports_without_framework_or_triton():
    """A GPU site runs server/ alone: the models, weights and export need no framework, no
    Triton client and no Triton server."""
    code = ("import sys; import recorun.server.models, recorun.server.weights, server.export; "
            "bad = [m for m in ('framework', 'modules', 'tritonclient', 'pytriton') "
            "if m in sys.modules]; assert not bad, bad")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
