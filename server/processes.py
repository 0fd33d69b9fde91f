"""Child processes in their own process group: started so that they die with their starter,
checked and killed as a group, and their descendants found. Used by recorun-server (the
processes pytriton starts), the local fallback server and the nginx balancer."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


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
    """Does any process of process group ``pgid`` still exist?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                             # pragma: no cover
        return True
    return True


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
