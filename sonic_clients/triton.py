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
are in ``timing()["per_server"]``.

``InferInput`` objects are reused: one per input name and thread (the request is serialized
inside ``infer``/``async_infer``, so the object is free again when that call returns);
``InferRequestedOutput`` objects are made once per client.
"""
from __future__ import annotations

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

#: times the statistics are read at end_job until they count every answered request
STATISTICS_READS = 6

#: gRPC statuses that another try cannot cure: the call fails at once.
NOT_RETRYABLE = ("StatusCode.INVALID_ARGUMENT",)

#: seconds a server that exhausted its tries is skipped by round_robin and least_outstanding
DOWN_S = 5.0


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

    @property
    def address(self) -> str:
        return self._address

    def __repr__(self) -> str:
        return f"Endpoint({self.name!r}, {self.address!r})"

    def label(self) -> str:
        return f"server '{self.name}' ({self.address})"

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
        with self._lock:
            client, self._client = self._client, None
            self._descriptions.clear()
        if client is not None:
            try:
                client.close()
            except Exception:
                pass


class _Route:
    """Where one request goes next: the servers in this client's order, tries per server."""

    __slots__ = ("attempts", "endpoints", "index", "tries_here")

    def __init__(self, endpoints: Sequence[Endpoint]):
        self.endpoints = list(endpoints)
        self.index = 0
        self.tries_here = 0
        self.attempts: list[Attempt] = []

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self.index]


class TritonClient(SonicClient):
    """A client of one model on one or more Triton servers (see the module docstring).

    ``endpoints``: :class:`Endpoint` objects (shared, owned by the registry) or ``host:port``
    strings (owned by this client, closed at end_job). ``description``: the model as the
    registry found it (else fetched from the first endpoint that serves it)."""

    kind = "triton"

    def __init__(self, config: ClientConfig, endpoints: Sequence[Endpoint | str], *,
                 description: ModelDescription | None = None, probe_timeout_s: float = 5.0,
                 balance: str = "first"):
        super().__init__(config)
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
        self._given_description = description
        self.probe_timeout_s = probe_timeout_s
        self._local = threading.local()
        self._outputs = None
        self._pool: ThreadPoolExecutor | None = None
        self._compression = None if self.config.compression == "none" else self.config.compression
        self._baselines: dict[Endpoint, ModelStatistics | None] = {}
        self._baseline_lock = threading.Lock()
        self._server_time: dict = {}

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

    def _outputs_of(self, result) -> dict[str, np.ndarray]:
        return {name: result.as_numpy(name) for name in self.description.outputs}

    def _route(self) -> _Route:
        """The order of servers for a new request, by the balancing policy."""
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

    def _answered(self, endpoint: Endpoint) -> None:
        self._count(endpoint, "answers")
        if self._down_until:
            with self._order_lock:
                self._down_until.pop(endpoint, None)

    def _failed(self, route: _Route, error: BaseException) -> bool:
        """Record a failed attempt; True when the request should be sent again (to
        ``route.endpoint``), False when the call has failed."""
        ep = route.endpoint
        status, message = status_of(error)
        self._count(ep, "failed")
        route.attempts.append(Attempt(ep.name, ep.address, status, message))
        route.tries_here += 1
        if status in NOT_RETRYABLE:
            return False
        if route.tries_here < self.config.tries:
            self.stats.add(retries=1)
            LOG.debug("model '%s': %s failed (%s: %s); try %d of %d", self.config.model,
                      ep.label(), status, message, route.tries_here + 1, self.config.tries)
            return True
        self._demote(ep)
        if route.index + 1 < len(route.endpoints):
            route.index += 1
            route.tries_here = 0
            self.stats.add(failovers=1)
            LOG.warning("model '%s': %s failed %d time(s) (last %s: %s); failing over to %s",
                        self.config.model, ep.label(), self.config.tries, status, message,
                        route.endpoint.label())
            return True
        return False

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
        flight = None
        try:
            inputs, nbytes = self._inputs_for(arrays)
            packed = now()

            def callback(result, error):
                flight.end()
                self.stats.add(roundtrip_s=now() - start)
                if error is None:
                    self.stats.add(answers=1)
                    self._answered(ep)
                    try:
                        call.part_done(index, self._outputs_of(result))
                    except Exception as exc:          # a malformed answer
                        call.fail(exc)
                    return
                self._retry_async(call, index, arrays, route, error)

            grpc = ep.grpc()
            flight = ep.flight()
            self._count(ep, "requests")
            grpc.async_infer(
                self.config.model, inputs, callback, model_version=self.config.version,
                outputs=self._outputs, client_timeout=self.config.timeout_s,
                compression_algorithm=self._compression)
            self.stats.add(requests=1, bytes_sent=nbytes, pack_s=packed - start)
        except Exception as exc:                        # could not even send it
            if flight is not None:
                flight.end()
            self.stats.add(requests=1)
            self._retry_async(call, index, arrays, route, exc)

    def _retry_async(self, call: Call, index: int, arrays, route: _Route,
                     error: BaseException) -> None:
        if call.finished:
            return
        if self._ended:
            call.fail(self._error(route, "the client ended"))
        elif self._failed(route, error):
            self._send_async(call, index, arrays, route)
        else:
            call.fail(self._error(route))

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
                try:
                    inputs, nbytes = self._inputs_for(arrays)
                    packed = now()
                    self.stats.add(requests=1, bytes_sent=nbytes, pack_s=packed - start)
                    grpc = ep.grpc()
                    flight = ep.flight()
                    self._count(ep, "requests")
                    try:
                        result = grpc.infer(
                            self.config.model, inputs, model_version=self.config.version,
                            outputs=self._outputs, client_timeout=self.config.timeout_s,
                            compression_algorithm=self._compression)
                    finally:
                        flight.end()
                    self.stats.add(roundtrip_s=now() - start, answers=1)
                    self._answered(ep)
                    call.part_done(index, self._outputs_of(result))
                    break
                except Exception as exc:
                    self.stats.add(roundtrip_s=now() - start)
                    if self._ended:
                        call.fail(self._error(route, "the client ended"))
                        return
                    if not self._failed(route, exc):
                        call.fail(self._error(route))
                        return

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
        with self._per_server_lock:
            values["per_server"] = {name: dict(counts)
                                    for name, counts in self._per_server.items()}
        return values

    # lifecycle -----------------------------------------------------------------------------
    def _close(self) -> None:
        pool, self._pool = self._pool, None
        shutdown_pool(pool)
        self._collect_server_time()
        self._baselines.clear()
        for ep in self._owned:
            ep.close()

    def begin_job(self) -> None:
        super().begin_job()
        if self.config.mode == "pseudo-async" and self._pool is None:
            self._pool = ThreadPoolExecutor(
                1, thread_name_prefix=f"sonic-{self.config.model}-pseudo-async")
