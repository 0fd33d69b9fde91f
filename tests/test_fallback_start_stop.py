"""The local fallback server's start and stop as a job sees them: started in the background at
the producers' begin_job (one server for every producer's model), waited for at their
post_begin_job, a server that cannot start stopping the job before its first event, and a stop
that leaves nothing behind; and the process helpers behind that stop (recorun.processes).

Real recorun-servers (tritonserver through pytriton) and real recorun jobs (subprocesses).
Processes are only ever signalled by PID.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from recorun.processes import group_alive
from recorun.sonic_clients import ClientConfig
from recorun.sonic_clients.registry import ServerRegistry

REPO = Path(__file__).resolve().parents[1]
RECORUN = str(Path(sys.executable).with_name("recorun"))


def reference(name: str, x: np.ndarray) -> np.ndarray:
    import torch

    from recorun.server.weights import load_model

    with torch.no_grad():
        return load_model(name)(torch.from_numpy(x)).numpy()


@pytest.mark.server
def test_producers_start_one_fallback_server_for_all_their_models():
    """Two producers ask for their clients one after the other (their begin_job), each
    starting the fallback server in the background: the server started for the first is
    replaced, while it starts, by one for both; both clients are served by it; at the end no
    server is left, the replaced one included."""
    reg = ServerRegistry()
    facile = reg.client_for(ClientConfig("facile", mode="async"), start_fallback=True)
    (first,) = reg.fallback_servers()                       # started at once, not lazily
    assert first.models == ("facile",)
    deepcalo = reg.client_for(ClientConfig("deepcalo", mode="sync"), start_fallback=True)
    try:
        (server,) = reg.start_fallback(wait=True)               # post_begin_job
        assert server is not first and server.models == ("facile", "deepcalo")
        assert reg.fallback_servers() == [server]
        x = np.random.default_rng(3).standard_normal((50, 15)).astype(np.float32)
        np.testing.assert_allclose(facile.infer_blocking({"hcal_channels": x},
                                                         timeout=60)["energy"],
                                   reference("facile", x), rtol=1e-4, atol=1e-5)
        images = np.random.default_rng(4).standard_normal((3, 4, 56, 11)).astype(np.float32)
        assert deepcalo.infer_blocking({"electron_images": images})["energy"].shape == (3, 1)
        assert "127.0.0.1:" in facile.describe()["servers"][0]
    finally:
        facile.end_job()
        reg.release(deepcalo)
    assert server.exit_code == 0 and not server.log_path.exists()   # a clean stop
    for one in (first, server):
        assert not group_alive(one.pid), f"{one!r} left processes behind"
    assert not reg.fallback_servers()


@pytest.mark.server
def test_a_job_whose_fallback_server_cannot_start_stops_before_its_first_event(tmp_path):
    """recorun-server refuses '--device cuda' on a machine without CUDA: the HLT started its
    fallback server at begin_job, and its post_begin_job stops the job with the server's
    reason (exit code 2, a configuration error), no event read."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (the fallback server would start)")
    done = subprocess.run(
        [RECORUN, str(REPO / "workflows" / "workflow_hlt.yaml"), "-n", "3", "--report-json",
         "r.json", "--set", "services.sonic={type: ServerRegistry, fallback_options: "
                            "['--device', 'cuda']}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "configuration error" in done.stderr
    assert "SONIC producer 'hcalRecHits' (FacileProducer), model 'facile'" in done.stderr
    assert "did not start" in done.stderr and "torch sees no CUDA device" in done.stderr
    assert "Traceback" not in done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["events"]["read"] == 0 and report["exit_code"] == 2
    assert not list((tmp_path / "out").glob("*.root"))


@pytest.mark.server
def test_the_hlt_stops_its_fallback_server_cleanly(tmp_path):
    """README's main command on 10 events: the fallback server it started (found among the
    job's descendants while it runs) exits with code 0 and leaves no process, no work
    directory and no log folder behind."""
    job = subprocess.Popen([RECORUN, str(REPO / "workflows" / "workflow_hlt.yaml"), "-n",
                            "10", "--report-json", "r.json"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from recorun.processes import descendants

    servers: list[int] = []
    deadline = time.monotonic() + 60
    while not servers and job.poll() is None and time.monotonic() < deadline:
        for pid in descendants(job.pid):
            try:
                if b"recorun.server.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    servers.append(pid)
            except OSError:
                pass
        time.sleep(0.02)
    out, err = job.communicate(timeout=180)
    assert job.returncode == 0, err[-3000:]
    assert servers, "no fallback server was seen"
    assert re.search(r"fallback server for facile stopped in [0-9.]+ s \(exit code 0\)", err)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["events"]["read"] == 10 and report["events"]["failed"] == 0
    deadline = time.monotonic() + 10
    while any(group_alive(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(group_alive(pid) for pid in servers), "the fallback server left processes"
    folders = [line.split("its log: ", 1)[-1] for line in err.splitlines() if "its log" in line]
    assert folders == [], folders                      # kept only after an unclean stop


# --- the process helpers of the stop ------------------------------------------------------------

def test_a_group_of_zombies_is_not_alive():
    """A process that exited but was not collected yet (a zombie) holds nothing but its PID:
    its group counts as gone (an orphan may wait a second or two for init to collect it)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:                  # exited, not collected: a zombie
        state = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.01)
    try:
        os.killpg(child.pid, 0)                          # the group still "exists"...
        assert not group_alive(child.pid)               # ...but nothing in it runs
    finally:
        child.wait(10)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                               start_new_session=True)
    try:
        assert group_alive(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait(10)
    assert not group_alive(sleeper.pid)


REAPER = textwrap.dedent("""
    import os, subprocess, sys, time
    from recorun.processes import become_subreaper, descendants, reap_children
    assert become_subreaper()
    # a child that starts a grandchild and exits at once: the grandchild, orphaned, becomes
    # this process's child
    subprocess.run(["sh", "-c", "sleep 0.5 & echo $!"], stdout=open("grandchild", "w"),
                   check=True)
    grandchild = int(open("grandchild").read())
    assert os.getppid() != grandchild and grandchild in descendants(os.getpid())
    reaped = reap_children(timeout_s=20)
    assert grandchild in reaped, (grandchild, reaped)
    assert descendants(os.getpid()) == []
    print("ok")
""")


def test_recorun_server_waits_for_every_process_it_started(tmp_path):
    """recorun-server makes itself the reaper of its orphaned descendants and waits for them
    before it exits (the python backend's helpers outlive their parents for a moment)."""
    done = subprocess.run([sys.executable, "-c", REAPER], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
