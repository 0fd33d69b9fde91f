"""The threads of numerical libraries (OpenBLAS, MKL, OpenMP) that modules call into.

recorun's own parallelism is its threads, streams and processes. A library that starts a pool
of its own for every call (numpy's OpenBLAS does, for a matrix product of a few thousand rows)
competes with them: on a 2-core machine one recorun thread then kept both cores busy, ran
slower than with one library thread, and left nothing for a second process. So a job limits
the libraries to ``process.native_threads`` threads per call (default 1; 0 leaves them at
their own default), with threadpoolctl, and gives worker processes the same limit through the
usual environment variables before they import anything.
"""
from __future__ import annotations

import contextlib

ENVIRONMENT = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limited(threads: int):
    """A context in which the numerical libraries loaded so far use at most ``threads``
    threads (0: unchanged)."""
    if threads <= 0:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


def environment(threads: int) -> dict[str, str]:
    """The environment that limits a new process's libraries to ``threads`` (0: none)."""
    return {name: str(threads) for name in ENVIRONMENT} if threads > 0 else {}
