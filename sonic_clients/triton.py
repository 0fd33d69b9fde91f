"""The Triton gRPC client (CMSSW's ``TritonClient``): the paper's SONIC client.

:class:`Endpoint` is one Triton server (name, ``host:port``, TLS options) with one shared
``tritonclient.grpc.InferenceServerClient`` (its methods are thread-safe); the
:class:`~recorun.sonic_clients.registry.ServerRegistry` owns the endpoints and gives each client the
list of those that serve its model, the preferred one first.

:class:`TritonClient` sends each chunk of an ``infer`` call (at most ``max_batch_size`` rows)
as one request:

* ``async``: ``async_infer(..., callback=..., client_timeout=timeout_s)``; the callback (on a
  gRPC thread) retries, fails over, or completes the call;
* ``sync``: blocking ``infer(..., client_timeout=timeout_s)`` in the caller's thread;
* ``pseudo-async``: the same blocking ``infer`` on the client's own thread
  (a one-thread ``concurrent.futures`` pool, as CMSSW's pseudo-async client has one thread).

Retries and failover: a request that fails (any gRPC status but ``INVALID_ARGUMENT``, which
would fail anywhere) or times out (``DEADLINE_EXCEEDED``) is sent again to the same server up
to ``tries`` times in all, then to the next server that has the model (``tries`` again), then
the call fails with :class:`~recorun.sonic_clients.base.InferenceError`. What happens to a server that
exhausted its tries depends on the balancing policy (below): later requests start with one that
works.

Balancing (``ClientConfig.balance``, else the registry's ``balance``): which of the servers that
serve the model a new request goes to first; the others follow in the request's order for
failover. Every policy retries and fails over the same way.

* ``first`` (the default): the preferred server (``ClientConfig.server``) first, the others
  only on failover. A server that exhausted its tries moves to the back of the order.
* ``round_robin``: each request starts at the next server in turn.
* ``least_outstanding``: each request starts at the server with the fewest requests in flight
  from this process (every client of every model counts: :meth:`Endpoint.in_flight`); ties
  are taken in turn, so requests sent one at a time alternate too.

With ``round_robin`` and ``least_outstanding`` a server that exhausted its tries is *down* for
:data:`DOWN_S` seconds: requests start on the other servers meanwhile and reach it only last,
on failover. Then it takes its turn again (a request finds out whether it is back); an answer
from it clears it at once. The counters per server (requests sent, answers, failed attempts)
are in ``timing()["per_server"]``; :meth:`TritonClient.answered_by` gives the servers that
answered with their addresses, answers and model version (the job's provenance).

Pauses, health and outages. A request sent again to the same server waits first
(``backoff_s``, doubling with each try up to :data:`MAX_BACKOFF_S`, with jitter). A server that
a request finds unreachable (:data:`UNREACHABLE`) is probed (:class:`Health`, shared by every
client of the server): it is *down* when its probes fail too, and probed until it answers; new
requests try healthy servers first. When a request has spent its tries on every server and
some of them are down, it does not fail: it waits (no thread held in ``async`` mode) for one
to come back, up to the client's outage budget (``outage_s``, 30 s by default), and is then
sent there afresh. Past the budget its call fails with the reason, or, when the registry
allows it (``fallback: true`` with servers configured), the local fallback server joins the
client's servers and takes over. A server that answers its probes was not down (slow, or
refusing that request): the call fails as before. ``timing()`` counts ``outage_waits``,
``outage_wait_s`` and ``fallback_takeovers``.

Transport (``ClientConfig.transport``): ``grpc`` puts the tensors in the gRPC messages;
``shm`` passes them through Triton's system shared memory (:mod:`recorun.sonic_clients.shm`:
one pool of regions per client, registered on each server at its first use there): a request
writes its inputs into a region and the server writes the outputs into the same region, the
gRPC message carries only the names and offsets; the outputs are copied out before the region
goes back to the pool. ``auto`` is ``shm`` when every server of the model is on this host
(:meth:`Endpoint.is_local`), else ``grpc``; it is decided at begin_job. Retries and failover
work as above: a region is registered on a server when a request first goes there. A server
that refuses shared memory (an endpoint behind an access token, a server on another host, no
shared-memory support) gets its requests over gRPC, with one warning naming it and the reason
(:meth:`Endpoint.refuse_shm`); a request that finds its region unknown to the server (a
restarted server lost its registrations) registers again and is sent again at once, not
counted as a try; should that happen twice to one request, the server gets gRPC too. The
regions are unregistered and destroyed at end_job (also after Ctrl-C or SIGTERM, which end the
job), with an ``atexit`` hook as a safety net. ``timing()`` says ``transport`` and counts
``shm_requests``, ``shm_bytes`` (input bytes through shared memory), ``grpc_bytes`` (input
bytes in gRPC messages), ``shm_regions`` (regions made) and ``shm_refused`` (server: reason).

``InferInput`` objects of gRPC requests are reused: one per input name and thread (the request
is serialized inside ``infer``/``async_infer``, so the object is free again when that call
returns); ``InferRequestedOutput`` objects are made once per client. Requests through shared
memory reuse theirs per thread too, naming the request's region each time.
"""
from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .base import (
    BALANCES,
    LOG,
    Attempt,
    Call,
    Chunk,
    ClientConfig,
    ClientConfigError,
    InferenceError,
    ModelDescription,
    SonicClient,
    SonicError,
    TensorInfo,
    merge_descriptions,
    now,
    shutdown_pool,
)
from .server_stats import ModelStatistics, read_statistics, server_time
from .shm import ShmPool, ShmRefused, aligned

#: times the statistics are read at end_job until they count every answered request
STATISTICS_READS = 6

#: gRPC statuses that another try cannot cure: the call fails at once.
NOT_RETRYABLE = ("StatusCode.INVALID_ARGUMENT",)

#: seconds a server that exhausted its tries is skipped by round_robin and least_outstanding
DOWN_S = 5.0
#: the longest pause between two tries of a request on one server
MAX_BACKOFF_S = 2.0


class _InFlight:
    """Requests in flight from this process, per server address (all clients count)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, address: str, amount: int) -> None:
        with self._lock:
            left = self._counts.get(address, 0) + amount
            if left:
                self._counts[address] = left
            else:
                self._counts.pop(address, None)

    def get(self, address: str) -> int:
        with self._lock:
            return self._counts.get(address, 0)


_IN_FLIGHT = _InFlight()


class _Flight:
    """One request in flight to one server; ``end()`` (idempotent) when it is answered or
    failed."""

    __slots__ = ("address", "open")

    def __init__(self, address: str):
        self.address = address
        self.open = True
        _IN_FLIGHT.add(address, 1)

    def end(self) -> None:
        if self.open:
            self.open = False
            _IN_FLIGHT.add(self.address, -1)


def _grpc():
    import tritonclient.grpc as grpcclient

    return grpcclient


def status_of(error: BaseException) -> tuple[str, str]:
    """(status, message) of a tritonclient error (or any exception)."""
    status = getattr(error, "status", None)
    message = getattr(error, "message", None)
    try:
        status = status() if callable(status) else status
        message = message() if callable(message) else message
    except Exception:
        status = message = None
    return (str(status) if status else type(error).__name__,
            str(message) if message is not None else str(error))


#: gRPC statuses that say a server cannot be reached (or does not answer in time): an outage
#: when the server's health probes fail too. NOT_FOUND counts: the model was there when the
#: job began, so a server that no longer knows it is going down or restarting (a Triton
#: whose parent was killed unloads its models for seconds while it still listens)
UNREACHABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.NOT_FOUND")
#: host names of this host, for ``transport: auto`` (:meth:`Endpoint.is_local`)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
#: how often a server marked down is probed: the first pause, then doubling up to the last
PROBE_S = (0.1, 2.0)


class Later:
    """Calls ``fn()`` after ``delay`` seconds on one shared timer thread (retries' pauses and
    outage deadlines of async requests: no thread is held while they wait)."""

    def __init__(self):
        self._heap: list = []
        self._count = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def __call__(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + max(delay, 0.0), next(self._count), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="sonic-timers")
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else
                                    self._heap[0][0] - time.monotonic())
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:                          # pragma: no cover
                LOG.exception("a SONIC timer callback failed")


LATER = Later()


class Health:
    """Whether a server answers: a circuit breaker shared by every client of the server.

    ``up`` until a request finds it unreachable (:data:`UNREACHABLE`); then ``suspect`` while a
    first health probe (``is_server_ready``) runs, and ``down`` once a probe failed: it is then
    probed again and again (:data:`PROBE_S`, doubling) until one succeeds or an answer comes,
    and it is ``up`` again. A server whose probe succeeds was only slow or refused one request:
    it stays up. ``watch(fn)`` calls ``fn()`` at the next change."""

    def __init__(self, endpoint: Endpoint):
        self._endpoint = endpoint
        self._cond = threading.Condition()
        self.state = "up"
        self.down_since = 0.0
        self.outages = 0
        self._watchers: list = []
        self._closed = False

    def failed(self, timeout_s: float) -> None:
        """A request found the server unreachable: probe it (unless already being probed)."""
        with self._cond:
            if self.state != "up" or self._closed:
                return
            self._set("suspect")
            self.down_since = time.monotonic()
        threading.Thread(target=self._probe, args=(timeout_s,), daemon=True,
                         name=f"probe-{self._endpoint.name}").start()

    def answered(self) -> None:
        with self._cond:
            if self.state != "up":
                self._set("up")

    def _set(self, state: str) -> None:
        """With the condition held."""
        self.state = state
        watchers, self._watchers = self._watchers, []
        self._cond.notify_all()
        for fn in watchers:
            LATER(0.0, fn)

    def watch(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` (on the timer thread) at the next change of state."""
        with self._cond:
            self._watchers.append(fn)

    def wait_change(self, state: str, timeout_s: float) -> None:
        """Block while the state is ``state``, at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.state == state and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _probe(self, timeout_s: float) -> None:
        pause = PROBE_S[0]
        while True:
            with self._cond:
                if self.state == "up" or self._closed:
                    return
            try:
                ready = bool(self._endpoint.grpc().is_server_ready(
                    client_timeout=min(timeout_s, 2.0)))
            except Exception:
                ready = False
            with self._cond:
                if ready:
                    if self.state != "up":
                        self._set("up")
                    return
                if self.state == "suspect":
                    self.outages += 1
                    LOG.warning("%s is down (no answer to health probes); requests wait for "
                                "it within their outage budget", self._endpoint.label())
                    self._set("down")
                self._cond.wait(pause)
            pause = min(pause * 2, PROBE_S[1])

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Endpoint:
    """One Triton server: a name, ``host:port``, TLS options, one shared gRPC client.

    ``when_ready(fn)`` calls ``fn(None)`` once the server can take requests (at once here; the
    fallback server's endpoint waits for it to start) or ``fn(error)``; ``wait_ready()`` blocks.
    """

    def __init__(self, name: str, address: str, *, ssl: bool = False,
                 root_certificates: str | None = None, private_key: str | None = None,
                 certificate_chain: str | None = None, verbose: bool = False):
        self.name = name
        self._address = address
        self.ssl = ssl
        self.tls = {"root_certificates": root_certificates, "private_key": private_key,
                    "certificate_chain": certificate_chain}
        self.verbose = verbose
        self._client = None
        self._lock = threading.Lock()
        self._descriptions: dict[tuple[str, str], ModelDescription | BaseException] = {}
        self.live: bool | None = None
        self.problem = ""
        self.health = Health(self)
        self.shm_refused: str | None = None     # why it cannot use shared memory

    @property
    def address(self) -> str:
        return self._address

    def __repr__(self) -> str:
        return f"Endpoint({self.name!r}, {self.address!r})"

    def label(self) -> str:
        return f"server '{self.name}' ({self.address})"

    def is_local(self) -> bool:
        """On this host: an address on 127.0.0.1, localhost or ::1, or the local fallback
        server (the registry reserves the name ``fallback`` for it)."""
        if self.name == "fallback":
            return True
        host = self.address.rpartition(":")[0].strip("[]").lower()
        return host in LOCAL_HOSTS

    def refuse_shm(self, reason: str) -> bool:
        """The server cannot use shared memory (every client of it sends over gRPC from now
        on); True the first time (the caller warns)."""
        with self._lock:
            first = self.shm_refused is None
            if first:
                self.shm_refused = reason
        return first

    def grpc(self):
        """The shared ``InferenceServerClient`` (made on first use)."""
        with self._lock:
            if self._client is None:
                self._client = _grpc().InferenceServerClient(
                    self.address, verbose=self.verbose, ssl=self.ssl,
                    **{k: v for k, v in self.tls.items() if v})
            return self._client

    def in_flight(self) -> int:
        """Requests in flight from this process to this server, all clients together."""
        return _IN_FLIGHT.get(self.address)

    def flight(self) -> _Flight:
        """Count one request in flight to this server until the token's ``end()``."""
        return _Flight(self.address)

    def when_ready(self, fn: Callable[[BaseException | None], None]) -> None:
        fn(None)

    def wait_ready(self) -> None:
        return None

    def probe(self, timeout_s: float) -> bool:
        """Is the server live? Records ``live`` and, if not, ``problem``."""
        try:
            live = bool(self.grpc().is_server_live(client_timeout=timeout_s))
            self.problem = "" if live else "the server says it is not live"
        except Exception as exc:                     # unreachable, TLS mismatch...
            status, message = status_of(exc)
            live, self.problem = False, f"{status}: {message}"
        self.live = live
        return live

    def model_description(self, model: str, version: str, timeout_s: float
                          ) -> ModelDescription:
        """The model as this server serves it (``is_model_ready``, ``get_model_metadata``,
        ``get_model_config``), cached; raises :class:`ClientConfigError` when it does not
        serve it."""
        key = (model, version)
        with self._lock:
            cached = self._descriptions.get(key)
        if cached is None:
            try:
                cached = self._fetch(model, version, timeout_s)
            except ClientConfigError as exc:
                cached = exc
            with self._lock:
                self._descriptions[key] = cached
        if isinstance(cached, BaseException):
            raise cached
        return cached

    def _fetch(self, model: str, version: str, timeout_s: float) -> ModelDescription:
        from tritonclient.utils import triton_to_np_dtype

        client = self.grpc()
        what = f"model '{model}'{f' version {version}' if version else ''}"
        try:
            ready = client.is_model_ready(model, version, client_timeout=timeout_s)
        except Exception as exc:
            status, message = status_of(exc)
            raise ClientConfigError(f"{self.label()} cannot say whether it serves {what}: "
                                    f"{status}: {message}") from None
        if not ready:
            raise ClientConfigError(f"{self.label()} does not serve {what} (not ready)")
        try:
            meta = client.get_model_metadata(model, version, as_json=True,
                                             client_timeout=timeout_s)
            config = client.get_model_config(model, version, as_json=True,
                                             client_timeout=timeout_s).get("config", {})
        except Exception as exc:
            status, message = status_of(exc)
            raise ClientConfigError(f"{self.label()}: {what} is ready but its metadata cannot "
                                    f"be read: {status}: {message}") from None
        max_batch = int(config.get("max_batch_size", 0) or 0)

        def tensors(items):
            out = {}
            for item in items:
                shape = tuple(int(d) for d in item.get("shape", []))
                if max_batch > 0:
                    shape = shape[1:]
                dtype = triton_to_np_dtype(item["datatype"])
                if dtype is None or dtype is np.object_:
                    raise ClientConfigError(f"{self.label()}: {what} tensor '{item['name']}' "
                                            f"has datatype {item['datatype']}, which SONIC "
                                            "clients do not send")
                out[item["name"]] = TensorInfo(item["name"], shape, np.dtype(dtype),
                                               item["datatype"])
            return out

        return ModelDescription(model, version, tensors(meta.get("inputs", [])),
                                tensors(meta.get("outputs", [])), max_batch, self.label(),
                                {"versions": list(meta.get("versions", [])),
                                 "platform": meta.get("platform", "")})

    def close(self) -> None:
        self.health.close()
        with self._lock:
            client, self._client = self._client, None
            self._descriptions.clear()
        if client is not None:
            try:
                client.close()
            except Exception:
                pass


class _Route:
    """Where one request goes next: the servers in this client's order, tries per server, and
    the outage it may be waiting out (``deadline``, the servers it saw down)."""

    __slots__ = ("attempts", "endpoints", "index", "tries_here", "deadline", "seen_down",
                 "waited_s", "waiting", "registered_again")

    def __init__(self, endpoints: Sequence[Endpoint], attempts: list | None = None):
        self.endpoints = list(endpoints)
        self.index = 0
        self.tries_here = 0
        self.attempts: list[Attempt] = attempts if attempts is not None else []
        self.deadline: float | None = None
        self.seen_down: set = set()
        self.waited_s = 0.0
        self.waiting = 0                      # the current wait's token (async)
        self.registered_again = False         # its region was registered again once

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self.index]


class _Request:
    """One attempt's tensors: the ``InferInput`` and ``InferRequestedOutput`` objects, the input
    bytes and, through shared memory, the region (None: over gRPC) and where each output goes
    in it (``{name: (offset, bytes)}``; empty: the outputs come in the gRPC answer)."""

    __slots__ = ("inputs", "outputs", "nbytes", "pool", "region", "name", "layout")

    def __init__(self, inputs, outputs, nbytes: int, pool: ShmPool | None = None,
                 region=None, layout: dict | None = None):
        self.inputs, self.outputs, self.nbytes = inputs, outputs, nbytes
        self.pool, self.region, self.layout = pool, region, layout or {}
        self.name = region.name if region is not None else ""

    def release(self, reuse: bool) -> None:
        """Give the region back (``reuse``: the server is done with it) or destroy it (the
        request failed after it was sent: the server may still write into it). Once."""
        region, self.region = self.region, None
        if region is not None:
            (self.pool.give if reuse else self.pool.discard)(region)


class TritonClient(SonicClient):
    """A client of one model on one or more Triton servers (see the module docstring).

    ``endpoints``: :class:`Endpoint` objects (shared, owned by the registry) or ``host:port``
    strings (owned by this client, closed at end_job). ``description``: the model as the
    registry found it (else fetched from the first endpoint that serves it)."""

    kind = "triton"

    def __init__(self, config: ClientConfig, endpoints: Sequence[Endpoint | str], *,
                 description: ModelDescription | None = None, probe_timeout_s: float = 5.0,
                 balance: str = "first", replacement: Callable[[], Endpoint] | None = None):
        super().__init__(config)
        self._replacement = replacement          # the fallback server, past the budget
        self._fallback: Endpoint | None = None
        self.balance = self.config.balance or balance or "first"
        if self.balance not in BALANCES:
            raise ClientConfigError(f"model '{self.config.model}': balance {self.balance!r} is "
                                    f"not one of {list(BALANCES)}")
        if not endpoints:
            raise ClientConfigError(f"model '{self.config.model}': a TritonClient needs at "
                                    "least one server")
        self._owned = []
        resolved = []
        for i, ep in enumerate(endpoints):
            if isinstance(ep, str):
                ep = Endpoint(f"server{i}" if len(endpoints) > 1 else "server", ep)
                self._owned.append(ep)
            resolved.append(ep)
        self.endpoints: list[Endpoint] = resolved
        self._order_lock = threading.Lock()
        self._turn = 0                                   # round_robin / ties: next start
        self._down_until: dict[Endpoint, float] = {}     # monotonic time a server is back
        self._per_server: dict[str, dict[str, int]] = {}
        self._per_server_lock = threading.Lock()
        self._answered_by: dict[str, tuple[str, str]] = {}   # name -> (address, version)
        self._given_description = description
        self.probe_timeout_s = probe_timeout_s
        self._local = threading.local()
        self._outputs = None
        self._pool: ThreadPoolExecutor | None = None
        self._compression = None if self.config.compression == "none" else self.config.compression
        self._baselines: dict[Endpoint, ModelStatistics | None] = {}
        self._baseline_lock = threading.Lock()
        self._server_time: dict = {}
        self.transport = self.config.transport       # auto: decided at begin_job
        self._shm: ShmPool | None = None
        self._shm_outputs: dict[str, int] = {}       # output -> bytes per row (fixed shapes)
        self._shm_counts = {"shm_requests": 0, "shm_bytes": 0, "grpc_bytes": 0}
        self._shm_refused: dict[str, str] = {}       # server -> reason
        self._shm_lock = threading.Lock()
        self._no_room_said = False
        self._shm_made = 0                           # regions of pools already closed

    # description ---------------------------------------------------------------------------
    def _fetch_description(self) -> ModelDescription:
        if self._given_description is not None:
            desc = self._given_description
        else:
            problems, found, serving = [], [], []
            for ep in self.endpoints:
                try:
                    found.append(ep.model_description(self.config.model, self.config.version,
                                                      self.probe_timeout_s))
                except ClientConfigError as exc:
                    problems.append(str(exc))
                    continue
                serving.append(ep)
            if not found:
                raise ClientConfigError(f"model '{self.config.model}': no server serves it: "
                                        + "; ".join(problems))
            desc = merge_descriptions(self.config.model, found)
            for problem in problems:
                LOG.warning("model '%s': %s; not used", self.config.model, problem)
            with self._order_lock:
                self.endpoints = serving
        grpcclient = _grpc()
        self._outputs = [grpcclient.InferRequestedOutput(name) for name in desc.outputs]
        return desc

    def servers(self) -> list[str]:
        """The servers this client may use, in its current order of preference."""
        with self._order_lock:
            return [ep.label() for ep in self.endpoints]

    def describe(self) -> dict:
        out = super().describe()
        out["servers"] = self.servers()
        out["balance"] = self.balance
        return out

    def _count(self, endpoint: Endpoint, key: str) -> None:
        """One more ``key`` (requests, answers, failed) for ``endpoint``."""
        with self._per_server_lock:
            counts = self._per_server.setdefault(
                endpoint.name, {"requests": 0, "answers": 0, "failed": 0})
            counts[key] += 1

    def _note_server(self, endpoint: Endpoint, result) -> None:
        """Remember the address of a server that answered, and the model version its first
        answer names (Triton's ``model_version``; empty when it names none)."""
        try:
            version = str(result.get_response().model_version) if result is not None else ""
        except Exception:
            version = ""
        with self._per_server_lock:
            self._answered_by.setdefault(endpoint.name, (endpoint.address, version))

    def answered_by(self) -> list[dict]:
        """The servers that answered this client (the job's provenance): ``[{"name",
        "address", "requests": answered requests, "version": the model version it answered
        with}]``, in the order they first answered."""
        with self._per_server_lock:
            return [{"name": name, "address": address,
                     "requests": self._per_server.get(name, {}).get("answers", 0),
                     "version": version}
                    for name, (address, version) in self._answered_by.items()]

    # requests ------------------------------------------------------------------------------
    def _inputs_for(self, arrays: dict[str, np.ndarray]):
        """InferInput objects for ``arrays``, reused per thread; returns (inputs, bytes)."""
        cache = self._local.__dict__.setdefault("inputs", {})
        desc = self.description
        inputs, nbytes = [], 0
        for name, array in arrays.items():
            item = cache.get(name)
            shape = list(array.shape)
            if item is None:
                item = _grpc().InferInput(name, shape, desc.inputs[name].datatype)
                cache[name] = item
            elif item.shape() != shape:
                item.set_shape(shape)
            item.set_data_from_numpy(array)
            inputs.append(item)
            nbytes += array.nbytes
        return inputs, nbytes

    def _prepare(self, endpoint: Endpoint, arrays: dict[str, np.ndarray]) -> _Request:
        """The tensors of one attempt on ``endpoint``: through shared memory when the client
        uses it and the server can, else in the gRPC message."""
        pool = self._shm
        if pool is not None:
            if endpoint.shm_refused is None:
                try:
                    request = self._prepare_shm(pool, endpoint, arrays)
                except ShmRefused as exc:
                    self._refuse(endpoint, str(exc))
                else:
                    if request is not None:
                        return request
            elif endpoint.name not in self._shm_refused:
                self._refuse(endpoint, endpoint.shm_refused)
        inputs, nbytes = self._inputs_for(arrays)
        with self._shm_lock:
            self._shm_counts["grpc_bytes"] += nbytes
        return _Request(inputs, self._outputs, nbytes)

    def _prepare_shm(self, pool: ShmPool, endpoint: Endpoint,
                     arrays: dict[str, np.ndarray]) -> _Request | None:
        """The inputs written into a region of the pool registered on ``endpoint``, the
        outputs (when their shapes are fixed) asked into the same region; None when this
        request must go over gRPC (an empty tensor, or no room for a region here). Raises
        :class:`ShmRefused` when the server refuses shared memory, the gRPC error when it
        cannot be reached."""
        if any(a.nbytes == 0 for a in arrays.values()):
            return None
        offsets, size = [], 0
        for array in arrays.values():
            offsets.append(size)
            size += aligned(array.nbytes)
        rows = next(iter(arrays.values())).shape[0]
        layout = {}
        for name, row_bytes in self._shm_outputs.items():
            layout[name] = (size, rows * row_bytes)
            size += aligned(rows * row_bytes)
        try:
            region = pool.take(size)
        except ShmRefused as exc:                      # no room here: this request over gRPC
            if not self._no_room_said:
                self._no_room_said = True
                LOG.warning("model '%s': no shared-memory region (%s); requests that find none "
                            "go over gRPC", self.config.model, exc)
            return None
        try:
            pool.register(region, endpoint)
            region.write(list(arrays.values()), offsets)
        except BaseException:
            pool.give(region)                          # the server never used it
            raise
        # reused per thread as the gRPC path's; keyed by whether the offset is 0, since
        # set_shared_memory leaves an earlier offset in place when given 0
        cache = self._local.__dict__.setdefault("shm", {})
        grpc = _grpc()
        desc = self.description
        inputs, nbytes = [], 0
        for (name, array), offset in zip(arrays.items(), offsets):
            shape = list(array.shape)
            item = cache.get((name, offset > 0))
            if item is None:
                item = cache[(name, offset > 0)] = grpc.InferInput(name, shape,
                                                                   desc.inputs[name].datatype)
            elif item.shape() != shape:
                item.set_shape(shape)
            item.set_shared_memory(region.name, array.nbytes, offset)
            inputs.append(item)
            nbytes += array.nbytes
        outputs = self._outputs
        if layout:
            outputs = []
            for name, (offset, nbytes_out) in layout.items():      # offsets > 0
                item = cache.get(name)
                if item is None:
                    item = cache[name] = grpc.InferRequestedOutput(name)
                item.set_shared_memory(region.name, nbytes_out, offset)
                outputs.append(item)
        with self._shm_lock:
            self._shm_counts["shm_requests"] += 1
            self._shm_counts["shm_bytes"] += nbytes
        return _Request(inputs, outputs, nbytes, pool, region, layout)

    def _refuse(self, endpoint: Endpoint, reason: str) -> None:
        """``endpoint`` cannot use shared memory: gRPC from now on, said once per server."""
        if endpoint.refuse_shm(reason):
            LOG.warning("model '%s': %s cannot use shared memory (%s); its requests go over "
                        "gRPC", self.config.model, endpoint.label(), reason)
        with self._shm_lock:
            self._shm_refused.setdefault(endpoint.name, endpoint.shm_refused or reason)

    def _region_lost(self, request: _Request, error: BaseException, endpoint: Endpoint,
                     route: _Route) -> bool:
        """True when ``request`` failed because the server does not know its region (a
        restarted server lost its registrations): the registrations on ``endpoint`` are
        forgotten (the request registers again when sent again, at once). The second time
        for one request the server gets gRPC instead (something between the client and the
        servers, a load balancer, sends requests where the region is not registered)."""
        if not request.name:
            return False
        status, message = status_of(error)
        if status != "StatusCode.NOT_FOUND" or f"'{request.name}'" not in message:
            return False
        if route.registered_again:
            self._refuse(endpoint, f"a request did not find the region it had just "
                                   f"registered ({message}); a load balancer in front of "
                                   f"several servers?")
        else:
            route.registered_again = True
            LOG.info("model '%s': %s does not know this client's shared-memory regions (it "
                     "restarted?): registering them again", self.config.model, endpoint.label())
            request.pool.forget(endpoint)
        return True

    def _outputs_of(self, result, request: _Request) -> dict[str, np.ndarray]:
        """The outputs of an answer: from the gRPC message, or copied out of the request's
        region (which goes back to the pool)."""
        if not request.layout:
            return {name: result.as_numpy(name) for name in self.description.outputs}
        region = request.region
        return {name: region.read(self.description.outputs[name].dtype,
                                  result.get_output(name).shape, offset)
                for name, (offset, _) in request.layout.items()}

    def _route(self) -> _Route:
        """The order of servers for a new request, by the balancing policy; servers whose
        health is not ``up`` (the circuit breaker, :class:`Health`) come last."""
        route = self._policy_route()
        if len(route.endpoints) > 1:
            route.endpoints.sort(key=lambda ep: ep.health.state != "up")     # stable
        return route

    def _policy_route(self) -> _Route:
        with self._order_lock:
            endpoints = list(self.endpoints)
            if self.balance == "first" or len(endpoints) < 2:
                return _Route(endpoints)
            now_s = time.monotonic()
            up = [ep for ep in endpoints if self._down_until.get(ep, 0.0) <= now_s]
            down = sorted((ep for ep in endpoints if self._down_until.get(ep, 0.0) > now_s),
                          key=self._down_until.__getitem__)
            if up:
                turn = self._turn % len(up)
                self._turn += 1
                up = up[turn:] + up[:turn]
        if len(up) > 1 and self.balance == "least_outstanding":
            up.sort(key=Endpoint.in_flight)          # stable: ties keep the turn's order
        return _Route(up + down)

    def _demote(self, endpoint: Endpoint) -> None:
        """A server exhausted its tries: ``first`` moves it to the back of the order, the
        other policies skip it for :data:`DOWN_S` seconds."""
        with self._order_lock:
            if self.balance != "first":
                if len(self.endpoints) > 1:
                    self._down_until[endpoint] = time.monotonic() + DOWN_S
            elif len(self.endpoints) > 1 and self.endpoints[0] is endpoint:
                self.endpoints.remove(endpoint)
                self.endpoints.append(endpoint)

    def _answered(self, endpoint: Endpoint, result=None) -> None:
        self._count(endpoint, "answers")
        if endpoint.name not in self._answered_by:      # the first answer of this server
            self._note_server(endpoint, result)
        endpoint.health.answered()
        if self._down_until:
            with self._order_lock:
                self._down_until.pop(endpoint, None)

    def _failed(self, route: _Route, error: BaseException) -> str:
        """Record a failed attempt; ``"again"`` when the request should be sent again (to
        ``route.endpoint``, after :meth:`pause`), ``"outage"`` when every server is spent but
        some may be down (:meth:`_outage`), ``"fail"`` when the call has failed."""
        ep = route.endpoint
        status, message = status_of(error)
        self._count(ep, "failed")
        route.attempts.append(Attempt(ep.name, ep.address, status, message))
        route.tries_here += 1
        if status in NOT_RETRYABLE:
            return "fail"
        if status in UNREACHABLE:
            ep.health.failed(self.probe_timeout_s)
        if route.tries_here < self.config.tries:
            self.stats.add(retries=1)
            LOG.debug("model '%s': %s failed (%s: %s); try %d of %d", self.config.model,
                      ep.label(), status, message, route.tries_here + 1, self.config.tries)
            return "again"
        self._demote(ep)
        if route.index + 1 < len(route.endpoints):
            route.index += 1
            route.tries_here = 0
            self.stats.add(failovers=1)
            LOG.warning("model '%s': %s failed %d time(s) (last %s: %s); failing over to %s",
                        self.config.model, ep.label(), self.config.tries, status, message,
                        route.endpoint.label())
            return "again"
        return "outage" if self.config.outage_s > 0 else "fail"

    def pause(self, route: _Route) -> float:
        """The pause before a request is sent again: none on a new server; on the same one
        ``backoff_s`` doubled with each try, at most :data:`MAX_BACKOFF_S`, with full jitter
        (so that clients that failed together do not retry together)."""
        if route.tries_here == 0 or self.config.backoff_s <= 0:
            return 0.0
        ceiling = min(self.config.backoff_s * 2 ** (route.tries_here - 1), MAX_BACKOFF_S)
        return random.uniform(ceiling / 2, ceiling)

    def _outage(self, route: _Route) -> str:
        """Every server of the request is spent. ``"resume"``: a server it saw down is back
        (the request starts afresh on it; a server past the budget replaced by the fallback
        server counts too); ``"wait"``: some server is down or being probed, within the
        outage budget; ``"fail"``: every server answers its probes (the failures were not an
        outage), or the budget is spent."""
        now_s = time.monotonic()
        if route.deadline is None:
            route.deadline = now_s + self.config.outage_s
        for ep in route.endpoints:
            if ep.health.state == "down":
                route.seen_down.add(ep)
        back = [ep for ep in route.endpoints if ep in route.seen_down
                and ep.health.state == "up"]
        if back:
            self._restart(route, back)
            return "resume"
        if all(ep.health.state == "up" for ep in route.endpoints):
            return "fail"
        if now_s < route.deadline:
            return "wait"
        replacement = self._take_over(route)
        if replacement is not None:
            self._restart(route, [replacement])
            return "resume"
        waited = now_s - (route.deadline - self.config.outage_s)      # the budget, spent
        self.stats.add(outage_waits=1, outage_wait_s=max(waited, 0.0))
        return "fail"

    def _restart(self, route: _Route, first: list[Endpoint]) -> None:
        """Send the request again, to ``first`` (fresh tries), then to the others."""
        waited = time.monotonic() - (route.deadline - self.config.outage_s)
        self.stats.add(outage_waits=1, outage_wait_s=max(waited, 0.0))
        rest = [ep for ep in self._route().endpoints if ep not in first]
        route.endpoints = list(first) + rest
        route.index = route.tries_here = 0
        route.deadline = None
        route.seen_down = set()

    def _take_over(self, route: _Route) -> Endpoint | None:
        """Past the outage budget, with a registry that allows it (``fallback: true``): the
        local fallback server joins this client's servers, said in the log and the report."""
        if self._replacement is None:
            return None
        with self._order_lock:
            if self._fallback is None:
                try:
                    self._fallback = self._replacement()
                except Exception as exc:           # e.g. the server extra is missing
                    LOG.error("model '%s': the local fallback server cannot take over: %s",
                              self.config.model, exc)
                    self._replacement = None
                    return None
                self.endpoints.append(self._fallback)
                LOG.warning("model '%s': every server was down for %.0f s (outage budget): the "
                            "local fallback server takes over", self.config.model,
                            self.config.outage_s)
                self.stats.add(fallback_takeovers=1)
            return self._fallback

    def _outage_reason(self, route: _Route) -> str:
        if all(ep.health.state == "up" for ep in route.endpoints):
            return ""
        return (f"every server of the model was down for {self.config.outage_s:g} s, the "
                f"outage budget (outage_budget)")

    def _error(self, route: _Route, reason: str = "") -> InferenceError:
        return InferenceError(self.config.model, self.config.version, route.attempts,
                              reason=reason)

    def _not_started(self, route: _Route, error: BaseException) -> InferenceError:
        """The fallback server could not start: no request went out."""
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        failure = self._error(route, f"{route.endpoint.label()} could not start: {first_line}")
        failure.__cause__ = error
        return failure

    def _submit(self, call: Call, chunks: list[Chunk]) -> None:
        mode = self.config.mode
        if mode == "async":
            for index, arrays in chunks:
                self._send_async(call, index, arrays, self._route())
        elif mode == "sync":
            self._run_blocking(call, chunks)
        else:
            if self._pool is None:
                raise SonicError(f"model '{self.config.model}': client used after end_job()")
            self._pool.submit(self._run_blocking, call, chunks)

    # async ---------------------------------------------------------------------------------
    def _send_async(self, call: Call, index: int, arrays, route: _Route) -> None:
        if call.finished:                      # another chunk failed already
            return
        def go(error: BaseException | None) -> None:
            try:
                if error is None:
                    self._send_async_now(call, index, arrays, route)
                else:
                    call.fail(self._not_started(route, error))
            except Exception as exc:       # may run in a Future's callback, which would
                call.fail(exc)             # swallow it: fail the call, never leave it hanging
        route.endpoint.when_ready(go)

    def _send_async_now(self, call: Call, index: int, arrays, route: _Route) -> None:
        ep = route.endpoint
        if ep not in self._baselines:
            self._take_baseline(ep)
        start = now()
        flight = request = None
        sent = False
        try:
            request = self._prepare(ep, arrays)
            packed = now()

            def callback(result, error):
                flight.end()
                self.stats.add(roundtrip_s=now() - start)
                if error is None:
                    self.stats.add(answers=1)
                    self._answered(ep, result)
                    try:
                        outputs = self._outputs_of(result, request)
                    except Exception as exc:          # a malformed answer, a released region
                        call.fail(exc)
                        return
                    finally:
                        request.release(reuse=True)
                    call.part_done(index, outputs)
                    return
                if self._region_lost(request, error, ep, route):
                    request.release(reuse=True)       # the server never used it
                    LATER(0.0, lambda: self._send_async(call, index, arrays, route))
                    return
                request.release(reuse=False)
                self._retry_async(call, index, arrays, route, error)

            grpc = ep.grpc()
            flight = ep.flight()
            self._count(ep, "requests")
            grpc.async_infer(
                self.config.model, request.inputs, callback, model_version=self.config.version,
                outputs=request.outputs, client_timeout=self.config.timeout_s,
                compression_algorithm=self._compression)
            sent = True
            self.stats.add(requests=1, bytes_sent=request.nbytes, pack_s=packed - start)
        except Exception as exc:                        # could not even send it
            if flight is not None:
                flight.end()
            if request is not None and not sent:
                request.release(reuse=True)
            self.stats.add(requests=1)
            self._retry_async(call, index, arrays, route, exc)

    def _retry_async(self, call: Call, index: int, arrays, route: _Route,
                     error: BaseException) -> None:
        if call.finished:
            return
        if self._ended:
            call.fail(self._error(route, "the client ended"))
            return
        action = self._failed(route, error)
        if action == "again":
            LATER(self.pause(route), lambda: self._send_async(call, index, arrays, route))
        elif action == "outage":
            self._outage_async(call, index, arrays, route)
        else:
            call.fail(self._error(route))

    def _outage_async(self, call: Call, index: int, arrays, route: _Route) -> None:
        """Wait out an outage without holding a thread: at the next change of a server's
        health or at the deadline, whichever comes first, decide again."""
        if call.finished or self._ended:
            if not call.finished:
                call.fail(self._error(route, "the client ended"))
            return
        try:
            action = self._outage(route)
        except Exception as exc:                   # on the timer thread: fail, never hang
            call.fail(exc)
            return
        if action == "resume":
            self._send_async(call, index, arrays, route)
            return
        if action == "fail":
            call.fail(self._error(route, self._outage_reason(route)))
            return
        route.waiting += 1
        token = route.waiting

        def again():
            if route.waiting == token:             # the first of the health change and the
                route.waiting += 1                 # deadline decides; the other is stale
                self._outage_async(call, index, arrays, route)
        for ep in route.endpoints:
            ep.health.watch(again)
        LATER(route.deadline - time.monotonic() + 0.01, again)

    # sync and pseudo-async -----------------------------------------------------------------
    def _run_blocking(self, call: Call, chunks: list[Chunk]) -> None:
        for index, arrays in chunks:
            if call.finished:
                return
            route = self._route()
            while not call.finished:
                ep = route.endpoint
                try:
                    ep.wait_ready()
                except Exception as exc:
                    call.fail(self._not_started(route, exc))
                    return
                if ep not in self._baselines:
                    self._take_baseline(ep)
                start = now()
                request = None
                try:
                    request = self._prepare(ep, arrays)
                    packed = now()
                    self.stats.add(requests=1, bytes_sent=request.nbytes, pack_s=packed - start)
                    grpc = ep.grpc()
                    flight = ep.flight()
                    self._count(ep, "requests")
                    try:
                        result = grpc.infer(
                            self.config.model, request.inputs,
                            model_version=self.config.version, outputs=request.outputs,
                            client_timeout=self.config.timeout_s,
                            compression_algorithm=self._compression)
                    finally:
                        flight.end()
                    self.stats.add(roundtrip_s=now() - start, answers=1)
                    self._answered(ep, result)
                    try:
                        outputs = self._outputs_of(result, request)
                    finally:
                        request.release(reuse=True)
                    call.part_done(index, outputs)
                    break
                except Exception as exc:
                    self.stats.add(roundtrip_s=now() - start)
                    if request is not None:             # (released already if answered)
                        lost = self._region_lost(request, exc, ep, route)
                        request.release(reuse=lost)
                        if lost:
                            continue
                    if self._ended:
                        call.fail(self._error(route, "the client ended"))
                        return
                    action = self._failed(route, exc)
                    if action == "again":
                        time.sleep(self.pause(route))
                    elif action == "outage" and self._outage_blocking(route):
                        continue
                    elif action != "again":
                        call.fail(self._error(route, self._outage_reason(route)
                                              if action == "outage" else ""))
                        return

    def _outage_blocking(self, route: _Route) -> bool:
        """Wait out an outage in this thread (sync, pseudo-async); True to send again."""
        while not self._ended:
            action = self._outage(route)
            if action != "wait":
                return action == "resume"
            states = {ep: ep.health.state for ep in route.endpoints}
            waiting = next((ep for ep, s in states.items() if s != "up"), None)
            left = route.deadline - time.monotonic()
            if waiting is None or left <= 0:
                continue
            waiting.health.wait_change(states[waiting], min(left, 0.5))
        return False

    # server-side time -----------------------------------------------------------------------
    def _take_baseline(self, endpoint: Endpoint) -> None:
        """Read the model's statistics on ``endpoint`` before this client's first request
        there (see :mod:`recorun.sonic_clients.server_stats`)."""
        with self._baseline_lock:
            if endpoint in self._baselines:
                return
            try:
                self._baselines[endpoint] = read_statistics(
                    endpoint.grpc(), self.config.model, self.config.version,
                    self.probe_timeout_s)
            except Exception as exc:
                status, message = status_of(exc)
                LOG.info("model '%s': %s: no server statistics (%s: %s)", self.config.model,
                         endpoint.label(), status, message)
                self._baselines[endpoint] = None

    def _collect_server_time(self) -> None:
        counts = self.stats.snapshot()
        for attempt in range(STATISTICS_READS):
            deltas, missing = [], []
            for endpoint, baseline in self._baselines.items():
                try:
                    if baseline is None:
                        raise RuntimeError("no statistics before the first request")
                    deltas.append(read_statistics(endpoint.grpc(), self.config.model,
                                                  self.config.version, self.probe_timeout_s)
                                  - baseline)
                except Exception as exc:
                    missing.append(f"{endpoint.label()}: {status_of(exc)[1]}")
            # the server counts a request once its answer is out: the last ones may lag
            if missing or sum(d.requests for d in deltas) >= counts["answers"]:
                break
            time.sleep(0.02 * (attempt + 1))
        if not deltas:
            return
        self._server_time = server_time(deltas, calls=int(counts["calls"]),
                                        requests=int(counts["answers"]),
                                        rows=int(counts["rows"]))
        if missing:
            self._server_time["server_statistics_missing"] = missing

    def timing(self) -> dict:
        """The base counters, and the server-side figures of
        :func:`~recorun.sonic_clients.server_stats.server_time` once the client has ended."""
        values = super().timing()
        values.update(self._server_time)
        values["balance"] = self.balance
        shm = self._shm
        with self._shm_lock:
            values.update(transport=self.transport, **self._shm_counts,
                          shm_regions=self._shm_made + (shm.made if shm is not None else 0))
            if self._shm_refused:
                values["shm_refused"] = dict(self._shm_refused)
        with self._per_server_lock:
            values["per_server"] = {name: dict(counts)
                                    for name, counts in self._per_server.items()}
        return values

    # lifecycle -----------------------------------------------------------------------------
    def _close(self) -> None:
        pool, self._pool = self._pool, None
        shutdown_pool(pool)
        shm = self._shm
        if shm is not None:
            with self._shm_lock:
                self._shm_made += shm.made
                self._shm = None
            shm.close()
        self._collect_server_time()
        self._baselines.clear()
        for ep in self._owned:
            ep.close()

    def begin_job(self) -> None:
        super().begin_job()
        if self.config.mode == "pseudo-async" and self._pool is None:
            self._pool = ThreadPoolExecutor(
                1, thread_name_prefix=f"sonic-{self.config.model}-pseudo-async")
        self._start_transport()

    def _start_transport(self) -> None:
        """Decide ``auto`` (shared memory when every server is on this host) and make the
        shared-memory pool; the outputs go through it when their shapes per row are fixed."""
        if self.transport == "auto":
            with self._order_lock:
                remote = [ep.label() for ep in self.endpoints if not ep.is_local()]
            self.transport = "grpc" if remote else "shm"
            LOG.info("model '%s': transport auto: %s%s", self.config.model, self.transport,
                     f" ({', '.join(remote)} not on this host)" if remote else "")
        if self.transport != "shm" or self._shm is not None:
            return
        outputs = self.description.outputs.values()
        self._shm_outputs = ({t.name: int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
                              for t in outputs} if all(d >= 0 for t in outputs for d in t.shape)
                             else {})
        self._shm = ShmPool(self.config.model, timeout_s=self.probe_timeout_s)
