"""Child processes that never outlive recorun: one helper for every server recorun starts.

:class:`ChildProcess` runs a command in its own session (process group = its PID), so that it
and everything it starts can be signalled and killed as a group, and stops it with SIGTERM,
then SIGKILL to the group when it hangs or leaves a process behind. Nothing may orphan it:

* :meth:`ChildProcess.stop` is idempotent; an ``atexit`` hook stops every child still running
  when the interpreter exits (after Ctrl-C too);
* on Linux the child gets ``PR_SET_PDEATHSIG = SIGTERM``: should this process die without
  running ``atexit`` (``os._exit``, SIGKILL), the kernel sends the child SIGTERM. The death
  signal follows the *thread* that forked, so the child is started from a watcher thread that
  lives exactly as long as the child.

recorun-server makes itself the reaper of its orphaned descendants (:func:`become_subreaper`)
and, before it exits, waits for every one of them (:func:`reap_children`): the helpers that
tritonserver's python backend starts (a tensor store, multiprocessing's resource trackers)
outlive their parents for a moment, and would otherwise linger as init's zombies.

Used by the local fallback server (:mod:`recorun.sonic_clients.fallback`), the nginx balancer
(:mod:`recorun.server.balancer`) and recorun-server for the processes pytriton starts. It needs
only the standard library, so the job side and the server side both import it.
"""
from __future__ import annotations

import atexit
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

LOG = logging.getLogger("recorun.processes")

PR_SET_PDEATHSIG = 1

_RUNNING: set[ChildProcess] = set()
_RUNNING_LOCK = threading.Lock()


def child_preexec(cpus: frozenset[int] | None = None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when the *thread* that started it
    dies and, with ``cpus``, pins the child (and so everything it starts) to those cores;
    None where there is nothing to do."""
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            prctl = ctypes.CDLL(None, use_errno=True).prctl
            prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                              ctypes.c_ulong]
        except Exception:                               # pragma: no cover
            prctl = None
    if prctl is None and not cpus:
        return None
    term = int(signal.SIGTERM)

    def preexec():                                       # runs in the child, after setsid
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, term, 0, 0, 0)
        if cpus:
            os.sched_setaffinity(0, cpus)
    return preexec


def group_alive(pgid: int) -> bool:
    """Does any process of process group ``pgid`` still run? Zombies do not count: a process
    that has exited but whose parent has not collected it yet (an orphan waits for init to
    collect it, which can take a second or two) holds nothing but its PID."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                             # pragma: no cover
        return True
    states = _group_states(pgid)
    return states is None or any(state != "Z" for state in states)


def _group_states(pgid: int) -> list[str] | None:
    """The states (``R``, ``S``, ``Z``...) of the processes of group ``pgid``, from /proc;
    None where there is no /proc."""
    try:
        entries = os.listdir("/proc")
    except OSError:                                     # pragma: no cover
        return None
    states = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid):
            states.append(fields[0])
    return states


PR_SET_CHILD_SUBREAPER = 36


def _stop_resource_tracker() -> None:
    """Stop multiprocessing's resource tracker of this process, if it started one."""
    module = sys.modules.get("multiprocessing.resource_tracker")
    tracker = getattr(module, "_resource_tracker", None)
    if tracker is None or getattr(tracker, "_pid", None) is None or not hasattr(tracker, "_stop"):
        return
    try:
        tracker._stop()
    except Exception as exc:                            # pragma: no cover
        LOG.debug("stopping multiprocessing's resource tracker: %s", exc)


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux): a process it started,
    directly or not, whose parent exits becomes its child instead of init's, so that
    :func:`reap_children` can wait for every one of them. False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except Exception:                                   # pragma: no cover
        return False


def reap_children(timeout_s: float = 10.0) -> list[int]:
    """Wait until this process has no child left (with :func:`become_subreaper`: no descendant
    left at all), collecting each as it exits; after ``timeout_s`` SIGKILL the ones left. Call
    it last, when everything that started them has stopped (it collects any child, those of
    ``subprocess`` included). This process's own multiprocessing resource tracker, which
    would run until this process exits, is stopped first (it then removes the shared memory
    still registered with it, as it would at exit). Returns the PIDs collected."""
    _stop_resource_tracker()
    reaped: list[int] = []
    deadline = time.monotonic() + timeout_s
    killed = False
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:                       # no children at all
            return reaped
        if pid:
            reaped.append(pid)
            continue
        if killed and time.monotonic() > deadline + 5.0:       # pragma: no cover
            return reaped                           # unkillable (in the kernel): give up
        if time.monotonic() > deadline and not killed:
            left = descendants(os.getpid())
            LOG.warning("processes %s still run %.0f s after the stop: killing them", left,
                        timeout_s)
            for child in left:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed = True
        time.sleep(0.01)


def kill_group(process: subprocess.Popen | None) -> None:
    """SIGKILL the process group of ``process`` (started with ``start_new_session``) and reap
    it."""
    if process is None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:                    # pragma: no cover
        pass


def descendants(pid: int) -> list[int]:
    """PIDs of the processes below ``pid`` (children first), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class ChildProcess:
    """``command`` run in its own session from a watcher thread (see the module docstring).

    ``stdout``: ``subprocess.PIPE`` (read it with :meth:`read_line`) or an open file;
    ``stderr``: an open file or ``subprocess.STDOUT``; ``cpus``: pin it to those cores.
    """

    def __init__(self, command: Sequence[str], *, name: str, env: dict | None = None,
                 stdout=subprocess.PIPE, stderr=None, cpus: frozenset[int] | None = None):
        self.command = [str(c) for c in command]
        self.name = name
        self.env = env
        self.cpus = cpus
        self._stdout, self._stderr = stdout, stderr
        self.process: subprocess.Popen | None = None
        self.pid: int | None = None
        self.exit_code: int | None = None
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def __repr__(self) -> str:
        return f"ChildProcess({self.name!r}, pid={self.pid})"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> ChildProcess:
        """Start the command; returns once it runs. Raises OSError when it cannot start."""
        started = threading.Event()
        box: dict = {}

        def watch():
            try:
                box["process"] = subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=self._stdout,
                    stderr=self._stderr, env=self.env, start_new_session=True,
                    preexec_fn=child_preexec(self.cpus))
            except BaseException as exc:
                box["error"] = exc
                return
            finally:
                started.set()
            box["process"].wait()

        with self._lock:
            if self._watcher is not None:
                raise RuntimeError(f"{self!r} was already started")
            self._watcher = threading.Thread(target=watch, daemon=True, name=self.name)
            self._watcher.start()
        started.wait()
        if "error" in box:
            raise box["error"]
        self.process = box["process"]
        self.pid = self.process.pid
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        return self

    def read_line(self, timeout_s: float) -> str:
        """The first line the child writes on its piped stdout within ``timeout_s`` ('' when
        none: it closed stdout, exited or kept silent)."""
        deadline = time.monotonic() + timeout_s
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

    def stop(self, timeout_s: float = 30.0) -> int | None:
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
                LOG.warning("%s (pid %d) did not stop within %.0f s of SIGTERM; killing its "
                            "process group", self.name, process.pid, timeout_s)
                kill_group(process)
        self.exit_code = process.poll()
        deadline = time.monotonic() + 10.0
        while group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_alive(process.pid):
            LOG.warning("%s (pid %d) left processes behind; killing its process group",
                        self.name, process.pid)
            kill_group(process)
        self._forget()
        return self.exit_code

    def kill(self) -> None:
        """SIGKILL the whole process group at once."""
        with self._lock:
            self._stopped = True
        kill_group(self.process)
        if self.process is not None:
            self.exit_code = self.process.poll()
        self._forget()

    def _forget(self) -> None:
        if self.process is not None and self.process.stdout and not self.process.stdout.closed:
            self.process.stdout.close()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(5)
        with _RUNNING_LOCK:
            _RUNNING.discard(self)


def running_children() -> list[ChildProcess]:
    """The children of this process that are not stopped yet."""
    with _RUNNING_LOCK:
        return list(_RUNNING)


@atexit.register
def _stop_all_at_exit() -> None:
    for child in running_children():
        try:
            child.stop(timeout_s=15.0)
        except Exception:                               # pragma: no cover
            child.kill()
