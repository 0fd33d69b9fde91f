"""``--processes N``: a chunked job's workers as processes of this node.

Each worker is a fresh interpreter (multiprocessing's ``spawn``: no thread, lock or gRPC channel
of the driver is inherited) that builds the workflow once
(:class:`~recorun.framework.chunked.ChunkWorker`: begin_job once), then runs the chunks the
driver sends it one at a time, each with the job's own threads and streams, until the driver
tells it to finish (end_job once; its process report goes back).

Workers run in a process group of their own, so that a terminal's Ctrl-C reaches the driver
only; the driver passes the signal on, once, to every worker (they finish the events in
flight). Should the driver die, a worker gets SIGTERM from the kernel (Linux's parent-death
signal) or an end of file on its pipe, and stops. A worker that dies is seen through its
process sentinel; the driver knows which chunk it had.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from .chunked_run import WorkerPool, temporary_environment
from .native_threads import environment

PR_SET_PDEATHSIG = 1                    # prctl(2): signal me when my parent dies

SPAWN = multiprocessing.get_context("spawn")


def _die_with_the_driver() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except Exception:                               # pragma: no cover
            pass


def _worker_main(conn: Connection, task: dict) -> None:
    """A worker process: build once, then chunks until 'finish' (see the module docstring)."""
    os.setpgrp()
    _die_with_the_driver()
    from .chunked import ChunkWorker, WorkerStartError

    worker: ChunkWorker | None = None
    interrupts = []

    def on_signal(signum, _frame):
        interrupts.append(signum)
        if len(interrupts) > 1:
            os._exit(128 + signum)                      # the driver aborts: so do we
        if worker is not None:
            worker.interrupt()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    logging.basicConfig(stream=sys.stderr, format="%(message)s",
                        level=task.get("log_level", logging.WARNING))
    try:
        worker = ChunkWorker(task)
    except WorkerStartError as exc:
        conn.send(("start_failed", exc.as_dict()))
        return
    if interrupts:                                      # stopped while it set up
        worker.interrupt()
    conn.send(("ready", worker.where))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):                     # the driver is gone
            worker.finish()
            return
        if message[0] == "chunk":
            _, chunk, attempt = message
            conn.send(("chunk", worker.run(chunk, attempt)))
        elif message[0] == "finish":
            conn.send(("finished", worker.finish()))
            return


@dataclass
class Worker:
    """The driver's view of one worker process."""

    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    where: str = ""
    ready: bool = False
    state: object = None                 # the ChunkState it runs, or None (idle)
    alive: bool = True
    report: dict | None = None           # its process report, once finished
    chunks: int = 0                      # chunks it ran to the end
    events: int = 0


class ProcessPool(WorkerPool):
    """``size`` worker processes of this node (see the module docstring). A worker that dies
    is replaced (a new process builds the workflow), up to ``size`` replacements in all."""

    kind = "processes"

    def __init__(self, size: int):
        self.size = size
        self.workers: list[Worker] = []
        self.queue: deque = deque()          # (state, attempt) waiting for an idle worker
        self.task: dict = {}
        self.replacements = 0

    def start(self, task: dict) -> list[dict]:
        self.task = task
        for i in range(self.size):
            self._spawn(i)
        failures = []
        for worker in self.workers:
            failure = self._await_ready(worker)
            if failure:
                failures.append(failure)
        return failures

    def _spawn(self, index: int) -> Worker:
        limit = self.task["workflow"].get("process", {}).get("native_threads", 1)
        with temporary_environment({k: v for k, v in environment(limit).items()
                                    if k not in os.environ}):     # what a user set stays
            ours, theirs = SPAWN.Pipe()
            process = SPAWN.Process(target=_worker_main, args=(theirs, self.task),
                                    name=f"recorun-worker-{index}")
            process.start()
            theirs.close()
        worker = Worker(index, process, ours)
        self.workers.append(worker)
        return worker

    def _await_ready(self, worker: Worker) -> dict | None:
        """Block until ``worker`` has built the workflow; its start failure, or None."""
        try:
            kind, payload = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(5)
            kind, payload = "start_failed", {
                "error": f"worker process {worker.process.pid} died while it built the "
                         f"workflow (exit code {worker.process.exitcode})", "exit_code": 1,
                "worker": f"pid {worker.process.pid}"}
        if kind == "ready":
            worker.where, worker.ready = payload, True
            return None
        worker.alive = False
        return payload

    def submit(self, state, attempt: str) -> None:
        self.queue.append((state, attempt))
        self._dispatch()

    def _dispatch(self) -> None:
        for worker in self.workers:
            if not self.queue:
                return
            if worker.alive and worker.ready and worker.state is None:
                state, attempt = self.queue.popleft()
                state.status = "running"
                worker.state = state
                try:
                    worker.conn.send(("chunk", state.chunk, attempt))
                except (BrokenPipeError, OSError):
                    worker.state = None
                    self.queue.appendleft((state, attempt))
                    worker.alive = False

    def poll(self, timeout: float) -> list[tuple]:
        alive = [w for w in self.workers if w.alive]
        events: list[tuple] = []
        if not alive:
            while self.queue:
                state, _ = self.queue.popleft()
                events.append(("lost", state, "no worker process is left"))
            return events
        ready = wait([w.conn for w in alive] + [w.process.sentinel for w in alive], timeout)
        for worker in alive:
            if worker.conn in ready:
                try:
                    kind, payload = worker.conn.recv()
                except (EOFError, OSError):
                    kind, payload = "eof", None
                if kind == "chunk":
                    state, worker.state = worker.state, None
                    worker.chunks += 1
                    worker.events += payload["report"]["events"]["read"]
                    events.append(("done", state, payload))
                    continue
                if kind == "ready":                  # a replacement, set up
                    worker.where, worker.ready = payload, True
                    continue
                if kind == "start_failed":
                    worker.alive = False
                    continue
            if worker.process.sentinel in ready or not worker.process.is_alive():
                worker.process.join(1)
                if worker.process.is_alive():
                    continue
                worker.alive = False
                state, worker.state = worker.state, None
                if state is not None:
                    events.append(("lost", state, f"worker process {worker.process.pid} "
                                                  f"({worker.where}) died (exit code "
                                                  f"{worker.process.exitcode})"))
                if self.replacements < self.size:
                    self.replacements += 1
                    self._spawn(len(self.workers))
        self._dispatch()
        return events

    def interrupt(self) -> list:
        withdrawn = [state for state, _ in self.queue]
        self.queue.clear()
        for worker in self.workers:
            if worker.alive and worker.process.pid:
                try:
                    os.kill(worker.process.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        return withdrawn

    def finish(self, timeout_s: float = 300.0) -> list[dict]:
        for worker in self.workers:
            if worker.alive:
                try:
                    worker.conn.send(("finish",))
                except (BrokenPipeError, OSError):
                    worker.alive = False
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            while worker.alive and worker.conn.poll(max(deadline - time.monotonic(), 0.1)):
                try:
                    kind, payload = worker.conn.recv()
                except (EOFError, OSError):
                    break
                if kind == "finished":
                    worker.report = payload
                    break                        # (a replacement's late "ready" is skipped)
            worker.process.join(max(deadline - time.monotonic(), 1.0))
        self.close()
        reports = []
        for worker in self.workers:
            if worker.report is not None:
                reports.append(worker.report)
            elif worker.chunks:                  # it died: what the driver saw of it
                reports.append({"worker": worker.where, "pid": worker.process.pid,
                                "died": True, "chunks": worker.chunks,
                                "events": worker.events, "exit_code": worker.process.exitcode})
        return reports

    def close(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(10)
            worker.alive = False
            worker.conn.close()

    def section(self) -> dict:
        return {"executor": "processes", "workers": self.size,
                "replaced_workers": self.replacements}

    def describe(self) -> str:
        return f"{self.size} worker processes"
