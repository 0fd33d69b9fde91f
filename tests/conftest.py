"""Shared helpers for the scheduler and report tests.

``Recorder`` is how test modules report what they did: it is passed to modules as a workflow
parameter, and since ``run_workflow`` deep-copies the workflow, it returns itself from
``__deepcopy__`` so that every copy of a module (one per stream) writes to the test's object.
"""
from __future__ import annotations

import threading
from collections import Counter

import pytest

from framework import run_workflow


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


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def workflow(modules: dict, paths: dict | None = None, endpaths: dict | None = None, *,
             events: int = 20, **process) -> dict:
    """A workflow dict on an EmptySource of ``events`` events numbered 1, 2, ..."""
    process.setdefault("report_every_s", 0)
    return {"process": process,
            "source": {"type": "EmptySource", "count": events, "first_event": 1},
            "modules": modules, "paths": paths or {}, "endpaths": endpaths or {}}


def run_guarded(wf: dict, timeout: float = 60.0, **kwargs):
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
