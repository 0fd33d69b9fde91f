"""SONIC clients against real Triton servers (recorun-server) over real gRPC.

Servers: the session's ``triton_server`` (all three models) for the normal cases; a module
server ``small`` (FACILE only, ``--max-batch-size 1000``) for batch splitting, for "a server that
does not serve the model" and as a preferred server; a ``victim`` (FACILE) whose tritonserver is
killed (SIGKILL by PID) mid-run for failover and exhausted tries; fallback servers started by
the registry itself. Timeouts use :class:`DelayingProxy`, a fault-injecting TCP proxy that delays
every byte between the client and a real server.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recorun import Analyzer, ExternalWorkProducer, InputTag, Param, Producer
from recorun.sonic_clients import (
    ClientConfig,
    ClientConfigError,
    InferenceError,
    make_client,
    parse_duration,
)
from recorun.processes import group_alive
from recorun.sonic_clients.fallback import running_servers
from recorun.sonic_clients.inprocess import InProcessClient
from recorun.sonic_clients.registry import ServerRegistry, default_registry
from recorun.sonic_clients.triton import TritonClient

pytestmark = pytest.mark.server

RTOL, ATOL = 1e-4, 1e-5
INPUT = {"facile": "hcal_channels", "deepcalo": "electron_images", "resnet50": "jet_images"}
ROW = {"facile": (15,), "deepcalo": (4, 56, 11), "resnet50": (3, 224, 224)}
OUTPUT = {"facile": "energy", "deepcalo": "energy", "resnet50": "scores"}


def batch(model: str, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {INPUT[model]: rng.standard_normal((rows, *ROW[model])).astype(np.float32)}


def reference(model: str, inputs: dict, backend: str = "onnxruntime") -> np.ndarray:
    """The model run in this process (the in-process client, sync)."""
    client = InProcessClient(ClientConfig(model, client="inprocess", backend=backend,
                                          mode="sync"))
    try:
        return client.infer_blocking(inputs)[OUTPUT[model]]
    finally:
        client.end_job()


class Collector:
    """``done`` callbacks for many calls: records (tag, outputs, error, thread)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.results: dict = {}
        self.all_done = threading.Condition(self.lock)

    def done_for(self, tag):
        def done(outputs, error):
            with self.lock:
                assert tag not in self.results, f"done called twice for {tag}"
                self.results[tag] = (outputs, error, threading.current_thread().name)
                self.all_done.notify_all()
        return done

    def wait(self, count: int, timeout: float = 60.0) -> dict:
        with self.lock:
            if not self.all_done.wait_for(lambda: len(self.results) >= count, timeout):
                pytest.fail(f"only {len(self.results)} of {count} calls finished in {timeout} s")
            return dict(self.results)


# --- fault injection -------------------------------------------------------------------------

class DelayingProxy:
    """FAULT INJECTION: a TCP proxy on 127.0.0.1 that forwards to ``target`` (``host:port``)
    and holds every chunk of bytes, in both directions, for ``delay_s`` seconds (settable at
    any time) before passing it on, in order. gRPC through it works, just slower: a request
    takes at least two delays (request there, answer back)."""

    def __init__(self, target: str, delay_s: float = 0.0):
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.delay_s = delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="delaying-proxy").start()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                pending: queue.Queue = queue.Queue()
                threading.Thread(target=self._read, args=(src, pending), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, pending), daemon=True).start()

    def _read(self, src, pending):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            pending.put((time.monotonic() + self.delay_s, data))
            if not data:
                return

    def _write(self, dst, pending):
        while True:
            due, data = pending.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self):
        self._closed = True
        self._listener.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tritonserver_pid(server) -> int:
    """The PID of the tritonserver process that recorun-server ``server`` runs."""
    children = []
    for task in Path(f"/proc/{server.pid}/task").iterdir():
        children += (task / "children").read_text().split()
    for pid in children:
        if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver":
            return int(pid)
    raise AssertionError(f"recorun-server {server.pid} has no tritonserver child ({children})")


def triton_folders() -> set[Path]:
    """tritonserver's local copies of its model repository (``/tmp/folderXXXXXX``), removed by
    tritonserver on a clean stop but left behind when it is killed."""
    return set(Path("/tmp").glob("folder*"))


# --- servers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_server(tmp_path_factory, recorun_server_process):
    """FACILE only, max_batch_size 1000."""
    server = recorun_server_process.launch(
        "--models", "facile", "--max-batch-size", "1000", "--grpc-port", "0",
        "--http-port", "0", "--metrics-port", "0",
        log_dir=tmp_path_factory.mktemp("small-server"))
    yield server
    assert server.stop(signal.SIGTERM) == 0, server.log()[-3000:]


@pytest.fixture(scope="module")
def registry(triton_server, small_server):
    """'main' (the session server, all models) and 'small' (FACILE, max batch 1000)."""
    reg = ServerRegistry(servers=[{"name": "main", "address": triton_server.grpc},
                                  {"name": "small", "address": small_server.grpc}],
                         fallback=False)
    reg.begin_job()
    yield reg
    reg.end_job()
    assert not reg.fallback_servers()


@pytest.fixture(autouse=True)
def no_fallback_left_behind():
    yield
    left = running_servers()
    for server in left:
        server.stop()
    assert not left, f"fallback servers still running after the test: {left}"


# --- configuration ---------------------------------------------------------------------------

def test_parse_duration():
    assert parse_duration("500 ms") == pytest.approx(0.5)
    assert parse_duration("5 s") == 5.0
    assert parse_duration("2 min") == 120.0
    assert parse_duration("250us") == pytest.approx(250e-6)
    assert parse_duration("1.5") == 1.5
    assert parse_duration(3) == 3.0
    for bad in ("fast", "5 parsecs", "-1 s", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_client_config():
    config = ClientConfig.from_dict({"model": "facile", "timeout": "500 ms", "mode": "sync"})
    assert config.timeout_s == pytest.approx(0.5) and config.tries == 3
    assert ClientConfig("facile", version=1).version == "1"
    with pytest.raises(ClientConfigError, match="mode.*'asnyc'.*did you mean 'async'"):
        ClientConfig("facile", mode="asnyc")
    with pytest.raises(ClientConfigError, match="timeout_s"):
        ClientConfig("facile", timeout_s="soon")
    with pytest.raises(ClientConfigError, match="tries"):
        ClientConfig("facile", tries=0)
    with pytest.raises(ClientConfigError, match="unknown key 'timout'.*did you mean 'timeout_s'"):
        ClientConfig.from_dict({"model": "facile", "timout": 1})


def test_registry_parameters(triton_server):
    from recorun.framework.params import ParamError
    from recorun.framework.registry import load

    assert load("service", "ServerRegistry") is ServerRegistry
    with pytest.raises(ParamError, match="host:port"):
        ServerRegistry(servers=[{"name": "a", "address": "nowhere"}])
    with pytest.raises(ParamError, match="unknown key 'adress'.*did you mean 'address'"):
        ServerRegistry(servers=[{"name": "a", "adress": "h:1"}])
    with pytest.raises(ParamError, match="used twice"):
        ServerRegistry(servers=[{"name": "a", "address": "h:1"}, {"name": "a", "address": "h:2"}])
    with pytest.raises(ParamError, match="--grpc-port"):
        ServerRegistry(fallback_options=["--grpc-port", "9000"])
    reg = ServerRegistry(servers=[{"name": "main", "address": triton_server.grpc}])
    with pytest.raises(ClientConfigError, match="preferred server 'mian'.*did you mean 'main'"):
        reg.client_for(ClientConfig("facile", server="mian"))
    bad = ServerRegistry(fallback_options=["--instances", "zero"])
    with pytest.raises(ClientConfigError, match="fallback_options"):
        bad.client_for(ClientConfig("facile"))
    reg.end_job()
    bad.end_job()


# --- outputs: Triton in every mode = in-process ----------------------------------------------

@pytest.mark.parametrize("mode", ["async", "sync", "pseudo-async"])
@pytest.mark.parametrize("model,rows", [("facile", 4500), ("deepcalo", 5)])
def test_triton_matches_inprocess(registry, model, rows, mode):
    inputs = batch(model, rows, seed=rows)
    want = reference(model, inputs)
    client = registry.client_for(ClientConfig(model, mode=mode, server="main"))
    try:
        described = client.describe()
        assert described["inputs"] == {INPUT[model]: (ROW[model], np.dtype("float32"))}
        assert described["outputs"][OUTPUT[model]] == ((1,), np.dtype("float32"))
        assert "server 'main'" in described["servers"][0]
        collector = Collector()
        returned = threading.Event()
        client.infer(inputs, collector.done_for("x"))
        returned.set()
        outputs, error, thread = collector.wait(1)["x"]
        assert error is None
        assert outputs[OUTPUT[model]].shape == (rows, 1)
        np.testing.assert_allclose(outputs[OUTPUT[model]], want, rtol=RTOL, atol=ATOL)
        if mode == "sync":
            assert thread == threading.current_thread().name
        elif mode == "pseudo-async":
            assert thread != threading.current_thread().name
        # async: gRPC's thread calls back, or this one when the answer is in before the
        # callback is registered (a future already done runs it at once): either may be seen
        timing = client.timing()
        requests = -(-rows // described["max_batch_size"])      # 'small' serves FACILE too
        assert timing["calls"] == 1 and timing["requests"] == requests
        assert timing["failures"] == 0 and timing["retries"] == 0
        assert timing["bytes_sent"] == inputs[INPUT[model]].nbytes
        assert timing["roundtrip_s"] > 0 and timing["rows"] == rows
    finally:
        registry.release(client)


def test_resnet50_quick(registry):
    inputs = batch("resnet50", 2, seed=3)
    want = reference("resnet50", inputs, backend="torch")     # no 7 s ONNX export here
    client = registry.client_for(ClientConfig("resnet50", mode="async", compression="gzip"))
    try:
        assert client.describe()["max_batch_size"] == 32
        scores = client.infer_blocking(inputs, timeout=60)["scores"]
    finally:
        client.end_job()
    assert scores.shape == (2, 2)
    np.testing.assert_allclose(scores, want, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("mode", ["async", "pseudo-async", "sync"])
def test_inprocess_modes_and_backends(mode):
    inputs = batch("facile", 3000, seed=7)
    onnx = reference("facile", inputs)
    torch_out = reference("facile", inputs, backend="torch")
    np.testing.assert_allclose(onnx, torch_out, rtol=1e-3, atol=1e-4)
    client = default_registry().client_for(ClientConfig("facile", client="inprocess",
                                                        mode=mode))
    try:
        assert client.describe()["max_batch_size"] == 16384
        collector = Collector()
        client.infer(inputs, collector.done_for("x"))
        outputs, error, thread = collector.wait(1)["x"]
    finally:
        client.end_job()
    assert error is None
    assert (thread == threading.current_thread().name) == (mode == "sync")
    np.testing.assert_allclose(outputs["energy"], onnx, rtol=RTOL, atol=ATOL)
    assert not default_registry().fallback_servers()


# --- batches ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["async", "sync", "pseudo-async"])
def test_batch_splitting(registry, triton_server, mode):
    """'small' takes at most 1000 rows per request: 2500 rows go as 1000 + 1000 + 500 and come
    back in order, equal to one request of 2500 rows on 'main'."""
    inputs = batch("facile", 2500, seed=11)
    split = registry.client_for(ClientConfig("facile", mode=mode, server="small"))
    whole = registry.client_for(ClientConfig("facile", mode=mode, server="main"))
    try:
        assert split.describe()["max_batch_size"] == 1000      # the smallest of its servers
        assert "server 'small'" in split.describe()["servers"][0]
        assert whole.describe()["max_batch_size"] == 1000      # it may fail over to 'small'
        one = TritonClient(ClientConfig("facile", mode=mode), [triton_server.grpc])
        one.begin_job()
        assert one.describe()["max_batch_size"] == 16384
        got = split.infer_blocking(inputs, timeout=60)["energy"]
        want = one.infer_blocking(inputs, timeout=60)["energy"]
        one.end_job()
    finally:
        registry.release(split)
        registry.release(whole)
    assert split.timing()["requests"] == 3 and one.timing()["requests"] == 1
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("client_kind", ["triton", "inprocess"])
@pytest.mark.parametrize("mode", ["async", "sync", "pseudo-async"])
def test_batch_of_zero_rows(registry, mode, client_kind):
    client = registry.client_for(ClientConfig("deepcalo", mode=mode, client=client_kind,
                                              backend="torch"))
    try:
        collector = Collector()
        client.infer({"electron_images": np.empty((0, 4, 56, 11), np.float32)},
                     collector.done_for("empty"))
        assert "empty" in collector.results              # called before infer returned
        outputs, error, _ = collector.results["empty"]
    finally:
        client.end_job()
    assert error is None
    assert outputs["energy"].shape == (0, 1) and outputs["energy"].dtype == np.float32
    assert client.timing()["requests"] == 0


def test_validate_names_model_and_tensor(registry):
    client = registry.client_for(ClientConfig("facile", mode="sync"))
    try:
        client.validate({"hcal_channels": ((15,), np.float32)})          # fits
        with pytest.raises(ClientConfigError,
                           match="model 'facile'.*'hcal_channel' is not an input.*did you mean "
                                 "'hcal_channels'"):
            client.validate({"hcal_channel": ((15,), np.float32)})
        with pytest.raises(ClientConfigError,
                           match=r"model 'facile'.*input 'hcal_channels' has shape per row "
                                 r"\[14\], the model expects \[15\]"):
            client.validate({"hcal_channels": ((14,), np.float32)})
        with pytest.raises(ClientConfigError,
                           match="model 'facile'.*input 'hcal_channels' has dtype float64, the "
                                 "model expects float32"):
            client.validate({"hcal_channels": ((15,), np.float64)})
        with pytest.raises(ClientConfigError, match="model 'facile'.*'hcal_channels' is missing"):
            client.validate({})
        with pytest.raises(ClientConfigError, match="hcal_channels.*float64"):
            client.infer({"hcal_channels": np.zeros((3, 15))}, lambda o, e: None)
        assert client.timing()["calls"] == 0
    finally:
        client.end_job()


def test_make_client_uses_the_workflows_registry(registry, triton_server):
    client = make_client({"model": "facile", "mode": "sync"}, {"reg": registry})
    assert client.registry is registry
    client.end_job()
    assert client.registry is None
    other = ServerRegistry(servers=[{"name": "main", "address": triton_server.grpc}])
    with pytest.raises(ClientConfigError, match="several ServerRegistry"):
        make_client(ClientConfig("facile"), {"a": registry, "b": other})
    assert make_client.__module__ == "recorun.sonic_clients"


# --- fallback server -------------------------------------------------------------------------

def test_fallback_server_when_no_server_is_configured():
    """The default registry (no servers) starts ONE fallback server, for every model asked for
    so far, at the first request, and stops it when its last client is released: its process
    group is gone."""
    inputs = batch("facile", 100, seed=5)
    want = reference("facile", inputs)
    reg = default_registry()
    client = make_client(ClientConfig("facile", mode="async"), {})
    other = make_client(ClientConfig("deepcalo", mode="sync"), None)
    assert client.registry is reg and other.registry is reg
    assert client.describe()["max_batch_size"] == 16384         # from the spec, before start
    assert not reg.fallback_servers()                           # lazily started
    got = client.infer_blocking(inputs, timeout=200)["energy"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert other.infer_blocking(batch("deepcalo", 3))["energy"].shape == (3, 1)
    (server,) = reg.fallback_servers()
    assert server.models == ("facile", "deepcalo")
    assert server.running and group_alive(server.pid)
    assert "server 'fallback' (127.0.0.1:" in client.describe()["servers"][0]
    client.end_job()                                            # = reg.release(client)
    assert server.running                                       # 'other' still holds it
    reg.release(other)
    assert not server.running and server.exit_code == 0
    assert not group_alive(server.pid)                          # no child processes left
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    assert not server.log_path.exists()                         # log removed on a clean stop
    assert not reg.fallback_servers() and reg.status()["clients"] == 0


CHILD = """
import sys, time
from recorun.sonic_clients import ClientConfig, make_client
from recorun.sonic_clients.registry import default_registry
client = make_client(ClientConfig("facile"), {})
(server,) = default_registry().start_fallback()
print(server.pid, server.log_path, flush=True)
time.sleep(300)
"""


def test_fallback_server_never_outlives_the_job(tmp_path):
    """A job that is interrupted (SIGINT: atexit stops the server) or killed outright
    (SIGKILL: no atexit; the kernel's parent-death signal stops it) leaves no server."""
    import subprocess
    import sys

    children = {how: subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)
                for how in (signal.SIGINT, signal.SIGKILL)}
    servers = {}
    try:
        for how, child in children.items():
            pid, log = child.stdout.readline().split()      # once its server is READY
            servers[how] = (int(pid), Path(log))
            assert group_alive(int(pid))
        for how, child in children.items():
            child.send_signal(how)
        for how, child in children.items():
            child.wait(60)
            pid, log = servers[how]
            deadline = time.monotonic() + 30
            while group_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not group_alive(pid), f"the fallback server outlived a job ended by {how!r}"
    finally:
        for how, child in children.items():
            if child.poll() is None:
                child.kill()
            child.stdout.close()
            if how in servers and group_alive(servers[how][0]):
                os.killpg(servers[how][0], signal.SIGKILL)
    assert not servers[signal.SIGINT][1].exists()          # atexit's clean stop removed it
    import shutil
    shutil.rmtree(servers[signal.SIGKILL][1].parent, ignore_errors=True)   # no atexit there


def test_unreachable_and_unserving_servers_are_skipped_with_fallback_true(small_server, caplog):
    """With ``fallback: true`` set: 'dead' is not reachable (skipped, with a warning); 'small'
    serves FACILE but not DeepCalo: FACILE goes to 'small', DeepCalo to the fallback server."""
    dead = f"127.0.0.1:{free_port()}"
    reg = ServerRegistry(servers=[{"name": "dead", "address": dead},
                                  {"name": "small", "address": small_server.grpc}],
                         fallback=True)
    with caplog.at_level(logging.WARNING, logger="recorun.sonic_clients"):
        reg.begin_job()
        facile = reg.client_for(ClientConfig("facile", server="dead"))
        deepcalo = reg.client_for(ClientConfig("deepcalo", mode="pseudo-async"))
    text = caplog.text
    assert f"server 'dead' ({dead}) is not reachable" in text and "skipped" in text
    assert "preferred server 'dead' does not serve model 'facile'" in text
    assert "does not serve model 'deepcalo'" in text and "fallback" in text
    assert [s.split(" (")[0] for s in facile.servers()] == ["server 'small'"]
    assert deepcalo.servers()[0].startswith("server 'fallback'")
    inputs = batch("deepcalo", 7, seed=2)
    try:
        got = deepcalo.infer_blocking(inputs, timeout=200)["energy"]
        np.testing.assert_allclose(got, reference("deepcalo", inputs), rtol=RTOL, atol=ATOL)
        assert facile.infer_blocking(batch("facile", 10), timeout=30)["energy"].shape == (10, 1)
        (server,) = reg.fallback_servers()
        assert server.models == ("deepcalo",)
    finally:
        reg.end_job()
    assert not group_alive(server.pid)


def test_a_fallback_server_that_cannot_start_fails_the_calls_clearly(capfd):
    """recorun-server refuses '--device cuda' without CUDA: the calls fail at once with an
    error naming the model and the cause; the server's log went to stderr."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (the fallback server would start)")
    reg = ServerRegistry(fallback_options=["--device", "cuda"])
    client = reg.client_for(ClientConfig("facile", mode="async"))
    try:
        with pytest.raises(InferenceError) as caught:
            client.infer_blocking(batch("facile", 4), timeout=120)
        text = str(caught.value)
        assert "model 'facile'" in text and "could not start" in text
        assert "exit code 2" in text and len(text) < 1000
        assert "torch sees no CUDA device" in str(caught.value.__cause__)
        with pytest.raises(InferenceError):                     # no second start
            client.infer_blocking(batch("facile", 4), timeout=5)
        assert len(reg.fallback_servers()) == 1
        assert "did not start" in capfd.readouterr().err
    finally:
        reg.end_job()


def test_configured_servers_are_never_replaced_quietly(small_server, tmp_path):
    """Servers configured and ``fallback`` not set: an unreachable server, a model no server
    has, a certificate that does not exist are configuration errors naming them."""
    from recorun import ConfigError
    from recorun.framework.params import ParamError

    dead = f"127.0.0.1:{free_port()}"
    reg = ServerRegistry(servers=[{"name": "dead", "address": dead},
                                  {"name": "small", "address": small_server.grpc}])
    with pytest.raises(ConfigError) as caught:
        reg.client_for(ClientConfig("facile"))
    message = str(caught.value)
    assert f"server 'dead' ({dead}) is not reachable" in message
    assert "fallback: true" in message
    reg.end_job()
    small = ServerRegistry(servers=[{"name": "small", "address": small_server.grpc}])
    with pytest.raises(ClientConfigError) as caught:
        small.client_for(ClientConfig("deepcalo"))
    message = str(caught.value)
    assert "model 'deepcalo'" in message and "set 'fallback: true'" in message
    assert "server 'small'" in message and "does not serve model 'deepcalo'" in message
    assert not small.fallback_servers()
    small.end_job()
    with pytest.raises(ParamError, match=r"root_certificates .*ca\.pem: no such file"):
        ServerRegistry(servers=[{"name": "tls", "address": "h:1", "ssl": True,
                                 "root_certificates": str(tmp_path / "ca.pem")}])


# --- failures: retries, failover, timeouts ---------------------------------------------------

@pytest.fixture
def victim(tmp_path, recorun_server_process):
    """A FACILE server to be killed; afterwards tritonserver's leftover repository copy is
    removed (only the one this server made)."""
    before = triton_folders()
    server = recorun_server_process.launch(
        "--models", "facile", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        log_dir=tmp_path)
    mine = [p for p in triton_folders() - before
            if (p / "config.pbtxt").exists()
            and (p / "config.pbtxt").read_text().startswith('name: "facile"')]
    yield server
    if server.process.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.process.wait(30)
    server.process.stdout.close()
    if len(mine) == 1:
        import shutil
        shutil.rmtree(mine[0], ignore_errors=True)


def test_failover_and_exhausted_tries_when_a_server_dies(victim, triton_server):
    """Requests stream out to 'victim' while its tritonserver is killed (SIGKILL by PID):
    with 'main' configured too, every call succeeds (retried, then failed over); with 'victim'
    alone, calls fail after 3 tries with an error naming model, server, attempts and status."""
    both = ServerRegistry(servers=[{"name": "victim", "address": victim.grpc},
                                   {"name": "main", "address": triton_server.grpc}])
    alone = ServerRegistry(servers=[{"name": "victim", "address": victim.grpc}],
                           fallback=False)
    config = {"model": "facile", "server": "victim", "tries": 3, "timeout_s": "5 s"}
    a_async = both.client_for(ClientConfig(**config, mode="async"))
    a_sync = both.client_for(ClientConfig(**config, mode="sync"))
    # no outage budget: the calls fail once the tries are spent (waiting out an outage is
    # test_a_server_restarted_within_the_outage_budget_loses_no_event)
    b_async = alone.client_for(ClientConfig(**config, mode="async", outage_s=0))
    b_pseudo = alone.client_for(ClientConfig(**config, mode="pseudo-async", outage_s=0))
    assert a_async.servers()[0].startswith("server 'victim'")
    inputs = batch("facile", 500, seed=9)
    want = reference("facile", inputs)
    collector = Collector()
    sent, killed_at = 0, None
    start = time.monotonic()
    try:
        while time.monotonic() - start < 2.0:
            if killed_at is None and time.monotonic() - start > 0.5:
                os.kill(tritonserver_pid(victim), signal.SIGKILL)
                killed_at = sent
            a_async.infer(inputs, collector.done_for(("a", sent)))
            b_async.infer(inputs, collector.done_for(("b", sent)))
            b_pseudo.infer(inputs, collector.done_for(("p", sent)))
            sent += 1
            time.sleep(0.02)
        results = collector.wait(3 * sent, timeout=60)
        # 'victim' failed its health probes: a sync client made before the kill starts on
        # 'main' now (the circuit breaker), no retry, no failover
        deadline = time.monotonic() + 10
        while a_async.endpoints[0].health.state != "down" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [ep.health.state for ep in a_sync.endpoints] == ["down", "up"]
        got = a_sync.infer_blocking(inputs)["energy"]
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        assert a_sync.timing()["failovers"] == 0 and a_sync.timing()["retries"] == 0
        assert a_sync.timing()["per_server"]["main"]["answers"] == 1
    finally:
        for client in (a_async, a_sync):
            both.release(client)
        for client in (b_async, b_pseudo):
            alone.release(client)
        both.end_job()
        alone.end_job()
    assert killed_at is not None and 0 < killed_at < sent - 10
    for i in range(sent):
        outputs, error, _ = results[("a", i)]
        assert error is None, f"call {i} failed despite 'main': {error}"
        np.testing.assert_allclose(outputs["energy"], want, rtol=RTOL, atol=ATOL)
    assert a_async.timing()["failovers"] >= 1
    for tag in ("b", "p"):
        errors = [results[(tag, i)][1] for i in range(sent)]
        assert all(e is None for e in errors[:killed_at - 5]), errors[:killed_at]
        failed = [e for e in errors if e is not None]
        assert len(failed) >= sent - killed_at - 2
        error = failed[-1]
        assert isinstance(error, InferenceError)
        assert error.model == "facile" and len(error.attempts) == 3
        assert {a.server for a in error.attempts} == {"victim"}
        assert error.status == "StatusCode.UNAVAILABLE"
        text = str(error)
        assert "model 'facile'" in text and "after 3 attempts" in text
        assert f"'victim' ({victim.grpc}) 3x" in text and "StatusCode.UNAVAILABLE" in text
    assert b_async.timing()["failures"] >= sent - killed_at - 2
    assert victim.process.wait(30) != 0        # recorun-server noticed its tritonserver died


@pytest.fixture
def slow_proxy(triton_server):
    proxy = DelayingProxy(triton_server.grpc)
    yield proxy
    proxy.close()


@pytest.mark.parametrize("mode", ["async", "sync", "pseudo-async"])
def test_timeout_fails_after_the_configured_tries(slow_proxy, triton_server, mode):
    """Through a DelayingProxy (0.4 s each way) a request cannot make a 200 ms timeout: the
    call fails after 2 tries with DEADLINE_EXCEEDED; with 'main' as a second server it fails
    over and succeeds; with a 5 s timeout the slow server answers."""
    reg = ServerRegistry(servers=[{"name": "slow", "address": slow_proxy.address}],
                         fallback=False)
    both = ServerRegistry(servers=[{"name": "slow", "address": slow_proxy.address},
                                   {"name": "main", "address": triton_server.grpc}])
    client = reg.client_for(ClientConfig("facile", mode=mode, timeout_s="200 ms", tries=2))
    patient = reg.client_for(ClientConfig("facile", mode=mode, timeout_s="5 s"))
    failing_over = both.client_for(ClientConfig("facile", mode=mode, timeout_s="200 ms",
                                                tries=2, server="slow"))
    inputs = batch("facile", 50)
    try:
        slow_proxy.delay_s = 0.4
        began = time.monotonic()
        with pytest.raises(InferenceError) as caught:
            client.infer_blocking(inputs, timeout=30)
        took = time.monotonic() - began
        error = caught.value
        assert len(error.attempts) == 2 and error.status == "StatusCode.DEADLINE_EXCEEDED"
        assert f"model 'facile': inference failed after 2 attempts on server 'slow' " \
               f"({slow_proxy.address}) 2x" in str(error)
        assert "DEADLINE_EXCEEDED" in str(error)
        assert 0.35 < took < 5.0
        assert client.timing()["retries"] == 1 and client.timing()["failures"] == 1
        got = failing_over.infer_blocking(inputs, timeout=30)["energy"]
        assert got.shape == (50, 1) and failing_over.timing()["failovers"] == 1
        slow_proxy.delay_s = 0.1
        began = time.monotonic()
        np.testing.assert_allclose(patient.infer_blocking(inputs, timeout=30)["energy"], got,
                                   rtol=RTOL, atol=ATOL)
        assert time.monotonic() - began > 0.2 and patient.timing()["retries"] == 0
    finally:
        slow_proxy.delay_s = 0.0
        reg.end_job()
        both.end_job()


# --- in a workflow ---------------------------------------------------------------------------


class ToyChannels(Producer):
    rows = Param(int, 300)

    def produce(self, event):
        rng = np.random.default_rng(event.id.event)
        event.put(rng.standard_normal((self.rows, 15)).astype(np.float32))


class ToySonicFacile(ExternalWorkProducer):
    """The producers' pattern: make_client + validate in begin_job, infer in acquire,
    end_job gives the client back."""

    channels = InputTag("channels")
    client = Param(dict, {"model": "facile"})

    def begin_job(self):
        self.sonic = make_client(self.client, self.services)
        self.sonic.validate({"hcal_channels": ((15,), np.float32)})

    def acquire(self, event, holder):
        def done(outputs, error):
            self._outputs = outputs
            holder.done(error)
        self.sonic.infer({"hcal_channels": event.get(self.channels)}, done)

    def produce(self, event):
        event.put(self._outputs["energy"][:, 0])

    def end_job(self):
        self.sonic.end_job()


class Record(Analyzer):
    channels = InputTag("channels")
    energy = InputTag("energy")
    recorder = Param(Any, None)

    def analyze(self, event):
        self.recorder.record(event.id.event, event.get(self.channels), event.get(self.energy))


@pytest.mark.parametrize("mode", ["async", "pseudo-async"])
def test_in_a_workflow(triton_server, recorder, mode, run_guarded, workflow):

    wf = workflow({"channels": {"type": ToyChannels},
                   "energy": {"type": ToySonicFacile,
                              "client": {"model": "facile", "mode": mode, "timeout": "5 s"}},
                   "record": {"type": Record, "recorder": recorder}},
                  {"p": ["record"]}, events=12, threads=2, streams=2)
    wf["services"] = {"sonic": {"type": "ServerRegistry",
                                "servers": [{"name": "main", "address": triton_server.grpc}],
                                "fallback": False}}
    result = run_guarded(wf, timeout=120)
    assert result.exit_code == 0, result.error
    assert result.report["events"]["failed"] == 0
    entries = recorder.where()
    assert sorted(e[0] for e in entries) == list(range(1, 13))
    x = np.concatenate([e[1] for e in entries])
    np.testing.assert_allclose(np.concatenate([e[2] for e in entries]),
                               reference("facile", {"hcal_channels": x})[:, 0],
                               rtol=RTOL, atol=ATOL)


def test_in_a_workflow_a_dead_server_fails_the_event_with_a_clear_error(recorder, run_guarded, workflow):
    """validate() at begin_job stops a job before its first event; an unreachable server with
    the fallback disabled is a configuration error naming the model."""

    wf = workflow({"channels": {"type": ToyChannels},
                   "energy": {"type": ToySonicFacile},
                   "record": {"type": Record, "recorder": recorder}},
                  {"p": ["record"]}, events=3)
    gone = f"127.0.0.1:{free_port()}"
    wf["services"] = {"sonic": {"type": "ServerRegistry",
                                "servers": [{"name": "gone", "address": gone}]}}
    result = run_guarded(wf, timeout=60)
    assert result.exit_code == 2 and recorder.where() == []
    text = str(result.error)
    assert f"server 'gone' ({gone}) is not reachable" in text and "fallback: true" in text
