"""Server-side time of a model, from Triton's statistics (``get_inference_statistics``).

A :class:`TritonClient` reads the model's statistics on a server just before its first
request there and again at ``end_job``; the difference is what the server did during the job:

* ``requests``: successful requests (``inference_stats.success.count``);
* ``rows``: inferences, i.e. rows of all batches (``inference_count``);
* ``executions``: model executions (fewer than requests when dynamic batching merged some);
* ``queue_ns``: time requests waited in the server's queue, summed over requests;
* ``compute_ns``: compute time (input + infer + output), summed over *executions*
  (``batch_stats``), so that requests merged into one batch count their batch once.

:func:`server_time` turns those differences into the per-event figures of the job report. A
server shared with other clients counts their requests too: the compute time is then shared
out by rows (this client's rows over the server's) and ``server_shared`` says so.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ModelStatistics:
    """One model's cumulative counters on one server (all versions when none is given)."""

    requests: int = 0
    rows: int = 0
    executions: int = 0
    queue_ns: int = 0
    compute_ns: int = 0

    def __sub__(self, other: ModelStatistics) -> ModelStatistics:
        return ModelStatistics(*(getattr(self, f.name) - getattr(other, f.name)
                                 for f in fields(self)))

    def __add__(self, other: ModelStatistics) -> ModelStatistics:
        return ModelStatistics(*(getattr(self, f.name) + getattr(other, f.name)
                                 for f in fields(self)))


def _count(entry: dict, key: str) -> int:
    return int((entry.get(key) or {}).get("count", 0) or 0)


def _ns(entry: dict, key: str) -> int:
    return int((entry.get(key) or {}).get("ns", 0) or 0)


def parse_statistics(answer: dict) -> ModelStatistics:
    """Sum the ``model_stats`` of a ``get_inference_statistics(..., as_json=True)`` answer
    (Triton's JSON writes 64-bit counters as strings)."""
    total = ModelStatistics()
    for stats in answer.get("model_stats", []):
        inference = stats.get("inference_stats", {}) or {}
        compute = sum(_ns(batch, key) for batch in stats.get("batch_stats", []) or []
                      for key in ("compute_input", "compute_infer", "compute_output"))
        total += ModelStatistics(
            requests=_count(inference, "success"), rows=int(stats.get("inference_count", 0)),
            executions=int(stats.get("execution_count", 0)), queue_ns=_ns(inference, "queue"),
            compute_ns=compute)
    return total


def read_statistics(grpc_client, model: str, version: str, timeout_s: float
                    ) -> ModelStatistics:
    """The model's counters now (raises what tritonclient raises)."""
    return parse_statistics(grpc_client.get_inference_statistics(
        model, version, as_json=True, client_timeout=timeout_s))


def server_time(deltas: Iterable[ModelStatistics], *, calls: int, requests: int,
                rows: int) -> dict:
    """Per-event server figures for the job report from the servers' counter differences and
    this client's ``calls`` (events), answered ``requests`` and ``rows``:
    ``server_requests``, ``server_executions``, ``server_queue_ms_per_call``,
    ``server_compute_ms_per_call`` and ``server_shared``."""
    total = ModelStatistics()
    for delta in deltas:
        total += delta
    shared = total.requests > requests or total.rows > rows
    rows_share = min(1.0, rows / total.rows) if total.rows else 0.0
    queue_per_request = total.queue_ns / total.requests if total.requests else 0.0
    return {
        "server_requests": total.requests,
        "server_executions": total.executions,
        "server_queue_ms_per_call": 1e-6 * queue_per_request * requests / calls if calls
        else 0.0,
        "server_compute_ms_per_call": 1e-6 * total.compute_ns * rows_share / calls if calls
        else 0.0,
        "server_shared": shared,
    }
