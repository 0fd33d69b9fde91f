"""The test suite's fixtures (tests take them as arguments; nothing imports this file).

* ``new_recorder``: the :class:`Recorder` class; test modules report what they did into a
  recorder, passed to them as a workflow parameter (``run_workflow`` deep-copies the workflow,
  and a recorder returns itself from ``__deepcopy__`` so that every copy of a module, one per
  stream, writes to the test's object);
* ``workflow``: builds a workflow mapping on an EmptySource;
* ``run_guarded``: runs a workflow in a thread and fails the test instead of hanging;
* ``recorun_server_process``: :class:`RecorunServerProcess`, a recorun-server subprocess;
  ``triton_server``: one such server with all three models for the whole session.

Markers (pyproject.toml): ``server`` (a real Triton server), ``dask``, ``nginx``,
``subprocess``, ``install``; ``pytest -m "not server and not dask and not install"`` is the fast
inner loop.

The servers the tests start keep their ONNX exports in a cache folder of the session
(``RECORUN_ONNX_CACHE``, removed at the end), not in the user's ``~/.cache``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections import Counter

import pytest

from recorun import run_workflow

_ONNX_CACHE = None
if not os.environ.get("RECORUN_ONNX_CACHE"):
    _ONNX_CACHE = os.environ["RECORUN_ONNX_CACHE"] = tempfile.mkdtemp(prefix="recorun-onnx-")


def pytest_sessionfinish(session, exitstatus):
    if _ONNX_CACHE is not None:
        shutil.rmtree(_ONNX_CACHE, ignore_errors=True)


class Recorder:
    """A lock-protected, ordered log of ``(what, ...)`` tuples."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries: list[tuple] = []

    def __deepcopy__(self, memo):
        return self

    def record(self, *entry) -> None:
        with self.lock:
            self.entries.append(entry)

    def where(self, *prefix) -> list[tuple]:
        """Entries that start with ``prefix``."""
        with self.lock:
            return [e for e in self.entries if e[:len(prefix)] == prefix]

    def counts(self, *prefix) -> Counter:
        """How often each entry starting with ``prefix`` was recorded (keyed by the rest)."""
        return Counter(e[len(prefix):] for e in self.where(*prefix))


#: fixtures that start something, and the marker a test that uses them gets
MARKERS_BY_FIXTURE = {"triton_server": "server", "recorun_server_process": "server",
                      "dask_cluster": "dask"}


def pytest_collection_modifyitems(items):
    """Mark the tests that start a Triton server or a Dask cluster through a fixture (the
    modules that start them otherwise set ``pytestmark`` themselves)."""
    for item in items:
        for fixture, marker in MARKERS_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="session")
def new_recorder() -> type[Recorder]:
    """The Recorder class, for tests that need several recorders."""
    return Recorder


def make_workflow(modules: dict, paths: dict | None = None, endpaths: dict | None = None, *,
             events: int = 20, **process) -> dict:
    """A workflow dict on an EmptySource of ``events`` events numbered 1, 2, ..."""
    process.setdefault("report_every_s", 0)
    return {"process": process,
            "source": {"type": "EmptySource", "count": events, "first_event": 1},
            "modules": modules, "paths": paths or {}, "endpaths": endpaths or {}}


@pytest.fixture(scope="session")
def workflow():
    """``workflow(modules, paths, endpaths, events=20, **process)``: see :func:`make_workflow`."""
    return make_workflow


def guarded_run(wf: dict, timeout: float = 60.0, **kwargs):
    """Run a workflow in a daemon thread; fail the test (not hang) if it does not finish."""
    box: dict = {}

    def target():
        try:
            box["result"] = run_workflow(wf, **kwargs)
        except BaseException as exc:      # handed to the test below
            box["error"] = exc

    thread = threading.Thread(target=target, name="job-under-test", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"the job did not finish within {timeout} s (deadlock?)")
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.fixture(scope="session")
def run_guarded():
    """``run_guarded(workflow, timeout=60, **run_workflow_kwargs)``: see :func:`guarded_run`."""
    return guarded_run


# --- recorun-server: a real Triton server for tests/test_server.py (and any test that needs one)

import os as _os
import selectors as _selectors
import signal as _signal
import subprocess as _subprocess
import sys as _sys
import time as _time
from pathlib import Path as _Path


class RecorunServerProcess:
    """``recorun-server`` run as a subprocess in its own session (process group = its PID),
    stderr to ``log_path``; ``launch`` returns once it has printed its READY line. ``grpc``,
    ``http`` and ``metrics`` are ``HOST:PORT``. The environment it gets has no
    ``PYTRITON_HOME`` or ``LD_LIBRARY_PATH``: the server must not need them."""

    def __init__(self, process: _subprocess.Popen, log_path: _Path, ready_line: str,
                 started_s: float):
        self.process = process
        self.pid = process.pid
        self.log_path = log_path
        self.ready_line = ready_line
        self.started_s = started_s            # launch to READY, seconds
        self.rest_of_stdout = ""               # what it printed after READY (after stop)
        fields = dict(item.split("=", 1) for item in ready_line.split()[1:])
        self.grpc, self.http, self.metrics = fields["grpc"], fields["http"], fields["metrics"]

    @staticmethod
    def command() -> list[str]:
        script = _Path(_sys.executable).with_name("recorun-server")
        return [str(script)] if script.exists() else [_sys.executable, "-m", "recorun.server.cli"]

    @staticmethod
    def environment(**extra: str) -> dict:
        env = {k: v for k, v in _os.environ.items()
               if k not in ("PYTRITON_HOME", "LD_LIBRARY_PATH")}
        env.update(extra)
        return env

    @classmethod
    def launch(cls, *args: str, log_dir, timeout: float = 120.0, env: dict | None = None,
               command: list[str] | None = None) -> RecorunServerProcess:
        """Start ``command`` (default: recorun-server) with ``args``; its READY line read."""
        log_path = _Path(log_dir) / f"recorun-server-{_time.monotonic_ns()}.log"
        began = _time.perf_counter()
        with open(log_path, "w") as log:
            process = _subprocess.Popen([*(command or cls.command()), *args], stdout=_subprocess.PIPE,
                                        stderr=log, stdin=_subprocess.DEVNULL,
                                        env=env or cls.environment(), start_new_session=True)
        line = b""
        fd = process.stdout.fileno()
        with _selectors.DefaultSelector() as selector:
            selector.register(fd, _selectors.EVENT_READ)
            while b"\n" not in line:
                left = began + timeout - _time.perf_counter()
                if left <= 0:
                    break
                if selector.select(min(left, 1.0)):
                    chunk = _os.read(fd, 4096)
                    if not chunk:                 # stdout closed: the server exited
                        break
                    line += chunk
                elif process.poll() is not None:
                    break
        text = line.decode(errors="replace").strip()
        if not text.startswith("READY "):
            cls._kill(process)
            log_text = log_path.read_text(errors="replace")
            pytest.fail(f"recorun-server {' '.join(args)} did not print READY in {timeout:.0f} s "
                        f"(exit code {process.poll()}, stdout {text!r}); its log:\n"
                        f"{log_text[-6000:]}")
        return cls(process, log_path, text, _time.perf_counter() - began)

    @staticmethod
    def _kill(process: _subprocess.Popen) -> None:
        if process.poll() is None:
            try:
                _os.killpg(process.pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = _signal.SIGTERM, *, group: bool = False,
             timeout: float = 30.0) -> int:
        """Send ``sig`` to the server (its whole process group with ``group``, as a terminal's
        Ctrl-C does) and wait for it; on timeout kill the group and fail."""
        if self.process.poll() is None:
            (_os.killpg if group else _os.kill)(self.pid, sig)
        try:
            code = self.process.wait(timeout)
        except _subprocess.TimeoutExpired:
            self._kill(self.process)
            pytest.fail(f"recorun-server did not stop within {timeout:.0f} s of {sig!r}; "
                        f"log:\n{self.log()[-4000:]}")
        finally:
            if not self.process.stdout.closed:
                self.rest_of_stdout = self.process.stdout.read().decode(errors="replace")
                self.process.stdout.close()
        return code


@pytest.fixture(scope="session")
def recorun_server_process() -> type[RecorunServerProcess]:
    return RecorunServerProcess


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory):
    """One recorun-server with all three models for the test session (free ports, dynamic
    batching with preferred sizes 10 and 4500 and a 100 us queue delay); stopped with SIGTERM
    at the end, which must end it with exit code 0."""
    server = RecorunServerProcess.launch(
        "--models", "all", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        "--preferred-batch-size", "10", "4500", "--max-queue-delay-us", "100",
        log_dir=tmp_path_factory.mktemp("recorun-server"))
    yield server
    code = server.stop(_signal.SIGTERM)
    assert code == 0, f"recorun-server exited with {code} on SIGTERM:\n{server.log()[-4000:]}"
    assert server.rest_of_stdout == "", "recorun-server printed more than its READY line"


# --- fault injection for chunked jobs (worker processes, Dask workers) ----------------------

FAULTS = '''
"""Fault and latency injection for the tests of chunked jobs (tests/conftest.py)."""
import os
import time
import uuid
from pathlib import Path

from recorun import Analyzer, Concurrency, Param


class FaultInjectingAnalyzer(Analyzer):
    """Fault injection: raises on event number ``fail_event`` (-1: never), leaving a file in
    ``record`` each time; injected latency: sleeps ``sleep_s`` per event."""

    concurrency = Concurrency.SHARED
    fail_event = Param(int, -1, doc="event number on which it raises (-1: none)")
    sleep_s = Param(float, 0.0, doc="injected latency per event, s")
    record = Param(str, "", doc="folder for a file per raised fault")

    def analyze(self, event):
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if event.id.event == self.fail_event:
            if self.record:
                Path(self.record, f"{os.getpid()}-{uuid.uuid4().hex}").touch()
            raise RuntimeError(f"injected fault on event {event.id.event}")
'''



@pytest.fixture(scope="session")
def fault_injection(tmp_path_factory):
    """``fault(**params)``: the ``--set`` options that add ``FaultInjectingAnalyzer`` (raise on
    an event number, or sleep per event) to the end path ``out``. Its module is written to a
    folder put on this process's path and on PYTHONPATH, for the worker processes."""
    import json as _json

    folder = tmp_path_factory.mktemp("fault_injection")
    (folder / "chunk_faults.py").write_text(FAULTS)
    _sys.path.insert(0, str(folder))
    old = _os.environ.get("PYTHONPATH")
    _os.environ["PYTHONPATH"] = _os.pathsep.join(p for p in (str(folder), old) if p)

    def fault(**params) -> list[str]:
        values = ", ".join(f"{k}: {_json.dumps(v)}" for k, v in params.items())
        return ["--set", f"modules.fault={{type: 'chunk_faults:FaultInjectingAnalyzer', "
                         f"{values}}}", "--set", "endpaths.out=[output, fault]"]
    yield fault
    _sys.path.remove(str(folder))
    if old is None:
        _os.environ.pop("PYTHONPATH", None)
    else:
        _os.environ["PYTHONPATH"] = old
