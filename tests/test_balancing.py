"""Balancing SONIC requests over several real recorun-servers: the clients' own policies
(``balance: first | round_robin | least_outstanding``) and a real nginx gRPC balancer
(:mod:`recorun.server.balancer`).

Servers: four FACILE-only recorun-servers started together for the module: ``a`` and ``b``
take the balanced requests; ``victim1`` and ``victim2`` have their tritonserver killed
(SIGKILL by PID) while requests stream out, one behind the clients' own balancing, one behind
nginx. Where requests went is read from each server's own statistics
(``get_inference_statistics``), and compared with the client's counters per server and
nginx's access log.

nginx is a system package (``deploy/nginx/install-nginx.sh``, run by setup.sh and .ci/run):
the tests that need it fail, with the install command, where it is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recorun import Analyzer, InputTag, Param
from recorun.framework.params import ParamError
from recorun.server.balancer import (
    BalancerError,
    NginxBalancer,
    NginxNotFoundError,
    find_nginx,
    main as balancer_main,
    nginx_build,
    running_balancers,
)
from recorun.processes import descendants
from recorun.sonic_clients import ClientConfig, ClientConfigError
from recorun.sonic_clients.inprocess import InProcessClient
from recorun.sonic_clients.registry import ServerRegistry
from recorun.sonic_clients.server_stats import parse_statistics
from recorun.sonic_clients.triton import DOWN_S, TritonClient

pytestmark = [pytest.mark.nginx, pytest.mark.server]

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "samples" / "hlt_sample.root"
FACILE = ("--models", "facile", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0")
ROWS = 300
RTOL, ATOL = 1e-4, 1e-5


# --- helpers ---------------------------------------------------------------------------------

def served(server) -> int:
    """FACILE requests answered by ``server``, as the server itself counts them."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        return parse_statistics(client.get_inference_statistics(
            "facile", as_json=True, client_timeout=5.0)).requests
    finally:
        client.close()


def served_since(before: dict, total: int, timeout: float = 5.0) -> dict:
    """``{name: requests answered since before[name]}`` for the servers in ``before`` (name ->
    (server, count)), waiting until they add up to ``total`` (a server counts a request once
    its answer is out, so the last ones may lag)."""
    deadline = time.monotonic() + timeout
    while True:
        now = {name: served(server) - count for name, (server, count) in before.items()}
        if sum(now.values()) >= total or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def snapshot(**servers) -> dict:
    return {name: (server, served(server)) for name, server in servers.items()}


def tritonserver_pid(server) -> int:
    for pid in descendants(server.pid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver":
                return pid
        except OSError:
            continue
    raise AssertionError(f"recorun-server {server.pid} has no tritonserver child")


def repository_copies(server) -> set[Path]:
    """tritonserver's local copies of its model repository (``/tmp/folderXXXXXX``), named in
    the command lines of its python-backend stubs: removed on a clean stop, left behind when
    tritonserver is killed."""
    found = set()
    for pid in descendants(server.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in args:
            match = re.match(r"(/tmp/folder[^/\s]+)", arg.decode(errors="replace"))
            if match:
                found.add(Path(match.group(1)))
    return found


class Victims:
    """Kills a server's tritonserver (SIGKILL by PID) and cleans up after it."""

    def __init__(self):
        self.leftovers: set[Path] = set()

    def kill(self, server) -> None:
        self.leftovers |= repository_copies(server)
        os.kill(tritonserver_pid(server), signal.SIGKILL)


class Collector:
    """``done`` callbacks of many calls: (outputs, error) by tag."""

    def __init__(self):
        self.lock = threading.Condition()
        self.results: dict = {}

    def done_for(self, tag):
        def done(outputs, error):
            with self.lock:
                assert tag not in self.results, f"done called twice for {tag}"
                self.results[tag] = (outputs, error)
                self.lock.notify_all()
        return done

    def wait(self, count: int, timeout: float = 60.0) -> dict:
        with self.lock:
            if not self.lock.wait_for(lambda: len(self.results) >= count, timeout):
                pytest.fail(f"only {len(self.results)} of {count} calls finished in {timeout} s")
            return dict(self.results)


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(tmp_path_factory, recorun_server_process):
    """Four FACILE recorun-servers, started together: a, b, victim1, victim2."""
    log_dir = tmp_path_factory.mktemp("balancing-servers")
    names = ("a", "b", "victim1", "victim2")
    victims = Victims()
    started, errors = {}, []
    with ThreadPoolExecutor(len(names)) as pool:
        futures = {name: pool.submit(recorun_server_process.launch, *FACILE, log_dir=log_dir)
                   for name in names}
        for name, future in futures.items():
            try:
                started[name] = future.result()
            except BaseException as exc:          # pytest.fail's exception included
                errors.append(exc)
    try:
        if errors:
            raise errors[0]
        started["victims"] = victims
        yield started
    finally:
        alive = [s for n, s in started.items() if n != "victims" and s.process.poll() is None]
        for server in alive:                      # stop them together (~5 s each)
            os.kill(server.pid, signal.SIGTERM)
        # then wait for each; signal 0 sends nothing (a second SIGTERM would kill at once)
        codes = {server.pid: server.stop(0) for server in alive}
        for name in ("victim1", "victim2"):
            server = started.get(name)
            if server is not None and server.process.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.process.wait(10)
            if server is not None and not server.process.stdout.closed:
                server.process.stdout.close()
        for path in victims.leftovers:
            shutil.rmtree(path, ignore_errors=True)
    assert all(code == 0 for code in codes.values()), f"exit codes on SIGTERM: {codes}"


@pytest.fixture(scope="module")
def nginx() -> str:
    """The nginx binary; fails (not skips) where there is none: CI installs it."""
    try:
        binary = find_nginx()
        nginx_build(binary)
    except BalancerError as exc:
        pytest.fail(f"{exc}. .ci/run and setup.sh install it with "
                    "deploy/nginx/install-nginx.sh where apt-get can be used.")
    return binary


@pytest.fixture(scope="module")
def inputs_and_want():
    rng = np.random.default_rng(2021)
    inputs = {"hcal_channels": rng.standard_normal((ROWS, 15)).astype(np.float32)}
    client = InProcessClient(ClientConfig("facile", client="inprocess", mode="sync"))
    try:
        want = client.infer_blocking(inputs)["energy"]
    finally:
        client.end_job()
    return inputs, want


@pytest.fixture(autouse=True)
def no_balancer_left_behind():
    yield
    left = running_balancers()
    for balancer in left:
        balancer.stop()
    assert not left, f"balancers still running after the test: {left}"


# --- configuration and the order of servers (no server needed) -------------------------------

def test_balance_configuration():
    from recorun.producers.facile import FacileProducer

    assert ClientConfig("facile").balance == ""
    assert ClientConfig.from_dict({"model": "facile", "balance": "round_robin"}).balance \
        == "round_robin"
    with pytest.raises(ClientConfigError, match="balance.*did you mean 'round_robin'"):
        ClientConfig("facile", balance="round-robin")
    assert ServerRegistry().balance == "first"
    with pytest.raises(ParamError, match="'random' is not one of") as caught:
        ServerRegistry(balance="random")
    assert caught.value.name == "balance"
    two = ["127.0.0.1:1", "127.0.0.1:2"]
    assert TritonClient(ClientConfig("facile"), two).balance == "first"
    assert TritonClient(ClientConfig("facile"), two, balance="least_outstanding").balance \
        == "least_outstanding"
    assert TritonClient(ClientConfig("facile", balance="round_robin"), two,
                        balance="least_outstanding").balance == "round_robin"   # its own wins
    assert FacileProducer("hcal").client_config.balance == ""
    assert FacileProducer("hcal", balance="least_outstanding").client_config.balance \
        == "least_outstanding"
    with pytest.raises(ParamError, match="'fastest' is not one of") as caught:
        FacileProducer("hcal", balance="fastest")
    assert caught.value.name == "balance"


def _first_servers(client: TritonClient, n: int) -> list[str]:
    return [client._route().endpoint.name for _ in range(n)]


def test_order_of_servers_per_policy(monkeypatch):
    """Without sending anything: round_robin takes the servers in turn; least_outstanding the
    one with the fewest requests in flight (ties in turn); a server that exhausted its tries
    comes last for DOWN_S seconds (round_robin, least_outstanding) or moves to the back
    (first); an answer from it clears it."""
    addresses = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    first = TritonClient(ClientConfig("facile"), addresses)
    assert _first_servers(first, 4) == ["server0"] * 4
    rr = TritonClient(ClientConfig("facile", balance="round_robin"), addresses)
    assert _first_servers(rr, 6) == ["server0", "server1", "server2"] * 2
    assert [ep.name for ep in rr._route().endpoints] == ["server0", "server1", "server2"]
    lo = TritonClient(ClientConfig("facile", balance="least_outstanding"), addresses)
    assert _first_servers(lo, 3) == ["server0", "server1", "server2"]
    busy = [lo.endpoints[0].flight(), lo.endpoints[0].flight(), lo.endpoints[1].flight()]
    assert lo.endpoints[0].in_flight() == 2
    assert _first_servers(lo, 3) == ["server2"] * 3
    assert [ep.name for ep in lo._route().endpoints] == ["server2", "server1", "server0"]
    for flight in busy:
        flight.end()
        flight.end()                                  # idempotent
    assert lo.endpoints[0].in_flight() == 0

    rr._demote(rr.endpoints[1])                       # exhausted its tries
    for _ in range(4):
        assert [ep.name for ep in rr._route().endpoints][-1] == "server1"
    rr._answered(rr.endpoints[1])                     # it answered: back in turn
    assert "server1" in _first_servers(rr, 3)
    assert DOWN_S > 1.0
    monkeypatch.setattr("recorun.sonic_clients.triton.DOWN_S", 0.05)
    rr._demote(rr.endpoints[1])
    assert [ep.name for ep in rr._route().endpoints][-1] == "server1"
    time.sleep(0.1)
    assert "server1" in _first_servers(rr, 3)         # its time out is over
    first._demote(first.endpoints[0])
    assert _first_servers(first, 2) == ["server1"] * 2


# --- client-side balancing over real servers -------------------------------------------------

@pytest.mark.parametrize("policy,mode", [("first", "async"), ("round_robin", "async"),
                                         ("least_outstanding", "async"),
                                         ("least_outstanding", "sync"),
                                         ("round_robin", "pseudo-async")])
def test_client_side_balancing_spreads_requests(servers, inputs_and_want, policy, mode):
    """40 calls: 'first' sends all to the preferred server, round_robin alternates exactly,
    least_outstanding spreads them (exactly, when they go one at a time); each server's own
    statistics agree with the client's counters per server."""
    inputs, want = inputs_and_want
    a, b = servers["a"], servers["b"]
    registry = ServerRegistry(servers=[{"name": "a", "address": a.grpc},
                                       {"name": "b", "address": b.grpc}],
                              balance=policy, fallback=False)
    calls = 40
    try:
        client = registry.client_for(ClientConfig("facile", mode=mode, server="a"))
        assert client.balance == policy and client.describe()["balance"] == policy
        before = snapshot(a=a, b=b)
        collector = Collector()
        for i in range(calls):
            client.infer(inputs, collector.done_for(i))
        results = collector.wait(calls)
        timing = client.timing()
    finally:
        registry.end_job()
    for outputs, error in results.values():
        assert error is None
        np.testing.assert_allclose(outputs["energy"], want, rtol=RTOL, atol=ATOL)
    got = served_since(before, calls)
    assert sum(got.values()) == calls
    assert {n: timing["per_server"].get(n, {}).get("answers", 0) for n in got} == got
    assert timing["balance"] == policy and timing["failures"] == 0
    if policy == "first":
        assert got == {"a": calls, "b": 0}
    elif policy == "round_robin" or mode == "sync":
        assert got == {"a": calls // 2, "b": calls // 2}
    else:
        assert min(got.values()) >= calls // 5, got


class CountRecHits(Analyzer):
    hits = InputTag("hcalRecHits")
    recorder = Param(Any, None)

    def analyze(self, event):
        self.recorder.record(event.id.event, len(event.get(self.hits)))


def hlt_workflow(recorder, registry: dict, events: int, **producer) -> dict:
    return {
        "process": {"threads": 2, "streams": 2, "max_events": events, "report_every_s": 0},
        "source": {"type": "RootSource", "files": [str(SAMPLE)], "step_size": 50},
        "modules": {"hcalRecHits": {"type": "FacileProducer", "digis": "source:HcalDigi",
                                    "mode": "async", "timeout": "10 s", **producer},
                    "count": {"type": CountRecHits, "recorder": recorder}},
        "paths": {"p": ["count"]},
        "endpaths": {},
        "services": {"sonic": {"type": "ServerRegistry", "fallback": False, **registry}},
    }


def test_producer_balance_parameter_in_a_workflow(servers, recorder, run_guarded):
    """FacileProducer's own ``balance: round_robin`` overrides the registry's ``first``: the
    HLT sample's events alternate between the two servers."""
    a, b = servers["a"], servers["b"]
    before = snapshot(a=a, b=b)
    wf = hlt_workflow(recorder, {"servers": [{"name": "a", "address": a.grpc},
                                             {"name": "b", "address": b.grpc}]},
                      events=20, balance="round_robin")
    result = run_guarded(wf, timeout=120)
    assert result.exit_code == 0, result.error
    assert result.report["events"]["read"] == 20 and result.report["events"]["failed"] == 0
    assert len({e[0] for e in recorder.where()}) == 20
    details = result.report["modules"]["hcalRecHits"]["details"]
    assert details["balance"] == "round_robin"
    assert {n: c["answers"] for n, c in details["per_server"].items()} == {"a": 10, "b": 10}
    assert served_since(before, 20) == {"a": 10, "b": 10}


def test_client_side_failover_when_a_balanced_server_dies(servers, inputs_and_want):
    """round_robin and least_outstanding clients stream requests over 'victim1' and 'a'; the
    victim's tritonserver is killed (SIGKILL) mid-run: every call is answered (retried, failed
    over, then sent to 'a' only), none is lost, and 'a' counts what the clients say it did."""
    inputs, want = inputs_and_want
    victim, a = servers["victim1"], servers["a"]
    registry = ServerRegistry(servers=[{"name": "victim", "address": victim.grpc},
                                       {"name": "a", "address": a.grpc}],
                              balance="round_robin", fallback=False)
    config = {"model": "facile", "tries": 2, "timeout_s": "5 s"}
    clients = {"rr": registry.client_for(ClientConfig(**config, mode="async")),
               "lo": registry.client_for(ClientConfig(**config, mode="async",
                                                      balance="least_outstanding")),
               "pseudo": registry.client_for(ClientConfig(**config, mode="pseudo-async"))}
    before = snapshot(a=a)
    collector = Collector()
    sent, killed_at = 0, None
    start = time.monotonic()
    try:
        while time.monotonic() - start < 1.6:
            if killed_at is None and time.monotonic() - start > 0.5:
                servers["victims"].kill(victim)
                killed_at = sent
            for tag, client in clients.items():
                client.infer(inputs, collector.done_for((tag, sent)))
            sent += 1
            time.sleep(0.02)
        results = collector.wait(len(clients) * sent, timeout=60)
        timings = {tag: client.timing() for tag, client in clients.items()}
        victim_state = registry._endpoints[0].health.state
    finally:
        registry.end_job()
    assert killed_at is not None and 5 < killed_at < sent - 10
    for (tag, i), (outputs, error) in results.items():
        assert error is None, f"{tag} call {i} was lost: {error}"
        np.testing.assert_allclose(outputs["energy"], want, rtol=RTOL, atol=ATOL)
    for tag, timing in timings.items():
        per = timing["per_server"]
        assert per["victim"]["answers"] > 0 and per["a"]["answers"] > 0, (tag, per)
        assert per["victim"]["answers"] + per["a"]["answers"] == sent, (tag, per)
        assert timing["failures"] == 0, (tag, timing)
        # after the kill, new requests start on 'a': the victim gets few more tries
        assert per["victim"]["requests"] - per["victim"]["answers"] <= 2 * 12, (tag, per)
    # the clients share the victim's health: the first to find it dead has it probed, and
    # then every client sends to 'a' first; someone met the failure
    assert sum(t["per_server"]["victim"]["failed"] for t in timings.values()) >= 1
    assert victim_state == "down"
    answered_by_a = sum(t["per_server"]["a"]["answers"] for t in timings.values())
    assert served_since(before, answered_by_a)["a"] == answered_by_a
    assert victim.process.wait(30) != 0          # recorun-server noticed tritonserver died


# --- the nginx gRPC balancer -----------------------------------------------------------------

def test_nginx_balancer_spreads_a_workflows_requests(servers, nginx, recorder, run_guarded):
    """A workflow whose ServerRegistry names only the balancer: nginx passes its requests to
    both servers (each server's statistics and nginx's access log agree); stop() ends nginx
    and removes its prefix directory."""
    a, b = servers["a"], servers["b"]
    balancer = NginxBalancer([a.grpc, b.grpc]).start()
    prefix, pid = balancer.prefix, balancer.pid
    try:
        assert balancer.address.startswith("127.0.0.1:") and balancer.running
        conf = (prefix / "nginx.conf").read_text()
        assert f"server {a.grpc} " in conf and f"server {b.grpc} " in conf
        assert "grpc_pass grpc://recorun_triton;" in conf and "{{" not in conf
        before = snapshot(a=a, b=b)
        wf = hlt_workflow(recorder, {"servers": [{"name": "lb", "address": balancer.address}]},
                          events=20)
        result = run_guarded(wf, timeout=120)
        assert result.exit_code == 0, result.error
        assert result.report["events"]["read"] == 20 and result.report["events"]["failed"] == 0
        assert len({e[0] for e in recorder.where()}) == 20
        got = served_since(before, 20)
        assert sum(got.values()) == 20 and min(got.values()) >= 5, got
        assert balancer.upstream_counts() == {a.grpc: got["a"], b.grpc: got["b"]}
    finally:
        assert balancer.stop() == 0, balancer.logs()
    assert not prefix.exists() and not balancer.running
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)                              # nginx and its worker are gone
    problems = [line for line in balancer.error_log_text.splitlines()
                if re.search(r"\[(error|crit|alert|emerg)\]", line)]
    assert not problems, problems
    assert balancer.access_log_text.count("/inference.GRPCInferenceService/ModelInfer ") == 20


def test_nginx_balancer_loses_no_request_when_a_server_dies(servers, nginx, inputs_and_want):
    """Requests stream through nginx to 'victim2' and 'b'; the victim's tritonserver is killed
    mid-run. Every call is answered: nginx passes new requests to 'b' (a refused connection
    goes to the next upstream) and the requests the victim was answering come back as errors
    that the client retries through nginx."""
    inputs, want = inputs_and_want
    victim, b = servers["victim2"], servers["b"]
    balancer = NginxBalancer([victim.grpc, b.grpc], fail_timeout_s=30).start()
    registry = ServerRegistry(servers=[{"name": "lb", "address": balancer.address}],
                              fallback=False)
    client = registry.client_for(ClientConfig("facile", mode="async", tries=3,
                                              timeout_s="5 s"))
    before = snapshot(b=b)
    collector = Collector()
    sent, killed_at = 0, None
    start = time.monotonic()
    try:
        while time.monotonic() - start < 1.6:
            if killed_at is None and time.monotonic() - start > 0.5:
                servers["victims"].kill(victim)
                killed_at = sent
            client.infer(inputs, collector.done_for(sent))
            sent += 1
            time.sleep(0.02)
        results = collector.wait(sent, timeout=60)
        # a blocking call after the kill: nginx has left the victim out
        sync = registry.client_for(ClientConfig("facile", mode="sync", tries=1))
        np.testing.assert_allclose(sync.infer_blocking(inputs)["energy"], want,
                                   rtol=RTOL, atol=ATOL)
        timing = client.timing()
    finally:
        registry.end_job()
        balancer.stop()
    assert killed_at is not None and 5 < killed_at < sent - 10
    for i, (outputs, error) in results.items():
        assert error is None, f"call {i} was lost: {error}"
        np.testing.assert_allclose(outputs["energy"], want, rtol=RTOL, atol=ATOL)
    assert timing["failures"] == 0
    counts = balancer.upstream_counts()
    assert counts[victim.grpc] > 0 and counts[b.grpc] > 0, counts
    assert sum(counts.values()) == sent + 1           # each call answered once
    assert served_since(before, counts[b.grpc])["b"] == counts[b.grpc]
    assert counts[b.grpc] >= sent - killed_at
    assert victim.process.wait(30) != 0


def test_recorun_balancer_command(servers, nginx, inputs_and_want, tmp_path):
    """``recorun-balancer`` prints READY with its address, balances, and on SIGTERM stops nginx
    and removes its prefix (exit 0); ``--print-config`` prints the rendered configuration."""
    inputs, want = inputs_and_want
    a, b = servers["a"], servers["b"]
    script = Path(sys.executable).with_name("recorun-balancer")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "recorun.server.balancer"]
    upstreams = ["--upstream", a.grpc, "--upstream", b.grpc]
    printed = subprocess.run([*command, *upstreams, "--method", "least_conn", "--print-config"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert "least_conn;" in printed.stdout and f"server {b.grpc} " in printed.stdout
    assert re.search(r"listen 127\.0\.0\.1:8001( http2;|;\s+http2 on;)", printed.stdout)

    with open(tmp_path / "stderr", "w") as err:
        process = subprocess.Popen([*command, *upstreams, "--port", "0"], cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=err, text=True,
                                   start_new_session=True)
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("READY grpc=127.0.0.1:"), (tmp_path / "stderr").read_text()
        fields = dict(item.split("=", 1) for item in line.split()[1:])
        prefix, nginx_pid = Path(fields["prefix"]), int(fields["pid"])
        assert int((prefix / "nginx.pid").read_text()) == nginx_pid
        client = TritonClient(ClientConfig("facile", mode="sync"), [fields["grpc"]])
        try:
            for _ in range(4):
                np.testing.assert_allclose(client.infer_blocking(inputs)["energy"], want,
                                           rtol=RTOL, atol=ATOL)
        finally:
            client.end_job()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (tmp_path / "stderr").read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        process.stdout.close()
    assert not prefix.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(nginx_pid, 0)


def test_missing_nginx_and_bad_options_are_clear_errors(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("recorun.server.balancer.NGINX_LOCATIONS", ())
    with pytest.raises(NginxNotFoundError, match="nginx is not installed.*apt-get install -y "
                                                 "nginx-light"):
        NginxBalancer(["127.0.0.1:8001"])
    with pytest.raises(NginxNotFoundError, match="'/nonexistent/nginx' does not exist"):
        NginxBalancer(["127.0.0.1:8001"], nginx="/nonexistent/nginx")
    assert balancer_main(["--upstream", "127.0.0.1:8001"]) == 1
    assert "nginx is not installed" in capsys.readouterr().err
    for bad, message in ((["nowhere"], "HOST:PORT"), ([], "at least one upstream"),
                         (["h:1", "h:1"], "twice")):
        with pytest.raises(BalancerError, match=message):
            NginxBalancer(bad)
    with pytest.raises(BalancerError, match="method"):
        NginxBalancer(["h:1"], method="random")
    with pytest.raises(SystemExit):
        balancer_main(["--upstream", "nowhere"])
