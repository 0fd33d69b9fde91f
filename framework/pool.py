"""The thread pool that runs the scheduler's tasks, and a serial queue on top of it.

The calling thread is worker 0, so ``threads=1`` runs every module on the calling thread (the
synchronous, deterministic mode; a debugger sees a plain stack). A task that schedules a
continuation of itself with :meth:`ThreadPool.soon` keeps the first one on the same thread
(no queue round trip, no recursion); further ones go to the shared queue where any idle
worker takes them, as do those given to :meth:`ThreadPool.share`. No task ever blocks a worker
waiting for another task.

:meth:`ThreadPool.when_idle` (through :func:`call_when_idle` from a task) runs a function once
every pool thread has run out of work: nothing is queued and no task runs, so every event in
flight waits on something outside the pool (a server's answer, a batch being gathered). The
SONIC producers' event batching sends its batch then rather than wait for more events.
"""
from __future__ import annotations

import logging
import queue
import threading
import traceback
from collections import deque

LOG = logging.getLogger("recorun.framework")

_local = threading.local()
#: a task that does nothing: wakes a thread waiting on the queue
_NOTHING = (lambda: None, ())
#: how long the end of a run waits for each pool thread to stop
JOIN_TIMEOUT_S = 10.0


class ThreadPool:
    def __init__(self, threads: int):
        self.threads = threads
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.fatal: BaseException | None = None
        self.fatal_traceback = ""
        self._idle_lock = threading.Lock()
        self._idle = 0                    # threads waiting on the empty queue
        self._when_idle: list = []

    def when_idle(self, fn) -> None:
        """Call ``fn()`` once, on a pool thread, when every pool thread is out of work (see
        the module docstring). ``fn`` must be short and must not block."""
        with self._idle_lock:
            self._when_idle.append(fn)

    def soon(self, fn, *args) -> None:
        """Run ``fn(*args)`` on a pool thread, after the current task."""
        inline = getattr(_local, "inline", None)
        if inline is not None and not inline:
            inline.append((fn, args))
        else:
            self._queue.put((fn, args))

    def share(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the first pool thread free (the shared queue, even when the
        current task has no continuation yet: work that can go on beside the current task)."""
        self._queue.put((fn, args))

    def wake(self) -> None:
        """Wake every thread waiting for work (call it after setting the run's ``finished``,
        so that the run ends now, not when their wait times out)."""
        for _ in range(self.threads):
            self._queue.put(_NOTHING)

    def run(self, start, finished: threading.Event) -> None:
        """Run ``start()`` as the first task, work until ``finished`` is set, then stop (the
        pool can run again)."""
        self._stopping.clear()
        self._threads = []
        with self._idle_lock:
            self._when_idle = []
        for i in range(1, self.threads):
            t = threading.Thread(target=self._work, args=(finished,), name=f"recorun-{i}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        self._queue.put((start, ()))
        try:
            self._work(finished)
        finally:
            self._stopping.set()
            for _ in self._threads:
                self._queue.put(None)
            for t in self._threads:       # a thread stuck in a module call (a run
                t.join(JOIN_TIMEOUT_S)    # abandoned) is a daemon: left behind

    def _work(self, finished: threading.Event) -> None:
        inline: deque = deque()
        _local.inline = inline
        _local.pool = self
        get = self._queue.get
        try:
            while not finished.is_set() and not self._stopping.is_set():
                try:
                    item = get(block=False)
                except queue.Empty:
                    try:
                        item = self._wait_for_work()
                    except queue.Empty:
                        continue
                if item is None:
                    break
                while item is not None:
                    fn, args = item
                    try:
                        fn(*args)
                    except BaseException as exc:   # a framework bug: stop, do not hang
                        if self.fatal is None:
                            self.fatal = exc
                            self.fatal_traceback = traceback.format_exc()
                        finished.set()
                        self.wake()
                        return
                    item = inline.popleft() if inline else None
        finally:
            _local.inline = None
            _local.pool = None

    def _wait_for_work(self):
        """The next task, after a blocking wait on the empty queue (``queue.Empty`` after
        0.2 s); the last thread to run out of work first calls the ``when_idle`` functions."""
        with self._idle_lock:
            self._idle += 1
            due = []
            if self._when_idle and self._idle == self.threads and self._queue.empty():
                due, self._when_idle = self._when_idle, []
        inline, _local.inline = _local.inline, None    # what they schedule goes to the queue
        try:
            for fn in due:
                try:
                    fn()
                except Exception:             # an idle function's bug must not stop the pool
                    LOG.exception("a function run when the pool was idle raised")
            _local.inline = inline
            return self._queue.get(timeout=0.2)
        finally:
            _local.inline = inline
            with self._idle_lock:
                self._idle -= 1


def call_when_idle(fn) -> bool:
    """From a task of a pool: ``fn()`` once every thread of that pool is out of work (see
    :meth:`ThreadPool.when_idle`). False, and nothing done, outside a pool's threads."""
    pool = getattr(_local, "pool", None)
    if pool is None:
        return False
    pool.when_idle(fn)
    return True


class SerialQueue:
    """Runs the tasks pushed to it one at a time, in order, on the pool's threads."""

    def __init__(self, pool: ThreadPool):
        self._pool = pool
        self._lock = threading.Lock()
        self._pending: deque = deque()
        self._busy = False

    def push(self, fn, *args) -> None:
        with self._lock:
            if self._busy:
                self._pending.append((fn, args))
                return
            self._busy = True
        self._pool.soon(self._run, fn, args)

    def run_or_push(self, now, later, *args, pending=None):
        """``now(*args)`` on this thread and its result when the queue is free; otherwise
        ``later(*args)`` is queued and ``pending`` returned."""
        with self._lock:
            if self._busy:
                self._pending.append((later, args))
                return pending
            self._busy = True
        try:
            return now(*args)
        finally:
            self._next_task()

    def _run(self, fn, args) -> None:
        try:
            fn(*args)
        finally:
            self._next_task()

    def _next_task(self) -> None:
        with self._lock:
            if self._pending:
                nxt = self._pending.popleft()
            else:
                self._busy = False
                nxt = None
        if nxt is not None:
            self._pool.soon(self._run, *nxt)


class OrderedQueue:
    """Runs tasks one at a time in the order of an integer key (the event index).

    Every key from 0 up must arrive, either with a task (:meth:`push`) or without one
    (:meth:`release`, idempotent); a task waits until every smaller key has been handled. Used
    for output modules, so that they write events in event order whatever the thread count.
    """

    def __init__(self, pool: ThreadPool):
        self._pool = pool
        self._lock = threading.Lock()
        self._pending: dict[int, tuple | None] = {}
        self._next = 0
        self._busy = False

    def restart(self) -> None:
        """Keys start from 0 again (a new run over another source); nothing may be pending."""
        with self._lock:
            self._pending.clear()
            self._next = 0

    def push(self, key: int, fn, *args) -> None:
        with self._lock:
            self._pending[key] = (fn, args)
            task = self._take()
        if task is not None:
            self._pool.soon(self._run, task)

    def run_or_push(self, key: int, now, later, *args, pending=None):
        """``now(*args)`` on this thread and its result when key ``key`` is the next one and
        the queue is free; otherwise ``later(*args)`` waits for its turn and ``pending`` is
        returned."""
        with self._lock:
            if self._busy or self._next != key:
                self._pending[key] = (later, args)
                task = self._take()
                inline = False
            else:
                self._busy = True
                self._next += 1
                inline = True
        if not inline:
            if task is not None:
                self._pool.soon(self._run, task)
            return pending
        try:
            return now(*args)
        finally:
            self._next_task()

    def release(self, key: int) -> None:
        """Key ``key`` has no task (or already had it): let the keys after it go."""
        with self._lock:
            if key < self._next or key in self._pending:
                return
            self._pending[key] = None
            task = self._take()
        if task is not None:
            self._pool.soon(self._run, task)

    def _take(self):
        """With the lock held: skip released keys, claim the next task if it is ready."""
        if self._busy:
            return None
        while self._next in self._pending:
            task = self._pending.pop(self._next)
            self._next += 1
            if task is not None:
                self._busy = True
                return task
        return None

    def _run(self, task) -> None:
        fn, args = task
        try:
            fn(*args)
        finally:
            self._next_task()

    def _next_task(self) -> None:
        with self._lock:
            self._busy = False
            nxt = self._take()
        if nxt is not None:
            self._pool.soon(self._run, nxt)
