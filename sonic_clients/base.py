"""The SONIC client contract that producers program against (CMSSW's ``SonicClient``).

A producer holds one :class:`SonicClient` (made by
:meth:`recorun.sonic_clients.registry.ServerRegistry.client_for` or :func:`sonic_clients.make_client`)
and uses three calls:

* ``describe()`` at begin_job: the model's inputs and outputs (``name -> (shape per row, numpy
  dtype)``) and ``max_batch_size``, as the server (or the in-process model) reports them;
* ``validate({name: (shape per row, dtype)})`` at begin_job: raises :class:`ClientConfigError`
  (naming the model and the tensor) when what the producer will send does not fit the model,
  before any event;
* ``infer(inputs, done)`` in ``acquire``: the ONE entry point. ``inputs`` maps input names to
  arrays whose first axis is the batch. ``done(outputs, None)`` or ``done(None, error)`` is
  called exactly once, from any thread:

  ==============  =====================================================================
  mode            what ``infer`` does
  ==============  =====================================================================
  ``async``       sends non-blocking requests and returns at once; a gRPC thread calls
                  ``done`` (the paper's SONIC mode)
  ``sync``        blocks until the answer is in and calls ``done`` before it returns
  ``pseudo-async``  returns at once; a blocking call on a client-owned thread calls ``done``
  ==============  =====================================================================

  A batch of 0 rows calls ``done`` at once with empty outputs. A batch above ``max_batch_size``
  is split into several requests whose outputs are concatenated in order. Inputs that do not
  fit ``describe()`` raise :class:`ClientConfigError` from ``infer`` itself (no ``done``).

  **Ragged inputs** (CMSSW's ``batchMode: Ragged``): for a model with a variable dimension
  (``-1`` in its shape per row), an input may be given as a *list of entries*, one array per row
  without the batch axis, whose shapes differ (every input then is such a list, all of the same
  length). Entries of the same shapes travel together; each group of shapes is sent as its own
  request(s), since one request carries one shape. ``done`` then gets, for each output, a list
  of one array per entry (shape per row, no batch axis), in the entries' order.

A failed request is retried (``tries`` per server), then tried on the next server that has the
model, then fails with :class:`InferenceError` naming the model, the server(s), the attempts and
the last gRPC status and message.

Each client keeps thread-safe counters (:meth:`SonicClient.timing`): calls, requests, retries,
failovers, failures, rows, bytes sent, packing and round-trip seconds.

Subclasses (:mod:`recorun.sonic_clients.triton`, :mod:`recorun.sonic_clients.inprocess`) provide
``_fetch_description()`` and ``_submit(call, chunks)``; everything else lives here.
"""
from __future__ import annotations

import difflib
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

LOG = logging.getLogger("recorun.sonic_clients")

MODES = ("async", "sync", "pseudo-async")
COMPRESSIONS = ("none", "deflate", "gzip")
CLIENTS = ("triton", "inprocess")
BACKENDS = ("onnxruntime", "torch")
#: how a Triton client spreads its requests over the servers that serve its model
#: (:mod:`recorun.sonic_clients.triton`); ``""`` in a :class:`ClientConfig` means the registry's choice
BALANCES = ("first", "round_robin", "least_outstanding")
#: how a Triton client moves tensors (:mod:`recorun.sonic_clients.shm`): in the gRPC messages,
#: through system shared memory, or shared memory when every server of the model is local
TRANSPORTS = ("grpc", "shm", "auto")

Done = Callable[[dict | None, BaseException | None], None]


class ClientConfigError(ValueError):
    """A client's configuration, or the tensors a producer gives it, do not fit the model or
    the servers; raised before any event where possible."""


class SonicError(RuntimeError):
    """Base of the run-time errors of the SONIC clients."""


@dataclass(frozen=True)
class Attempt:
    """One failed request: where it went and what came back."""

    server: str
    address: str
    status: str
    message: str

    def __str__(self) -> str:
        return f"server '{self.server}' ({self.address}): {self.status}: {self.message}"


class InferenceError(SonicError):
    """An inference failed after every allowed try on every server that has the model.

    ``model``, ``version``, ``attempts`` (a list of :class:`Attempt`), ``status`` and ``message``
    (of the last attempt) say what happened; the producer adds the event."""

    def __init__(self, model: str, version: str, attempts: Sequence[Attempt], *,
                 reason: str = ""):
        self.model = model
        self.version = version
        self.attempts = list(attempts)
        last = self.attempts[-1] if self.attempts else None
        self.status = last.status if last else ""
        self.message = last.message if last else reason
        per_server: dict[tuple[str, str], int] = {}
        for a in self.attempts:
            per_server[(a.server, a.address)] = per_server.get((a.server, a.address), 0) + 1
        what = f"model '{model}'{f' version {version}' if version else ''}"
        if not self.attempts:
            text = f"{what}: inference failed before any request was sent: {reason}"
        else:
            n, plural = len(self.attempts), "s" if len(per_server) > 1 else ""
            where = ", ".join(f"'{s}' ({addr}) {k}x" for (s, addr), k in per_server.items())
            text = (f"{what}: inference failed after {n} attempt{'s' if n > 1 else ''} on "
                    f"server{plural} {where}")
            if reason:
                text += f" ({reason})"
            text += f"; last status {last.status}: {last.message}"
        super().__init__(text)


# --- durations -------------------------------------------------------------------------------

_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0,
          "seconds": 1.0, "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0,
          "minutes": 60.0, "h": 3600.0, "hour": 3600.0, "hours": 3600.0}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*$")


def parse_duration(text: str | float) -> float:
    """Seconds in ``text``: ``"500 ms"``, ``"5 s"``, ``"2 min"``, ``"1.5h"``, ``"250us"``; a bare
    number (or a number given as int/float) means seconds. Raises ValueError otherwise."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise ValueError(f"not a duration: {text!r} (write e.g. '500 ms', '5 s', '2 min', "
                             "or a number of seconds)")
        number, unit = match.groups()
        if unit and unit.lower() not in _UNITS and unit not in _UNITS:
            raise ValueError(f"unknown unit '{unit}' in duration {text!r} (units: us, ms, s, "
                             "min, h)")
        value = float(number) * (_UNITS.get(unit, _UNITS.get(unit.lower(), 1.0)) if unit else 1.0)
    if not value >= 0:                       # negative or NaN
        raise ValueError(f"a duration must not be negative: {text!r}")
    return value


# --- configuration ---------------------------------------------------------------------------

@dataclass
class ClientConfig:
    """How a producer talks to its model (the YAML ``client:`` block of a SONIC producer).

    ``timeout_s`` may be given as text (``"500 ms"``, ``"5 s"``, ``"2 min"``); it bounds each
    request (each try). ``tries`` is the number of attempts per server (1: no retry), as
    CMSSW's ``allowedTries``. ``server`` names the preferred server of the
    :class:`~recorun.sonic_clients.registry.ServerRegistry`. ``backend`` is for in-process clients only.
    ``balance`` spreads the requests over the servers that serve the model (one of
    :data:`BALANCES`; empty: the registry's ``balance``, ``first`` by default), see
    :mod:`recorun.sonic_clients.triton`. ``backoff_s``: the first pause between two tries on one
    server (doubling, jittered, at most 2 s). ``outage_s``: the outage budget, how long a
    request waits for one of its servers to come back while every one is down (0: fail at
    once). ``transport`` (one of :data:`TRANSPORTS`): ``grpc`` sends the tensors in the gRPC
    messages; ``shm`` through Triton's system shared memory (a server that cannot use it gets
    gRPC, with a warning); ``auto``: ``shm`` when every server of the model is on this host
    (127.0.0.1, localhost, ::1, or the local fallback server), else ``grpc``; see
    :mod:`recorun.sonic_clients.shm`.
    """

    model: str
    version: str = ""
    server: str = ""
    mode: str = "async"
    timeout_s: float = 10.0
    tries: int = 3
    compression: str = "none"
    client: str = "triton"
    backend: str = "onnxruntime"
    verbose: bool = False
    balance: str = ""
    backoff_s: float = 0.05
    outage_s: float = 30.0
    transport: str = "grpc"

    def __post_init__(self):
        def bad(name, message):
            return ClientConfigError(f"client config for model '{self.model}': {name}: {message}")

        if not isinstance(self.model, str) or not self.model:
            raise ClientConfigError(f"client config: model must be a non-empty string, "
                                    f"not {self.model!r}")
        if isinstance(self.version, int) and not isinstance(self.version, bool):
            self.version = str(self.version)
        if not isinstance(self.version, str):
            raise bad("version", f"expected a string, got {self.version!r}")
        if self.version in ("-1", "latest"):
            self.version = ""
        if not isinstance(self.server, str):
            raise bad("server", f"expected a server name, got {self.server!r}")
        for name, allowed in (("mode", MODES), ("compression", COMPRESSIONS),
                              ("client", CLIENTS), ("backend", BACKENDS),
                              ("balance", ("", *BALANCES)), ("transport", TRANSPORTS)):
            value = getattr(self, name)
            if value not in allowed:
                near = difflib.get_close_matches(str(value), allowed, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                raise bad(name, f"{value!r} is not one of {list(allowed)}{hint}")
        try:
            self.timeout_s = parse_duration(self.timeout_s)
        except ValueError as exc:
            raise bad("timeout_s", str(exc)) from None
        if self.timeout_s <= 0:
            raise bad("timeout_s", "must be positive")
        if isinstance(self.tries, bool) or not isinstance(self.tries, int) or self.tries < 1:
            raise bad("tries", f"must be an integer of at least 1, not {self.tries!r}")
        for name in ("backoff_s", "outage_s"):
            try:
                setattr(self, name, parse_duration(getattr(self, name)))
            except ValueError as exc:
                raise bad(name, str(exc)) from None
            if getattr(self, name) < 0:
                raise bad(name, "must not be negative")
        if not isinstance(self.verbose, bool):
            raise bad("verbose", f"expected true or false, got {self.verbose!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ClientConfig:
        """From a workflow's mapping; ``timeout`` is accepted for ``timeout_s``. Unknown keys are
        a :class:`ClientConfigError` that names them."""
        values = dict(values)
        if "timeout" in values and "timeout_s" not in values:
            values["timeout_s"] = values.pop("timeout")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in values if k not in known]
        if unknown:
            near = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ClientConfigError(f"client config: unknown key '{unknown[0]}'{hint} "
                                    f"(keys: {', '.join(known)})")
        if "model" not in values:
            raise ClientConfigError("client config: 'model' is required")
        return cls(**values)


# --- what a model looks like -----------------------------------------------------------------

def _shape_text(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a model serves it: shape per row (without the batch axis; -1 = any),
    numpy dtype, and the server's datatype name (``FP32``...)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    datatype: str = ""

    def __str__(self) -> str:
        return f"{self.name} {_shape_text(self.shape)} {np.dtype(self.dtype).name}"

    def fits(self, shape: Sequence[int]) -> bool:
        shape = tuple(int(d) for d in shape)
        return len(shape) == len(self.shape) and all(
            want < 0 or got < 0 or want == got for want, got in zip(self.shape, shape))


@dataclass(frozen=True)
class ModelDescription:
    """A model's tensors and largest batch, where the description came from (``source``)."""

    model: str
    version: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    max_batch_size: int
    source: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict:
        return {
            "model": self.model, "version": self.version,
            "inputs": {n: (t.shape, np.dtype(t.dtype)) for n, t in self.inputs.items()},
            "outputs": {n: (t.shape, np.dtype(t.dtype)) for n, t in self.outputs.items()},
            "max_batch_size": self.max_batch_size, "source": self.source, **self.extra,
        }

    def same_tensors(self, other: ModelDescription) -> bool:
        def key(tensors):
            return {n: (t.shape, np.dtype(t.dtype)) for n, t in tensors.items()}
        return key(self.inputs) == key(other.inputs) and key(self.outputs) == key(other.outputs)

    def tensors_text(self) -> str:
        return (f"inputs {', '.join(map(str, self.inputs.values()))}; "
                f"outputs {', '.join(map(str, self.outputs.values()))}")


def description_from_spec(name: str, version: str = "", *, max_batch_size: int | None = None,
                          source: str = "") -> ModelDescription:
    """The description of one of recorun's models (:data:`recorun.model_specs.SPECS`)."""
    from recorun.model_specs import SPECS

    if name not in SPECS:
        near = difflib.get_close_matches(name, list(SPECS), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ClientConfigError(f"model '{name}' is not one of recorun's models{hint} "
                                f"(models: {', '.join(SPECS)})")
    spec = SPECS[name]

    def info(tensors):
        return {t.name: TensorInfo(t.name, tuple(t.shape), np.dtype(t.dtype),
                                   _TRITON_DATATYPE.get(np.dtype(t.dtype).name, ""))
                for t in tensors}
    return ModelDescription(name, version, info(spec.inputs), info(spec.outputs),
                            int(max_batch_size or spec.max_batch_size), source)


def merge_descriptions(model: str, found: Sequence[ModelDescription]) -> ModelDescription:
    """One description of ``model`` from what several servers report, the preferred server's
    first. The one rule, wherever servers are combined: every server must serve the same
    tensors (names, shapes per row, dtypes), else the deployment is inconsistent and
    :class:`ClientConfigError` names the two servers that disagree; the batch limit is the
    smallest any of them accepts, so that every request fits every server."""
    if not found:
        raise ClientConfigError(f"model '{model}': no server serves it")
    first = found[0]
    smallest = first.max_batch_size
    for other in found[1:]:
        if not first.same_tensors(other):
            raise ClientConfigError(
                f"model '{model}': {first.source} and {other.source} serve different tensors "
                f"({first.tensors_text()} vs {other.tensors_text()}); every server of a model "
                f"must serve the same tensors")
        smallest = min(smallest, other.max_batch_size)
    if smallest == first.max_batch_size:
        return first
    return ModelDescription(first.model, first.version, first.inputs, first.outputs, smallest,
                            first.source, first.extra)


_TRITON_DATATYPE = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int8": "INT8",
                    "int16": "INT16", "int32": "INT32", "int64": "INT64", "uint8": "UINT8",
                    "bool": "BOOL"}


# --- counters --------------------------------------------------------------------------------

class ClientStats:
    """Thread-safe counters of one client. ``requests`` counts every request sent (tries
    included), ``answers`` the successful ones (Triton clients); ``retries`` the repeats on
    the same server; ``failovers`` the moves to another server; ``failures`` the calls that
    ended in an error; ``outage_waits`` the requests that waited for a server to come back
    (``outage_wait_s`` in all), ``fallback_takeovers`` the local fallback server taking over
    from servers down past the outage budget.

    ``in_flight`` is a gauge, not in :meth:`snapshot` (so not in the job report): the
    requests (one per chunk of at most ``max_batch_size`` rows) sent or queued and neither
    answered nor failed yet; a request being retried or failed over stays in flight. Kept by
    :class:`Call`, for metrics exporters that read it while the job runs."""

    COUNTERS = ("calls", "requests", "answers", "retries", "failovers", "failures", "rows",
                "bytes_sent", "outage_waits", "fallback_takeovers")
    SECONDS = ("pack_s", "roundtrip_s", "outage_wait_s")

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, float] = {k: 0 for k in self.COUNTERS}
        self._values.update({k: 0.0 for k in self.SECONDS})
        self._in_flight = 0

    def add_in_flight(self, amount: int) -> None:
        with self._lock:
            self._in_flight += amount

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def add(self, **amounts: float) -> None:
        with self._lock:
            for key, amount in amounts.items():
                self._values[key] += amount

    def snapshot(self) -> dict:
        with self._lock:
            values = dict(self._values)
        requests = values["requests"] or 0
        values["mean_pack_ms"] = 1e3 * values["pack_s"] / requests if requests else 0.0
        values["mean_roundtrip_ms"] = 1e3 * values["roundtrip_s"] / requests if requests else 0.0
        return values


# --- one infer() call, possibly several requests ---------------------------------------------

def concatenate_parts(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The outputs of a call's chunks, rejoined in order (writeable arrays)."""
    if len(parts) == 1:
        return {n: a if a.flags.writeable else np.array(a) for n, a in parts[0].items()}
    return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}


class Call:
    """The requests of one ``infer`` call (one per chunk of at most ``max_batch_size`` rows):
    collects their outputs in order and calls ``done`` exactly once with ``assemble(parts)``
    (by default the parts concatenated)."""

    def __init__(self, client: SonicClient, done: Done, chunks: int,
                 assemble: Callable[[list], dict] = concatenate_parts):
        self.client = client
        self._done = done
        self._assemble = assemble
        self._parts: list[dict | None] = [None] * chunks
        self._left = chunks
        self._lock = threading.Lock()
        self.finished = False
        client.stats.add_in_flight(chunks)

    def part_done(self, index: int, outputs: dict[str, np.ndarray]) -> None:
        with self._lock:
            if self.finished:
                return
            self._parts[index] = outputs
            self._left -= 1
            self.client.stats.add_in_flight(-1)
            if self._left:
                return
            self.finished = True
        try:
            result = self._assemble(self._parts)
        except Exception as exc:                     # outputs that do not fit together
            self.client.stats.add(failures=1)
            self._finish(None, exc)
            return
        self._finish(result, None)

    def fail(self, error: BaseException) -> None:
        if not self.abandon():
            return
        self.client.stats.add(failures=1)
        self._finish(None, error)

    def abandon(self) -> bool:
        """Finish without ``done`` (its requests leave the in-flight count); False when the
        call had finished already."""
        with self._lock:
            if self.finished:
                return False
            self.finished = True
            left, self._left = self._left, 0
        self.client.stats.add_in_flight(-left)
        return True

    def _finish(self, outputs, error) -> None:
        try:
            self._done(outputs, error)
        except Exception:
            LOG.exception("model '%s': the done() callback raised", self.client.config.model)


Chunk = tuple[int, dict[str, np.ndarray]]           # (index, {input name: rows})


class SonicClient:
    """Base of the clients: configuration, description, validation, batching, counters."""

    kind = "base"

    def __init__(self, config: ClientConfig):
        if isinstance(config, Mapping):
            config = ClientConfig.from_dict(config)
        self.config = config
        self.stats = ClientStats()
        self.registry = None                   # set by the ServerRegistry that made it
        self._description: ModelDescription | None = None
        self._state_lock = threading.RLock()
        self._begun = False
        self._ended = False

    # lifecycle -----------------------------------------------------------------------------
    def begin_job(self) -> None:
        """Fetch the model's description (idempotent)."""
        with self._state_lock:
            if self._begun:
                return
            self._description = self._fetch_description()
            if self._description.max_batch_size <= 0:
                raise ClientConfigError(
                    f"model '{self.config.model}' ({self._description.source}) does not batch "
                    "(max_batch_size 0); SONIC clients need a model with a batch axis")
            self._begun = True
            self._ended = False
        if self.config.verbose:
            LOG.info("model '%s' from %s: %s; max_batch_size %d; mode %s", self.config.model,
                     self._description.source, self._description.tensors_text(),
                     self._description.max_batch_size, self.config.mode)

    def end_job(self) -> None:
        """Release the client's resources (idempotent); tells the registry that made it."""
        with self._state_lock:
            if self._ended:
                return
            self._ended = True
            self._begun = False
        try:
            self._close()
        finally:
            registry = self.registry
            if registry is not None:
                registry.release(self)

    def _close(self) -> None:
        """Subclasses free their threads and connections here."""

    # description ---------------------------------------------------------------------------
    @property
    def description(self) -> ModelDescription:
        if self._description is None:
            self.begin_job()
        return self._description

    def describe(self) -> dict:
        """``{"inputs": {name: (shape per row, dtype)}, "outputs": {...}, "max_batch_size": N,
        "model", "version", "source"}`` as the server (or the in-process model) reports them."""
        return self.description.as_dict()

    def _fetch_description(self) -> ModelDescription:
        raise NotImplementedError

    def _where(self) -> str:
        return self.description.source or self.kind

    # validation ----------------------------------------------------------------------------
    def validate(self, inputs: Mapping[str, tuple[Sequence[int], Any]]) -> None:
        """Check ``{name: (shape per row, dtype)}`` against the model; raise
        :class:`ClientConfigError` naming the model and the tensor on the first mismatch."""
        self._check_tensors({name: (tuple(int(d) for d in shape), np.dtype(dtype))
                             for name, (shape, dtype) in inputs.items()})

    def _check_tensors(self, given: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        desc = self.description
        model = f"model '{self.config.model}' ({self._where()})"
        expected = ", ".join(str(t) for t in desc.inputs.values())
        for name, (shape, dtype) in given.items():
            tensor = desc.inputs.get(name)
            if tensor is None:
                near = difflib.get_close_matches(name, list(desc.inputs), n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                raise ClientConfigError(f"{model}: '{name}' is not an input of the model{hint} "
                                        f"(its inputs: {expected})")
            if np.dtype(dtype) != np.dtype(tensor.dtype):
                raise ClientConfigError(
                    f"{model}: input '{name}' has dtype {np.dtype(dtype).name}, the model "
                    f"expects {np.dtype(tensor.dtype).name} (its inputs: {expected})")
            if not tensor.fits(shape):
                raise ClientConfigError(
                    f"{model}: input '{name}' has shape per row {_shape_text(shape)}, the model "
                    f"expects {_shape_text(tensor.shape)} (its inputs: {expected})")
        missing = [n for n in desc.inputs if n not in given]
        if missing:
            raise ClientConfigError(f"{model}: input '{missing[0]}' is missing (its inputs: "
                                    f"{expected})")

    # inference -----------------------------------------------------------------------------
    def check_inputs(self, inputs: Mapping[str, Any]) -> tuple[dict, int]:
        """``(inputs, rows)``: the inputs as ``infer`` takes them (arrays, or lists of entries
        for ragged inputs) and their rows (entries); raises :class:`ClientConfigError`, naming
        the model and the tensor (and the entry), when they do not fit the model."""
        model = f"model '{self.config.model}' ({self._where()})"
        if any(isinstance(v, (list, tuple)) for v in inputs.values()):
            entries = {}
            for name, value in inputs.items():
                if not isinstance(value, (list, tuple)):
                    raise ClientConfigError(f"{model}: input '{name}' is one array while other "
                                            "inputs are lists of entries; give every input as "
                                            "a list of entries, or every input as one array")
                entries[name] = [np.asarray(v) for v in value]
            counts = {n: len(v) for n, v in entries.items()}
            if len(set(counts.values())) > 1:
                raise ClientConfigError(f"{model}: inputs have different numbers of entries "
                                        f"{counts}")
            seen = set()
            for i in range(next(iter(counts.values()), 0)):
                shapes = tuple((entries[n][i].shape, entries[n][i].dtype) for n in entries)
                if shapes not in seen:
                    seen.add(shapes)
                    try:
                        self._check_tensors({n: (entries[n][i].shape, entries[n][i].dtype)
                                             for n in entries})
                    except ClientConfigError as exc:
                        raise ClientConfigError(f"{exc} [entry {i}]") from None
            return entries, next(iter(counts.values()), 0)
        arrays = {}
        for name, value in inputs.items():
            if not isinstance(value, np.ndarray):
                value = np.asarray(value)
            if value.ndim == 0:
                raise ClientConfigError(f"{model}: input '{name}' has no batch axis (a scalar)")
            arrays[name] = value
        self._check_tensors({n: (a.shape[1:], a.dtype) for n, a in arrays.items()})
        batches = {n: a.shape[0] for n, a in arrays.items()}
        if len(set(batches.values())) > 1:
            raise ClientConfigError(f"model '{self.config.model}': inputs have different batch "
                                    f"sizes {batches}")
        return arrays, next(iter(batches.values()), 0)

    def infer(self, inputs: Mapping[str, np.ndarray], done: Done, *, events: int = 1) -> None:
        """Run the model on ``inputs`` (batch first); ``done(outputs, error)`` once, from any
        thread. Returns at once in async and pseudo-async modes; in sync mode calls ``done``
        before returning. Inputs that do not fit the model raise :class:`ClientConfigError`.
        ``events``: how many events' inputs this call carries (an
        :class:`~recorun.sonic_clients.batching.EventBatcher`'s batch); the ``calls`` counter
        counts events, so that figures per call stay per event."""
        if self._ended:
            raise SonicError(f"model '{self.config.model}': infer() after end_job()")
        inputs, rows = self.check_inputs(inputs)
        self.stats.add(calls=events, rows=rows)
        if any(isinstance(v, list) for v in inputs.values()):
            self._infer_ragged(inputs, rows, done)
            return
        desc = self.description
        if rows == 0:
            empty = {n: np.empty((0, *(max(d, 0) for d in t.shape)), dtype=t.dtype)
                     for n, t in desc.outputs.items()}
            done(empty, None)
            return
        step = desc.max_batch_size
        chunks = [(i, {n: a[start:start + step] for n, a in inputs.items()})
                  for i, start in enumerate(range(0, rows, step))]
        call = Call(self, done, len(chunks))
        try:
            self._submit(call, chunks)
        except BaseException:
            call.abandon()
            raise

    def _infer_ragged(self, entries: dict[str, list[np.ndarray]], total: int,
                      done: Done) -> None:
        """``infer`` for lists of entries (see the module docstring), checked: one group of
        requests per distinct set of shapes; the outputs split back into one array per
        entry."""
        groups: dict[tuple, list[int]] = {}
        for i in range(total):
            groups.setdefault(tuple(entries[n][i].shape for n in entries), []).append(i)
        if total == 0:
            done({n: [] for n in self.description.outputs}, None)
            return
        step = self.description.max_batch_size
        chunks, rows_of_chunk = [], []
        for members in groups.values():
            for start in range(0, len(members), step):
                rows = members[start:start + step]
                chunks.append((len(chunks), {n: np.stack([entries[n][i] for i in rows])
                                             for n in entries}))
                rows_of_chunk.append(rows)

        def assemble(parts):
            out = {}
            for name in parts[0]:
                per_entry = [None] * total
                for rows, part in zip(rows_of_chunk, parts):
                    for k, i in enumerate(rows):
                        per_entry[i] = np.array(part[name][k])
                out[name] = per_entry
            return out

        call = Call(self, done, len(chunks), assemble)
        try:
            self._submit(call, chunks)
        except BaseException:
            call.abandon()
            raise

    def _submit(self, call: Call, chunks: list[Chunk]) -> None:
        raise NotImplementedError

    def infer_blocking(self, inputs: Mapping[str, np.ndarray],
                       timeout: float | None = None) -> dict[str, np.ndarray]:
        """Convenience for scripts and tests: ``infer`` and wait; raises the error."""
        finished = threading.Event()
        box: dict = {}

        def done(outputs, error):
            box["outputs"], box["error"] = outputs, error
            finished.set()

        self.infer(inputs, done)
        if not finished.wait(timeout):
            raise TimeoutError(f"model '{self.config.model}': no answer within {timeout} s")
        if box["error"] is not None:
            raise box["error"]
        return box["outputs"]

    # counters ------------------------------------------------------------------------------
    def timing(self) -> dict:
        """Counters and seconds: calls, requests, answers, retries, failovers, failures, rows,
        bytes_sent, pack_s, roundtrip_s, mean_pack_ms, mean_roundtrip_ms."""
        values = self.stats.snapshot()
        values.update(model=self.config.model, mode=self.config.mode, client=self.kind)
        return values

    def answered_by(self) -> list[dict]:
        """The servers that answered this client's requests, for the provenance of the
        products made with them: ``[{"name", "address", "requests", "version"}]``
        (``requests``: answered ones; ``version``: the model version the answer named, empty
        when unknown). Thread-safe; it keeps its value after ``end_job``."""
        return []

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.config.model!r}, "
                f"mode={self.config.mode!r})")


def now() -> float:
    return time.perf_counter()


def shutdown_pool(pool) -> None:
    """Shut a client's thread pool down, waiting for its work unless called from one of its
    own threads (a ``done`` callback that ends the client must not wait for itself)."""
    if pool is None:
        return
    own = threading.current_thread() in getattr(pool, "_threads", ())
    pool.shutdown(wait=not own)
