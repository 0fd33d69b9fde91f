"""A real Triton server (nvidia-pytriton) with one test model whose input has a variable axis.

``particle_sums``: input ``particles`` [-1, 4] FP32 (a variable number of 4-vectors per row),
output ``sums`` [4] FP32 (their sum) and ``counts`` [1] INT32 (how many there were); batching
on, ``max_batch_size`` 4. recorun's own models have fixed shapes, so the ragged-input tests of
the SONIC clients run against this one. Prints ``READY grpc=... http=... metrics=...`` as
recorun-server does and stops cleanly on SIGTERM/SIGINT.

    python tests/servers/ragged_model_server.py
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from recorun.server.export import environment
from recorun.server.serve import _libpython_path, free_ports


def particle_sums(particles: np.ndarray) -> dict[str, np.ndarray]:
    return {"sums": particles.sum(axis=1, dtype=np.float32),
            "counts": np.full((len(particles), 1), particles.shape[1], dtype=np.int32)}


def main() -> int:
    ready = os.fdopen(os.dup(1), "w")       # stdout is for the READY line only:
    os.dup2(2, 1)                            # tritonserver's log goes to stderr
    with tempfile.TemporaryDirectory(prefix="recorun-ragged-server-") as home:
        os.environ["PYTRITON_HOME"] = home
        from pytriton.decorators import batch
        from pytriton.model_config import ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

        grpc_port, http_port, metrics_port = free_ports("127.0.0.1", 3)
        config = TritonConfig(http_address="127.0.0.1", http_port=http_port,
                              grpc_address="127.0.0.1", grpc_port=grpc_port,
                              metrics_address="127.0.0.1", metrics_port=metrics_port,
                              allow_cpu_metrics=True, allow_gpu_metrics=False)
        security = TritonSecurityConfig(restricted_endpoints=[
            "model-repository", "shared-memory", "trace", "logging"])
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        with environment(LD_LIBRARY_PATH=_libpython_path()), Triton(
                config=config, workspace=Path(home) / "workspace",
                security_config=security) as triton:
            triton.bind(model_name="particle_sums", infer_func=batch(particle_sums),
                        inputs=[Tensor(name="particles", dtype=np.float32, shape=(-1, 4))],
                        outputs=[Tensor(name="sums", dtype=np.float32, shape=(4,)),
                                 Tensor(name="counts", dtype=np.int32, shape=(1,))],
                        config=ModelConfig(batching=True, max_batch_size=4), strict=True)
            print(f"READY grpc=127.0.0.1:{grpc_port} http=127.0.0.1:{http_port} "
                  f"metrics=127.0.0.1:{metrics_port}", file=ready, flush=True)
            stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
