"""The local fallback server: a ``recorun-server`` that recorun starts and stops itself.

:class:`FallbackServer` runs ``[sys.executable, "-m", "server.cli", "--models", ...,
"--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", *options]`` in its own session
(process group = its PID), waits for its ``READY grpc=... http=... metrics=...`` line (its
stderr goes to a log file; on failure the log's tail is printed to stderr and
:class:`FallbackServerError` carries it), and stops it with SIGTERM (then SIGKILL to the process
group if it hangs or leaves anything behind).

Nothing may orphan it:

* the registry stops it at end_job (or when its last client is released);
* an ``atexit`` hook stops every fallback server still running when the interpreter exits
  (after Ctrl-C too);
* on Linux the server also gets ``PR_SET_PDEATHSIG = SIGTERM``: should the job's process die
  without running ``atexit`` (a second Ctrl-C's ``os._exit``, SIGKILL), the kernel sends the
  server SIGTERM and it stops cleanly. The death signal follows the *thread* that forked, so the
  server is started from a watcher thread that lives exactly as long as the server process.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from server.processes import child_preexec, group_alive, kill_group

from .base import LOG, SonicError

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0

_RUNNING: set[FallbackServer] = set()
_RUNNING_LOCK = threading.Lock()


class FallbackServerError(SonicError):
    """The fallback server did not start (``log`` has the tail of its output)."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


def _project_root() -> str | None:
    spec = importlib.util.find_spec("server")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))).resolve().parent)


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
        self.command = [python or sys.executable, "-m", "server.cli",
                        "--models", ",".join(self.models), "--grpc-port", "0",
                        "--http-port", "0", "--metrics-port", "0", *self.options]
        self.process: subprocess.Popen | None = None
        self.pid: int | None = None
        self.grpc = self.http = self.metrics = ""
        self.ready_line = ""
        self.started_s = 0.0
        self.exit_code: int | None = None
        self._logdir = Path(tempfile.mkdtemp(prefix="recorun-fallback-"))
        self.log_path = self._logdir / "recorun-server.log"
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def __repr__(self) -> str:
        return (f"FallbackServer(models={list(self.models)}, pid={self.pid}, "
                f"grpc={self.grpc or None})")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

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
            if self._watcher is not None:
                raise RuntimeError(f"{self!r} was already started")
            self._watcher = threading.Thread(target=self._watch, daemon=True,
                                             name=f"fallback-server-{'+'.join(self.models)}")
            began = time.perf_counter()
            self._watcher.start()
        self._ready.wait(self.ready_timeout_s + 10)
        self.started_s = time.perf_counter() - began
        if self._start_error is not None or not self.ready_line:
            self._kill_group()
            log = self.log()
            reason = self._start_error or "no READY line"
            message = (f"the fallback recorun-server for {', '.join(self.models)} did not "
                       f"start: {reason} (exit code {self.exit_code}, command "
                       f"{' '.join(self.command)}); its log ({self.log_path}) ends:\n"
                       f"{log[-4000:]}")
            print(message, file=sys.stderr, flush=True)
            raise FallbackServerError(message, log)
        LOG.info("fallback server for %s ready at %s in %.1f s (pid %d)", ", ".join(self.models),
                 self.grpc, self.started_s, self.pid)
        return self

    def _watch(self) -> None:
        """Starts the server, reads its READY line, then waits for it to exit: the death
        signal is tied to this thread."""
        env = dict(os.environ)
        root = _project_root()
        if root:
            env["PYTHONPATH"] = os.pathsep.join(
                [root, *filter(None, [env.get("PYTHONPATH", "")])])
        try:
            with open(self.log_path, "w") as log:
                self.process = subprocess.Popen(
                    self.command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                    env=env, start_new_session=True, preexec_fn=child_preexec(self.cpus))
            self.pid = self.process.pid
            with _RUNNING_LOCK:
                _RUNNING.add(self)
            line = self._read_ready_line()
            if line.startswith("READY "):
                fields = dict(item.split("=", 1) for item in line.split()[1:] if "=" in item)
                self.grpc, self.http = fields.get("grpc", ""), fields.get("http", "")
                self.metrics = fields.get("metrics", "")
                self.ready_line = line if self.grpc else ""
            if not self.ready_line:
                try:                                    # stdout closed: it is exiting
                    self.exit_code = self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.exit_code = None
                self._start_error = FallbackServerError(
                    f"it printed {line!r} instead of a READY line" if line else
                    f"no READY line within {self.ready_timeout_s:.0f} s"
                    if self.exit_code is None else "it exited before it was ready")
        except BaseException as exc:                    # Popen failed
            self._start_error = exc
        finally:
            self._ready.set()
        if self.ready_line:
            self.exit_code = self.process.wait()

    def _read_ready_line(self) -> str:
        deadline = time.monotonic() + self.ready_timeout_s
        fd = self.process.stdout.fileno()
        data = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in data:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if selector.select(min(left, 0.5)):
                    chunk = os.read(fd, 4096)
                    if not chunk:
                        break
                    data += chunk
                elif self.process.poll() is not None:
                    break
        return data.decode(errors="replace").strip().splitlines()[0] if data.strip() else ""

    # stop ----------------------------------------------------------------------------------
    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait; SIGKILL the process group if it hangs or leaves processes behind.
        Returns the exit code. Idempotent."""
        with self._lock:
            if self._stopped or self.process is None:
                self._stopped = True
                return self.exit_code
            self._stopped = True
        process = self.process
        if process.poll() is None:
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                LOG.warning("fallback server (pid %d) did not stop within %.0f s of SIGTERM; "
                            "killing its process group", process.pid, timeout_s)
                self._kill_group()
        self.exit_code = process.poll()
        deadline = time.monotonic() + 10.0
        while group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_alive(process.pid):
            LOG.warning("fallback server (pid %d) left processes behind; killing its process "
                        "group", process.pid)
            self._kill_group()
        if process.stdout and not process.stdout.closed:
            process.stdout.close()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(5)
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        if self.exit_code == 0 or not self.ready_line:     # clean, or already printed
            import shutil

            shutil.rmtree(self._logdir, ignore_errors=True)
        else:
            LOG.warning("fallback server (pid %d) exited with %s; its log: %s", process.pid,
                        self.exit_code, self.log_path)
        LOG.info("fallback server for %s stopped (exit code %s)", ", ".join(self.models),
                 self.exit_code)
        return self.exit_code

    def _kill_group(self) -> None:
        kill_group(self.process)
        with _RUNNING_LOCK:
            _RUNNING.discard(self)


def running_servers() -> list[FallbackServer]:
    """The fallback servers of this process that are not stopped yet."""
    with _RUNNING_LOCK:
        return list(_RUNNING)


@atexit.register
def _stop_all_at_exit() -> None:
    for server in running_servers():
        try:
            server.stop(timeout_s=15.0)
        except Exception:                               # pragma: no cover
            server._kill_group()
