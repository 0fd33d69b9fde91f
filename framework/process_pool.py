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

import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

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
    try:
        worker = ChunkWorker(task)
    except WorkerStartError as exc:
        conn.send(("start_failed", exc.as_dict()))
        return
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
    chunk: object = None                 # the ChunkState it is running, or None (idle)
    attempt: str = ""
    alive: bool = True
    report: dict | None = None           # its process report, once finished
    started_s: float = 0.0
    history: list = field(default_factory=list)


class ProcessPool:
    """``workers`` worker processes running one chunked job's ``task`` (the workflow mapping,
    its file and the outputs' part folders: see :class:`~recorun.framework.chunked.ChunkWorker`)."""

    kind = "processes"

    def __init__(self, workers: int, task: dict):
        self.size = workers
        self.task = task
        self.workers: list[Worker] = []

    def start(self) -> list[dict]:
        """Start every worker and wait until each has built the workflow; the start failures
        (``[]`` when all are ready)."""
        began = time.monotonic()
        for i in range(self.size):
            ours, theirs = SPAWN.Pipe()
            process = SPAWN.Process(target=_worker_main, args=(theirs, self.task),
                                    name=f"recorun-worker-{i}", daemon=False)
            process.start()
            theirs.close()
            self.workers.append(Worker(i, process, ours))
        failures = []
        for worker in self.workers:
            try:
                kind, payload = worker.conn.recv()
            except (EOFError, OSError):
                worker.process.join(5)
                failures.append({"error": f"worker process {worker.process.pid} died while "
                                          f"building the workflow (exit code "
                                          f"{worker.process.exitcode})", "exit_code": 1})
                worker.alive = False
                continue
            if kind == "ready":
                worker.where = payload
                worker.started_s = time.monotonic() - began
            else:
                failures.append(payload)
                worker.alive = False
        return failures

    def idle(self) -> list[Worker]:
        return [w for w in self.workers if w.alive and w.chunk is None]

    def busy(self) -> list[Worker]:
        return [w for w in self.workers if w.alive and w.chunk is not None]

    def send(self, worker: Worker, state, attempt: str) -> None:
        worker.chunk, worker.attempt = state, attempt
        worker.conn.send(("chunk", state.chunk, attempt))

    def poll(self, timeout: float) -> list[tuple]:
        """What happened within ``timeout`` seconds: ``("chunk", worker, result)`` for a chunk
        done and ``("died", worker, state)`` for a worker that died (with the chunk it had)."""
        alive = [w for w in self.workers if w.alive]
        if not alive:
            return []
        ready = wait([w.conn for w in alive] + [w.process.sentinel for w in alive], timeout)
        events = []
        for worker in alive:
            if worker.conn in ready:
                try:
                    kind, payload = worker.conn.recv()
                except (EOFError, OSError):
                    kind, payload = "eof", None
                if kind == "chunk":
                    state, worker.chunk = worker.chunk, None
                    worker.history.append(state.chunk.id)
                    events.append(("chunk", worker, state, payload))
                    continue
            if worker.process.sentinel in ready or not worker.process.is_alive():
                worker.process.join(1)
                if worker.process.is_alive():
                    continue
                worker.alive = False
                state, worker.chunk = worker.chunk, None
                events.append(("died", worker, state, worker.process.exitcode))
        return events

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """Pass a stop on to every worker: they finish the events in flight."""
        for worker in self.workers:
            if worker.alive and worker.process.pid:
                try:
                    os.kill(worker.process.pid, signum)
                except ProcessLookupError:
                    pass

    def finish(self, timeout_s: float = 120.0) -> list[dict]:
        """Tell every live worker to end its job (end_job once) and collect the process
        reports; a worker that does not answer in time is killed."""
        for worker in self.workers:
            if worker.alive:
                try:
                    worker.conn.send(("finish",))
                except (BrokenPipeError, OSError):
                    worker.alive = False
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            if not worker.alive:
                continue
            left = max(deadline - time.monotonic(), 0.1)
            if worker.conn.poll(left):
                try:
                    kind, payload = worker.conn.recv()
                    if kind == "finished":
                        worker.report = payload
                except (EOFError, OSError):
                    pass
            worker.process.join(max(deadline - time.monotonic(), 1.0))
        self.close()
        return [w.report for w in self.workers if w.report is not None]

    def close(self) -> None:
        """Kill whatever is still running (an abort, or a worker that hung)."""
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(10)
            worker.alive = False
            worker.conn.close()
