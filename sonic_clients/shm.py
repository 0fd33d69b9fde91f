"""System shared memory for a Triton client: one pool of regions per client.

When the Triton server runs on the same host, a request's inputs and outputs need not travel in
the gRPC message: the client writes the inputs into a POSIX shared-memory region (a file under
``/dev/shm``) that the server has *registered* (``register_system_shared_memory``), the request
names the region and the offsets, and the server writes the outputs into it too (CMSSW's
SonicTriton does the same). :class:`ShmPool` holds one client's regions:

* **a pool.** A request takes a free region big enough for its inputs and outputs
  (:meth:`ShmPool.take`; the smallest that fits), else a new one is made: its size is a power
  of two of at least :data:`MIN_REGION_BYTES`, so that requests of varying sizes reuse it. A
  free region too small for today's requests is destroyed when a bigger one is made, so the
  pool holds about as many regions as the client has requests in flight at its busiest.
  Concurrent requests never share a region: a region is the request's from ``take`` until it
  is answered or failed (:meth:`ShmPool.give`), and one whose request failed after it was
  sent is never reused (:meth:`ShmPool.discard`: the server may still write into it, e.g.
  after a client-side timeout).
* **registered lazily, per server.** A region is registered on a server the first time a
  request that holds it goes there (:meth:`ShmPool.register`), then reused without another
  call. A server that refuses (an endpoint behind an access token, a server on another host
  that cannot open the region, a server without shared-memory support) raises
  :class:`ShmRefused`; a server that cannot be reached raises its gRPC error (the request's
  attempt failed, as any other). :meth:`ShmPool.forget` drops what a restarted server lost.
* **released on every exit path.** :meth:`ShmPool.close` (the client's ``end_job``, which the
  framework also calls after Ctrl-C or SIGTERM) unregisters every region from every server it
  was registered on (by name: never another client's) and destroys it locally, also when a
  server is dead (the unregister fails; after the first failure the server's other regions
  are not tried). An ``atexit`` hook closes the pools still open. Should the process die
  without either (SIGKILL, a second Ctrl-C), Python's ``multiprocessing`` resource tracker,
  which ``tritonclient.utils.shared_memory`` creates every region with, unlinks the files
  under ``/dev/shm``; the server keeps its mapping of them until it is told to unregister or
  stops.

Names are ``recorun_<pid>_<token>_<model>_<n>`` (``<token>``: random per process): unique per
process and client, so two jobs on one node never clash, and a job's regions are found by its
PID. Regions are made with ``tritonclient.utils.shared_memory``; the gRPC calls go through the
endpoint's shared ``InferenceServerClient`` (``endpoint.grpc()``).

Reading and writing a region happen under its lock, as does destroying it: a request answered
after :meth:`ShmPool.close` (a job interrupted with requests in flight) finds its region
closed and fails (:class:`ShmClosed`), never reads freed memory.
"""
from __future__ import annotations

import atexit
import itertools
import os
import re
import secrets
import threading
import weakref
from collections.abc import Sequence

import numpy as np

from .base import LOG, SonicError

#: the smallest region made (bytes); sizes are powers of two from here
MIN_REGION_BYTES = 1 << 16
#: offsets of the tensors in a region are multiples of this
ALIGN = 64
#: gRPC statuses of a registration that say the server could not be reached (the request's
#: attempt failed), not that it refuses shared memory
_UNREACHABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")

_TOKEN = secrets.token_hex(3)
_POOLS = itertools.count()
_OPEN: weakref.WeakSet = weakref.WeakSet()
_OPEN_LOCK = threading.Lock()


class ShmRefused(SonicError):
    """A server cannot use this client's shared memory, or no region can be made here (the
    message says why): the request goes over gRPC."""


class ShmClosed(SonicError):
    """The pool was closed (the client ended) while a request used it."""


def aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGN) * ALIGN


def region_size(nbytes: int) -> int:
    """The size a new region for ``nbytes`` gets: the next power of two, at least
    :data:`MIN_REGION_BYTES`."""
    return max(MIN_REGION_BYTES, 1 << max(int(nbytes) - 1, 0).bit_length())


def _status(error: BaseException) -> tuple[str, str]:
    from .triton import status_of

    return status_of(error)


class Region:
    """One shared-memory region: ``name`` (Triton's and the file's under ``/dev/shm``),
    ``key`` (``/name``), ``size``; the servers it is registered on."""

    def __init__(self, name: str, size: int):
        from tritonclient.utils import shared_memory

        self.name = name
        self.key = "/" + name
        self.size = size
        self.lock = threading.Lock()
        self.registered: set = set()          # endpoints
        self._handle = shared_memory.create_shared_memory_region(name, self.key, size,
                                                                 create_only=True)

    def __repr__(self) -> str:
        return f"Region({self.name!r}, {self.size})"

    @property
    def closed(self) -> bool:
        return self._handle is None

    def write(self, arrays: Sequence[np.ndarray], offsets: Sequence[int]) -> None:
        """Copy ``arrays`` into the region at ``offsets``."""
        from tritonclient.utils import shared_memory

        with self.lock:
            if self._handle is None:
                raise ShmClosed(f"shared-memory region '{self.name}' was released")
            for array, offset in zip(arrays, offsets):
                shared_memory.set_shared_memory_region(self._handle, [array], offset=offset)

    def read(self, dtype, shape: Sequence[int], offset: int) -> np.ndarray:
        """A copy of the ``shape``/``dtype`` array at ``offset`` (the region is reused)."""
        from tritonclient.utils import shared_memory

        with self.lock:
            if self._handle is None:
                raise ShmClosed(f"shared-memory region '{self.name}' was released while its "
                                "request was out (the client ended)")
            view = shared_memory.get_contents_as_numpy(self._handle, np.dtype(dtype),
                                                       list(shape), offset=offset)
            copy = np.array(view)
            del view                              # no export of the buffer outlives the lock
            return copy

    def destroy(self) -> None:
        """Unmap and unlink it here (idempotent)."""
        from tritonclient.utils import shared_memory

        with self.lock:
            handle, self._handle = self._handle, None
            if handle is not None:
                shared_memory.destroy_shared_memory_region(handle)


class ShmPool:
    """The shared-memory regions of one client (see the module docstring). ``owner`` names
    the client in names and messages (its model); ``timeout_s`` bounds each registration and
    unregistration call."""

    def __init__(self, owner: str, timeout_s: float = 5.0):
        self.owner = owner
        self.timeout_s = float(timeout_s)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", owner)[:40]
        self.pid = os.getpid()
        self.prefix = f"recorun_{self.pid}_{_TOKEN}_{safe}_{next(_POOLS)}"
        self._lock = threading.Lock()
        self._count = itertools.count()
        self._free: list[Region] = []
        self._all: set[Region] = set()
        #: endpoint -> names registered there and not unregistered yet (discarded regions too)
        self._names: dict = {}
        self._closed = False
        self.made = 0
        with _OPEN_LOCK:
            _OPEN.add(self)

    def __repr__(self) -> str:
        return f"ShmPool({self.prefix!r}, {len(self._all)} regions)"

    # regions -------------------------------------------------------------------------------
    def take(self, nbytes: int) -> Region:
        """A free region of at least ``nbytes``, now the caller's until :meth:`give` or
        :meth:`discard`. Raises :class:`ShmRefused` when none can be made here (``/dev/shm``
        lacks the room)."""
        retired = None
        with self._lock:
            if self._closed:
                raise ShmClosed(f"model '{self.owner}': the client's shared memory was released")
            fits = [r for r in self._free if r.size >= nbytes]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free.remove(region)
                return region
            if self._free:                        # too small for today's requests
                retired = max(self._free, key=lambda r: r.size)
                self._free.remove(retired)
                self._all.discard(retired)
            size = region_size(nbytes)
            name = f"{self.prefix}_{next(self._count)}"
        if retired is not None:
            retired.destroy()
        room = _room()
        if room is not None and room < size:
            raise ShmRefused(f"/dev/shm has {room} bytes free, a region of {size} bytes is "
                             "needed")
        try:
            region = Region(name, size)
        except Exception as exc:
            raise ShmRefused(f"cannot make a shared-memory region of {size} bytes: "
                             f"{exc.__cause__ or exc}") from exc
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._all.add(region)
                self.made += 1
        if closed:
            region.destroy()
            raise ShmClosed(f"model '{self.owner}': the client's shared memory was released")
        return region

    def give(self, region: Region) -> None:
        """The request that held ``region`` is over: another may take it."""
        with self._lock:
            if not self._closed and region in self._all and not region.closed:
                self._free.append(region)
                return
        region.destroy()

    def discard(self, region: Region) -> None:
        """The request that held ``region`` failed after it was sent: the server may still
        use the region, so it is destroyed here and never reused (its registrations are
        undone at :meth:`close`)."""
        with self._lock:
            self._all.discard(region)
        region.destroy()

    # servers -------------------------------------------------------------------------------
    def register(self, region: Region, endpoint) -> None:
        """Register ``region`` on ``endpoint`` unless it is already. Raises
        :class:`ShmRefused` when the server refuses it, the gRPC error when the server cannot
        be reached."""
        if endpoint in region.registered:
            return
        try:
            endpoint.grpc().register_system_shared_memory(
                region.name, region.key, region.size, client_timeout=self.timeout_s)
        except Exception as exc:
            status, message = _status(exc)
            if status in _UNREACHABLE and "restricted" not in message:
                raise
            if status != "StatusCode.ALREADY_EXISTS":   # the name is this pool's: it is ours
                raise ShmRefused(f"{status}: {message}") from None
        with self._lock:
            closed = self._closed
            if not closed:
                self._names.setdefault(endpoint, set()).add(region.name)
                region.registered.add(endpoint)
        if closed:                                     # close() ran meanwhile: undo it here
            self._unregister(endpoint, [region.name])
            raise ShmClosed(f"model '{self.owner}': the client's shared memory was released")

    def forget(self, endpoint) -> None:
        """``endpoint`` lost its registrations (the server restarted): register again there
        before the next use."""
        with self._lock:
            self._names.pop(endpoint, None)
            for region in self._all:
                region.registered.discard(endpoint)

    def registered_on(self, endpoint) -> list[str]:
        with self._lock:
            return sorted(self._names.get(endpoint, ()))

    # the end -------------------------------------------------------------------------------
    def close(self) -> None:
        """Unregister every region from the servers it is registered on, destroy every
        region here (idempotent; a dead server does not stop it)."""
        with self._lock:
            self._closed = True
            regions, self._all, self._free = list(self._all), set(), []
            names, self._names = self._names, {}
        with _OPEN_LOCK:
            _OPEN.discard(self)
        for endpoint, registered in names.items():
            self._unregister(endpoint, sorted(registered))
        for region in regions:
            try:
                region.destroy()
            except Exception as exc:               # pragma: no cover
                LOG.warning("model '%s': shared-memory region '%s' not destroyed: %s",
                            self.owner, region.name, exc)


    def _unregister(self, endpoint, names: list[str]) -> None:
        """Unregister ``names`` from ``endpoint``; after a first failure (a dead server, one
        that refuses) not the others."""
        for name in names:
            try:
                endpoint.grpc().unregister_system_shared_memory(name,
                                                                client_timeout=self.timeout_s)
            except Exception as exc:
                status, message = _status(exc)
                LOG.info("model '%s': %s: shared-memory regions not unregistered (%s: %s)",
                         self.owner, endpoint.label(), status, message)
                return


def _room() -> int | None:
    """Bytes free under /dev/shm (None where it cannot be said): a region is a tmpfs file, and
    writing into one the filesystem has no room for kills the process (SIGBUS)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


@atexit.register
def _close_all_at_exit() -> None:
    """Release the pools still open when the interpreter exits (this process's: a forked
    child's copies of its parent's pools are the parent's to release)."""
    with _OPEN_LOCK:
        pools = [pool for pool in _OPEN if pool.pid == os.getpid()]
    for pool in pools:
        try:
            pool.close()
        except Exception:                          # pragma: no cover
            pass
