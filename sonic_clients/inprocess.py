"""In-process inference (the paper's "direct connection" baseline) behind the same contract.

:class:`InProcessClient` runs one of recorun's models (:data:`recorun.model_specs.SPECS`) with its
trained weights inside the job's process, through :func:`recorun.server.runtime.load_runner`,
the one place where the job side loads the server's code (the ``server`` extra: torch and
onnxruntime; a missing one is a configuration error naming it):

* ``backend: onnxruntime`` (default): the model is exported to ONNX at begin_job
  (:func:`recorun.server.export.export_onnx`, into a temporary directory removed as soon as the session
  is made) and run by :class:`recorun.server.serve.OnnxRunner` (one intra-op thread per call, no
  spinning: concurrent calls from several streams run side by side);
* ``backend: torch``: eager torch in ``inference_mode`` (:class:`recorun.server.serve.TorchRunner`).

The runner of a (model, backend) is made once per process and shared by every client (both
runners are safe to call from several threads). ``describe()`` gives the model's tensors and
the spec's ``max_batch_size``; larger batches are split like on a server. ``sync`` runs in the
caller's thread; ``async`` and ``pseudo-async`` on the client's own one-thread pool.
``timeout_s``, ``tries`` and ``compression`` have no meaning here and are ignored.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from recorun.framework.extras import check

from .base import (
    Call,
    Chunk,
    ClientConfig,
    ModelDescription,
    SonicClient,
    SonicError,
    description_from_spec,
    now,
    shutdown_pool,
)

_RUNNERS: dict[tuple[str, str], object] = {}
_RUNNERS_LOCK = threading.Lock()
_LOADING: dict[tuple[str, str], threading.Lock] = {}


def _make_runner(model: str, backend: str):
    user = f"in-process inference (client: inprocess, backend: {backend})"
    check({"torch": "recorun[server]"}, user)
    if backend == "onnxruntime":
        check({"onnxruntime": "recorun[server]", "onnx": "recorun[server]",
               "onnxscript": "recorun[server]"}, user)
    from recorun.server.runtime import load_runner

    return load_runner(model, backend)


def runner_for(model: str, backend: str):
    """The process-wide runner of ``model`` on ``backend`` (made on first use)."""
    key = (model, backend)
    with _RUNNERS_LOCK:
        if key in _RUNNERS:
            return _RUNNERS[key]
        loading = _LOADING.setdefault(key, threading.Lock())
    with loading:                      # one export per key, other keys load in parallel
        with _RUNNERS_LOCK:
            if key in _RUNNERS:
                return _RUNNERS[key]
        runner = _make_runner(model, backend)
        with _RUNNERS_LOCK:
            _RUNNERS[key] = runner
        return runner


class InProcessClient(SonicClient):
    """Runs the model in this process; same ``describe``/``validate``/``infer`` contract."""

    kind = "inprocess"

    def __init__(self, config: ClientConfig):
        super().__init__(config)
        self._runner = None
        self._pool: ThreadPoolExecutor | None = None

    def _fetch_description(self) -> ModelDescription:
        desc = description_from_spec(
            self.config.model, self.config.version,
            source=f"in-process {self.config.backend}")
        if len(desc.inputs) != 1 or len(desc.outputs) != 1:
            raise SonicError(f"model '{self.config.model}': the in-process client runs models "
                             "with one input and one output")
        self._runner = runner_for(self.config.model, self.config.backend)
        return desc

    def begin_job(self) -> None:
        super().begin_job()
        if self.config.mode != "sync" and self._pool is None:
            self._pool = ThreadPoolExecutor(
                1, thread_name_prefix=f"sonic-{self.config.model}-inprocess")

    def _run(self, call: Call, chunks: list[Chunk]) -> None:
        desc = self.description
        (output,) = desc.outputs
        for index, arrays in chunks:
            if call.finished:
                return
            try:
                start = now()
                (x,) = arrays.values()
                x = np.ascontiguousarray(x)
                packed = now()
                y = self._runner(x)
                self.stats.add(requests=1, bytes_sent=x.nbytes, pack_s=packed - start,
                               roundtrip_s=now() - packed)
            except Exception as exc:
                call.fail(SonicError(f"model '{self.config.model}' (in-process "
                                     f"{self.config.backend}) failed: {type(exc).__name__}: "
                                     f"{exc}"))
                return
            call.part_done(index, {output: y})

    def _submit(self, call: Call, chunks: list[Chunk]) -> None:
        if self.config.mode == "sync":
            self._run(call, chunks)
            return
        if self._pool is None:
            raise SonicError(f"model '{self.config.model}': client used after end_job()")
        self._pool.submit(self._run, call, chunks)

    def answered_by(self) -> list[dict]:
        """This process, as the one "server" that answered (no address): its requests
        (answered ones)."""
        requests = int(self.stats.snapshot()["requests"])
        if not requests:
            return []
        return [{"name": f"in-process {self.config.backend}", "address": "",
                 "requests": requests, "version": self.config.version}]

    def _close(self) -> None:
        shutdown_pool(self._pool)
        self._pool = None
