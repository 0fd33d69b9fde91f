"""The local fallback server: a ``recorun-server`` that recorun starts and stops itself.

:class:`FallbackServer` runs ``[sys.executable, "-m", "recorun.server.cli", "--models", ...,
"--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", *options]`` as a
:class:`~recorun.processes.ChildProcess` (its own session; SIGTERM from the kernel should the
job die; stopped at exit), waits for its ``READY grpc=... http=... metrics=...`` line (its
stderr goes to a log file; on failure the log's tail is printed to stderr and
:class:`FallbackServerError` carries it), and stops it with SIGTERM (then SIGKILL to the process
group if it hangs or leaves anything behind). The registry stops it at end_job (or when its last
client is released), after the clients have read the server's statistics. With the model's
ONNX export in recorun-server's cache it is READY ~1 s after it was started, and with no
request in flight it stops in ~1.5 s, exit code 0, having collected every process it started
(:class:`recorun.server.serve.RecorunServer`; server/README.md, "Start and stop").

An ``atexit`` hook stops any fallback server left running when the job's interpreter exits.
The server needs the ``server`` extra (torch, nvidia-pytriton) in this Python environment: a
job that would need a fallback server without it stops before its first event, naming it.
"""
from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from recorun.framework.extras import check
from recorun.processes import ChildProcess

from .base import LOG, SonicError

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0

_RUNNING: set[FallbackServer] = set()
_RUNNING_LOCK = threading.Lock()

#: what recorun-server needs that the core install does not have
SERVER_PACKAGES = {"torch": "recorun[server]", "pytriton": "recorun[server]"}


class FallbackServerError(SonicError):
    """The fallback server did not start (``log`` has the tail of its output)."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


def check_server_installed() -> None:
    """MissingExtra (a configuration error) when recorun-server cannot run here."""
    check(SERVER_PACKAGES, "the local fallback server (a SONIC model that no configured "
                           "server provides)")


class FallbackServer:
    """One local ``recorun-server`` for ``models``; ``options`` are extra recorun-server
    arguments (e.g. ``["--instances", "2"]``); ``cpus`` pins the server and everything it
    starts to those cores (Linux; benchmarks use it to keep the server off the clients' cores).
    """

    def __init__(self, models: Sequence[str], options: Sequence[str] = (), *,
                 ready_timeout_s: float = READY_TIMEOUT_S, python: str | None = None,
                 cpus: Sequence[int] | None = None):
        if not models:
            raise ValueError("a fallback server needs at least one model")
        self.cpus = frozenset(int(c) for c in cpus) if cpus else None
        self.models = tuple(models)
        self.options = tuple(str(o) for o in options)
        self.ready_timeout_s = float(ready_timeout_s)
        self.command = [python or sys.executable, "-m", "recorun.server.cli",
                        "--models", ",".join(self.models), "--grpc-port", "0",
                        "--http-port", "0", "--metrics-port", "0", *self.options]
        self.child: ChildProcess | None = None
        self.grpc = self.http = self.metrics = ""
        self.ready_line = ""
        self.started_s = 0.0
        self.stopped_s = 0.0
        self.exit_code: int | None = None
        self._logdir = Path(tempfile.mkdtemp(prefix="recorun-fallback-"))
        self.log_path = self._logdir / "recorun-server.log"
        self._lock = threading.Lock()
        self._started = False
        self._stop_asked = False

    def __repr__(self) -> str:
        return (f"FallbackServer(models={list(self.models)}, pid={self.pid}, "
                f"grpc={self.grpc or None})")

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    @property
    def process(self) -> subprocess.Popen | None:
        return self.child.process if self.child is not None else None

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # start ---------------------------------------------------------------------------------
    def start(self) -> FallbackServer:
        """Start the server and wait until it is READY; raise :class:`FallbackServerError`
        (after printing its log to stderr) if it is not within ``ready_timeout_s``."""
        with self._lock:
            if self._started:
                raise RuntimeError(f"{self!r} was already started")
            self._started = True
        began = time.perf_counter()
        problem = None
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        try:
            with self._lock, open(self.log_path, "w") as log:
                if self._stop_asked:
                    raise OSError("it was stopped before it started")
                self.child = ChildProcess(self.command, name=f"fallback-server-"
                                          f"{'+'.join(self.models)}", stdout=subprocess.PIPE,
                                          stderr=log, cpus=self.cpus).start()
            line = self.child.read_line(self.ready_timeout_s)
            if line.startswith("READY "):
                fields = dict(item.split("=", 1) for item in line.split()[1:] if "=" in item)
                self.grpc, self.http = fields.get("grpc", ""), fields.get("http", "")
                self.metrics = fields.get("metrics", "")
                self.ready_line = line if self.grpc else ""
            if not self.ready_line:
                try:                                    # stdout closed: it is exiting
                    self.exit_code = self.child.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.exit_code = None
                problem = (f"it printed {line!r} instead of a READY line" if line else
                           f"no READY line within {self.ready_timeout_s:.0f} s"
                           if self.exit_code is None else "it exited before it was ready")
        except OSError as exc:                          # the command cannot start
            problem = exc
        self.started_s = time.perf_counter() - began
        if problem is not None and self._stop_asked:        # the job is ending: say no more
            self.kill()
            raise FallbackServerError(f"the fallback recorun-server for "
                                      f"{', '.join(self.models)} was stopped while it started")
        if problem is not None:
            self.kill()
            log = self.log()
            message = (f"the fallback recorun-server for {', '.join(self.models)} did not "
                       f"start: {problem} (exit code {self.exit_code}, command "
                       f"{' '.join(self.command)}); its log ({self.log_path}) ends:\n"
                       f"{log[-4000:]}")
            print(message, file=sys.stderr, flush=True)
            raise FallbackServerError(message, log)
        LOG.info("fallback server for %s ready at %s in %.1f s (pid %d)", ", ".join(self.models),
                 self.grpc, self.started_s, self.pid)
        return self

    # stop ---------------------------------------------------------------------------------
    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait; SIGKILL the process group if it hangs or leaves processes behind.
        Returns the exit code. Idempotent."""
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        with self._lock:                  # a start under way then fails at once
            self._stop_asked = True
            child = self.child
        if child is None:
            return self.exit_code
        began = time.perf_counter()
        self.exit_code = child.stop(timeout_s)
        self.stopped_s = time.perf_counter() - began
        if self.exit_code == 0 or not self.ready_line:     # clean, or already printed
            shutil.rmtree(self._logdir, ignore_errors=True)
        else:
            LOG.warning("fallback server (pid %d) exited with %s; its log: %s", self.pid,
                        self.exit_code, self.log_path)
        LOG.info("fallback server for %s stopped in %.1f s (exit code %s)",
                 ", ".join(self.models), self.stopped_s, self.exit_code)
        return self.exit_code

    def kill(self) -> None:
        """SIGKILL the server's whole process group at once."""
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        if self.child is not None:
            self.child.kill()
            self.exit_code = self.child.exit_code


def running_servers() -> list[FallbackServer]:
    """The fallback servers of this process that were started and are not stopped yet."""
    with _RUNNING_LOCK:
        return list(_RUNNING)


@atexit.register
def _stop_all_at_exit() -> None:
    """Stop the fallback servers still running when the interpreter exits (after Ctrl-C too),
    cleanly, so that their log folders go with them."""
    for server in running_servers():
        try:
            server.stop(timeout_s=15.0)
        except Exception:                               # pragma: no cover
            server.kill()
