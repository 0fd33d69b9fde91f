"""The Triton client's system shared-memory transport (``transport: shm | auto``) against real
recorun-servers over real gRPC.

Servers: the session's ``triton_server`` (its shared-memory endpoint is open, recorun-server's
default); ``restricted``, a recorun-server started with ``--restricted-endpoints
shared-memory`` (pytriton's access token then refuses every registration); ``comeback``, a
FACILE server stopped while clients hold regions registered on it and started again on the same
ports (a server that went away, a restarted server). A real ``recorun`` job run as a subprocess
is interrupted with SIGINT mid-run.

After every end (normal, a failed request, a server gone, Ctrl-C) no region of this process (or
of the job) may be left under ``/dev/shm`` or registered on the server.
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

from recorun.framework.params import ParamError
from recorun.sonic_clients import ClientConfig, ClientConfigError, InferenceError
from recorun.sonic_clients.base import description_from_spec
from recorun.sonic_clients.triton import Endpoint, TritonClient

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
RECORUN = str(Path(sys.executable).with_name("recorun"))
SHM = Path("/dev/shm")


def facile_rows(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """FACILE inputs as the offline workflow makes them: generated digis of ``rows`` channels
    through the producer's own packing (above 16000 rows, several events' one after the
    other)."""
    from recorun.data.generate import generate_hcal_events
    from recorun.data.hcal import facile_inputs

    sizes = [16000] * (rows // 16000) + ([rows % 16000] if rows % 16000 else [])
    return {"hcal_channels": np.concatenate([
        facile_inputs(generate_hcal_events(1, seed=seed + i, channels=n)["HcalDigi"][0])
        for i, n in enumerate(sizes)])}


def images(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"electron_images": rng.standard_normal((rows, 4, 56, 11)).astype(np.float32)}


def client(address: str, model: str = "facile", **config) -> TritonClient:
    c = TritonClient(ClientConfig(model, **config), [address])
    c.begin_job()
    return c


def regions_here(pid: int | None = None) -> list[str]:
    """This process's (or ``pid``'s) recorun regions under /dev/shm."""
    return sorted(p.name for p in SHM.glob(f"recorun_{pid or os.getpid()}_*"))


def regions_on(address: str, pid: int | None = None) -> list[str]:
    """The recorun regions of this process (or ``pid``) registered on the server."""
    import tritonclient.grpc as grpcclient

    status = grpcclient.InferenceServerClient(address).get_system_shared_memory_status(
        as_json=True)
    return sorted(n for n in status.get("regions", {})
                  if n.startswith(f"recorun_{pid or os.getpid()}_"))


def infer_all(c: TritonClient, calls: list[dict], timeout: float = 60.0) -> list:
    """Start every call at once (async: all in flight together), then wait for them all."""
    results: list = [None] * len(calls)
    left = threading.Semaphore(0)

    def done_for(i):
        def done(outputs, error):
            results[i] = (outputs, error)
            left.release()
        return done

    for i, inputs in enumerate(calls):
        c.infer(inputs, done_for(i))
    for _ in calls:
        assert left.acquire(timeout=timeout), "an answer did not come"
    return results


# --- configuration --------------------------------------------------------------------------

def test_a_transport_typo_is_a_clear_error():
    with pytest.raises(ClientConfigError, match=r"model 'facile': transport: 'shmm' is not one "
                       r"of \['grpc', 'shm', 'auto'\]; did you mean 'shm'\?"):
        ClientConfig("facile", transport="shmm")
    with pytest.raises(ClientConfigError, match="did you mean 'transport'"):
        ClientConfig.from_dict({"model": "facile", "transprot": "shm"})
    from recorun.producers.facile import FacileProducer

    with pytest.raises(ParamError, match=r"'gprc' is not one of \['grpc', 'shm', 'auto'\]"
                       ) as error:
        FacileProducer("hits", digis="source:HcalDigi", transport="gprc")
    assert error.value.name == "transport"
    assert FacileProducer("hits", digis="source:HcalDigi").client_config.transport == "grpc"
    assert FacileProducer("hits", digis="source:HcalDigi",
                          transport="shm").client_config.transport == "shm"


def test_auto_is_shm_only_when_every_server_is_on_this_host(triton_server):
    port = triton_server.grpc.rpartition(":")[2]
    desc = description_from_spec("facile")
    cases = {("127.0.0.1:" + port,): "shm", ("localhost:" + port,): "shm",
             ("[::1]:" + port,): "shm",
             ("127.0.0.1:" + port, "gpu1.example.org:8001"): "grpc",
             ("10.1.2.3:8001",): "grpc"}
    for addresses, want in cases.items():
        c = TritonClient(ClientConfig("facile", transport="auto"), list(addresses),
                         description=desc)            # the servers are not asked: no request
        c.begin_job()
        assert c.transport == want, addresses
        assert c.timing()["transport"] == want
        c.end_job()
    assert Endpoint("fallback", "local recorun-server, not started yet").is_local()
    assert not Endpoint("gpu1", "gpu1.example.org:8001").is_local()


# --- outputs: the same as over gRPC ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["async", "sync", "pseudo-async"])
def test_facile_16000_channels_through_shm_equals_grpc(triton_server, mode):
    inputs = [facile_rows(16000, seed=s) for s in (1, 2)]
    over_grpc = client(triton_server.grpc, mode=mode, transport="grpc")
    over_shm = client(triton_server.grpc, mode=mode, transport="shm")
    try:
        want = [over_grpc.infer_blocking(x, timeout=60)["energy"] for x in inputs]
        first = over_shm.infer_blocking(inputs[0], timeout=60)["energy"]
        assert regions_on(triton_server.grpc) and regions_here()      # in use meanwhile
        second = over_shm.infer_blocking(inputs[1], timeout=60)["energy"]
        assert np.array_equal(first, want[0]) and np.array_equal(second, want[1])
        assert not np.array_equal(want[0], want[1])
        # the second request reused the region: the first answer is a copy, not a view of it
        assert np.array_equal(first, want[0]) and first.flags.writeable
        timing = over_shm.timing()
        nbytes = sum(x["hcal_channels"].nbytes for x in inputs)
        assert timing["transport"] == "shm" and timing["shm_requests"] == 2
        assert timing["shm_bytes"] == timing["bytes_sent"] == nbytes
        assert timing["grpc_bytes"] == 0 and timing["shm_regions"] == 1
        assert "shm_refused" not in timing
        assert over_grpc.timing()["transport"] == "grpc"
        assert over_grpc.timing()["grpc_bytes"] == nbytes
    finally:
        over_grpc.end_job()
        over_shm.end_job()
    assert regions_here() == [] and regions_on(triton_server.grpc) == []


def test_batches_above_max_batch_size_and_deepcalo_images(triton_server):
    """FACILE at 20000 channels (max_batch_size 16384: two requests) and DeepCalo at 1030
    images of 4x56x11 (max_batch_size 1024: two requests)."""
    for model, inputs, requests in (("facile", facile_rows(20000, seed=3), 2),
                                    ("deepcalo", images(1030, seed=4), 2)):
        over_grpc = client(triton_server.grpc, model, transport="grpc", mode="sync")
        over_shm = client(triton_server.grpc, model, transport="shm", mode="sync")
        try:
            want = over_grpc.infer_blocking(inputs, timeout=120)["energy"]
            got = over_shm.infer_blocking(inputs, timeout=120)["energy"]
            assert got.shape == want.shape == (len(next(iter(inputs.values()))), 1)
            assert np.array_equal(got, want), model
            timing = over_shm.timing()
            assert timing["shm_requests"] == requests and timing["grpc_bytes"] == 0
        finally:
            over_grpc.end_job()
            over_shm.end_job()
    assert regions_here() == [] and regions_on(triton_server.grpc) == []


def test_many_requests_in_flight_never_share_a_region(triton_server):
    calls = [facile_rows(4500 + 37 * i, seed=10 + i) for i in range(24)]
    over_grpc = client(triton_server.grpc, mode="async", transport="grpc")
    over_shm = client(triton_server.grpc, mode="async", transport="shm")
    try:
        want = infer_all(over_grpc, calls)
        got = infer_all(over_shm, calls)
        for i, ((w, _), (g, error)) in enumerate(zip(want, got)):
            assert error is None, error
            assert np.array_equal(g["energy"], w["energy"]), f"call {i}"
        timing = over_shm.timing()
        assert timing["shm_requests"] == len(calls) and timing["failures"] == 0
        # all sent before the first answer could be read: several regions, one per request
        # in flight at most
        assert 1 < timing["shm_regions"] <= len(calls)
    finally:
        over_grpc.end_job()
        over_shm.end_job()
    assert regions_here() == [] and regions_on(triton_server.grpc) == []


# --- errors: nothing left behind -------------------------------------------------------------

def test_a_request_the_server_rejects_leaves_no_region(triton_server):
    """Fault injection: the client is told (``description=``) that the server takes batches
    of 20000 rows; the server's FACILE takes 16384 and answers INVALID_ARGUMENT."""
    told = description_from_spec("facile", max_batch_size=20000)
    c = TritonClient(ClientConfig("facile", mode="sync", transport="shm"), [triton_server.grpc],
                     description=told)
    c.begin_job()
    try:
        with pytest.raises(InferenceError, match="batch-size must be <= 16384"):
            c.infer_blocking(facile_rows(20000, seed=5), timeout=60)
        ok = c.infer_blocking(facile_rows(100, seed=6), timeout=60)["energy"]
        assert ok.shape == (100, 1)
        assert c.timing()["shm_regions"] == 2        # the failed request's was not reused
    finally:
        c.end_job()
    assert regions_here() == [] and regions_on(triton_server.grpc) == []


@pytest.fixture
def comeback(recorun_server_process, tmp_path):
    """A FACILE recorun-server on fixed free ports: ``comeback.stop()`` it and
    ``comeback.start()`` it again there."""
    import socket

    sockets = [socket.socket() for _ in range(3)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [str(s.getsockname()[1]) for s in sockets]
    for s in sockets:
        s.close()

    class Comeback:
        server = None
        address = f"127.0.0.1:{ports[0]}"

        def start(self):
            self.server = recorun_server_process.launch(
                "--models", "facile", "--grpc-port", ports[0], "--http-port", ports[1],
                "--metrics-port", ports[2], log_dir=tmp_path)

        def stop(self):
            assert self.server.stop(signal.SIGTERM) == 0, self.server.log()[-3000:]

    server = Comeback()
    server.start()
    yield server
    if server.server.process.poll() is None:
        server.stop()


def test_a_server_that_went_away_and_came_back(comeback, triton_server):
    """Client ``gone`` ends while its server is down: the unregistration fails, its regions are
    still destroyed here, at once. Client ``kept`` sends again once the server is back: the
    restarted server lost its registrations, the request registers again and is sent again at
    once (not a failed try) and its event does not fail."""
    x = facile_rows(16000, seed=7)
    reference = client(triton_server.grpc, mode="sync")
    want = reference.infer_blocking(x, timeout=60)["energy"]
    reference.end_job()
    gone = client(comeback.address, mode="sync", transport="shm", tries=1, outage_s=0)
    kept = client(comeback.address, mode="async", transport="shm", tries=3, outage_s=0)
    try:
        for c in (gone, kept):
            assert np.array_equal(c.infer_blocking(x, timeout=60)["energy"], want)
        assert len(regions_here()) == 2 and len(regions_on(comeback.address)) == 2
        comeback.stop()
        with pytest.raises(InferenceError, match="UNAVAILABLE"):
            gone.infer_blocking(x, timeout=60)
        began = time.monotonic()
        gone.end_job()
        assert time.monotonic() - began < 5.0
        assert len(regions_here()) == 1                  # kept's, not gone's
        comeback.start()
        assert regions_on(comeback.address) == []         # it knows none of them
        assert np.array_equal(kept.infer_blocking(x, timeout=60)["energy"], want)
        timing = kept.timing()
        assert timing["failures"] == 0 and "shm_refused" not in timing
        # the request that found its region unknown, and its resend (retries: a reconnection
        # that failed, should there be one; the resend is not one of them)
        assert timing["shm_requests"] == 3 + timing["retries"]
        assert timing["per_server"]["server"]["failed"] == timing["retries"]
        assert len(regions_on(comeback.address)) == 1
    finally:
        gone.end_job()
        kept.end_job()
    assert regions_here() == [] and regions_on(comeback.address) == []


# --- a server that refuses shared memory -----------------------------------------------------

@pytest.fixture(scope="module")
def restricted(tmp_path_factory, recorun_server_process):
    server = recorun_server_process.launch(
        "--models", "facile", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        "--restricted-endpoints", "shared-memory",
        log_dir=tmp_path_factory.mktemp("restricted-server"))
    yield server
    assert server.stop(signal.SIGTERM) == 0, server.log()[-3000:]


def test_a_server_that_refuses_registration_gets_grpc_with_one_warning(restricted, caplog):
    calls = [facile_rows(16000, seed=s) for s in (8, 9, 10)]
    over_grpc = client(restricted.grpc, mode="sync")
    want = [over_grpc.infer_blocking(x, timeout=60)["energy"] for x in calls]
    over_grpc.end_job()
    with caplog.at_level(logging.WARNING, logger="recorun.sonic_clients"):
        c = client(restricted.grpc, mode="async", transport="shm")
        try:
            got = infer_all(c, calls)
            timing = c.timing()
        finally:
            c.end_job()
    for (outputs, error), w in zip(got, want):
        assert error is None and np.array_equal(outputs["energy"], w)
    warnings = [r.getMessage() for r in caplog.records
                if "cannot use shared memory" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"server 'server' ({restricted.grpc})" in warnings[0]
    assert "restricted" in warnings[0] and "go over gRPC" in warnings[0]
    assert timing["transport"] == "shm" and timing["shm_requests"] == 0
    assert timing["grpc_bytes"] == timing["bytes_sent"] == sum(x["hcal_channels"].nbytes
                                                               for x in calls)
    assert "restricted" in timing["shm_refused"]["server"]
    assert regions_here() == []


# --- Ctrl-C of a real job ----------------------------------------------------------------------

@pytest.mark.subprocess
def test_ctrl_c_of_a_job_leaves_no_region(triton_server, fault_injection, tmp_path):
    """The offline FACILE workflow with ``transport: shm`` against the session's server, paced
    by injected latency (0.3 s per event) so that SIGINT comes mid-run."""
    job = subprocess.Popen(
        [RECORUN, str(REPO / "workflows" / "workflow_facile.yaml"), "--report-json", "r.json",
         "--set", "services.sonic={type: ServerRegistry, fallback: false, servers: "
                  f"[{{name: session, address: '{triton_server.grpc}'}}]}}",
         "--set", "modules.hcalRecHits.transport=shm", *fault_injection(sleep_s=0.3)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not regions_here(job.pid) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert regions_here(job.pid), "the job made no shared-memory region"
        assert regions_on(triton_server.grpc, job.pid)
        job.send_signal(signal.SIGINT)
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(30)
    assert job.returncode == 130, err[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["signal"] == "SIGINT" and report["events"]["read"] < 20
    details = report["modules"]["hcalRecHits"]["details"]
    assert details["transport"] == "shm" and details["shm_bytes"] > 0
    assert details["grpc_bytes"] == 0
    assert regions_here(job.pid) == [] and regions_on(triton_server.grpc, job.pid) == []
    assert "leaked shared_memory" not in err          # end_job released them, not the tracker
