"""The three models' inference throughput in-process on one device (a GPU where there is one).

What a Triton server does with a GPU, without the server: needs only torch and numpy, and
``server/models.py`` / ``server/weights.py``, so it runs on a GPU machine that has no Triton.

For each model at the paper's per-event batch (FACILE 16000 channels, DeepCalo 5 electrons,
ResNet-50 10 jet images):

1. **requesters**: 1, 2, 4, 8 threads, each sending one event's batch after the other for
   ``--seconds``; events/s (requests/s: what the paper calls inferences/s) and rows/s
   (channels, electrons, images per second) over all of them (CUDA kernels release the GIL,
   so the threads overlap as a server's model instances would);
2. **merged**: the same requesters put their events in a queue; one worker merges up to
   ``--merge`` events' requests into one batch per forward pass, as Triton's dynamic batching
   does; events/s per merge size.

The paper's figures for comparison (section 5), where one inference is one event's batch:
FACILE 500 inferences/s at batch 16000 on a V100; DeepCalo 680 events/s at batch 5, 9800 with
dynamic batching; ResNet-50 25 inferences/s at batch 10 on a T4.

    python benchmarks/gpu_models.py [--device cuda] [--seconds 5] [--requesters 1,2,4,8]
                                    [--merge 1,8,32,100] [--models facile,deepcalo,resnet50]

Runs in about ``models x (requesters + merges) x seconds`` plus warm-up: under 8 minutes with
the defaults. The last line printed is one line of JSON with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time

import torch


def _recorun_from_this_tree() -> None:
    """Make ``recorun.server`` importable where recorun is not installed: a GPU machine gets
    the working tree and torch only. ``recorun`` is then this tree's ``recorun/`` with the
    tree's folders as its subpackages, as an install maps them."""
    try:
        import recorun.server  # noqa: F401  (importable: nothing to do)
        return
    except ImportError:
        pass
    import importlib.util
    from pathlib import Path

    tree = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "recorun", tree / "recorun" / "__init__.py",
        submodule_search_locations=[str(tree / "recorun"), str(tree)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["recorun"] = package
    spec.loader.exec_module(package)


_recorun_from_this_tree()

from recorun.model_specs import SPECS  # noqa: E402
from recorun.server.weights import load_model, origin  # noqa: E402


PAPER = {"facile": "500 events/s (batch 16000) on one V100",
         "deepcalo": "680 events/s (batch 5) on one V100; 9800 with dynamic batching",
         "resnet50": "25 events/s (batch 10) on one T4"}


def make_batch(name: str, events: int, device: torch.device) -> torch.Tensor:
    spec = SPECS[name]
    shape = spec.inputs[0].shape
    generator = torch.Generator().manual_seed(1)
    return torch.rand((spec.event_batch * events, *shape), generator=generator).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_requesters(model, batch: torch.Tensor, requesters: int, seconds: float,
                   device: torch.device) -> float:
    """Events per second served by ``requesters`` threads sending one event at a time for
    about ``seconds`` (the calls in progress at the end are waited for and counted)."""
    done = [0] * requesters
    start = time.perf_counter()
    stop = start + seconds

    def requester(i: int) -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.no_grad(), (torch.cuda.stream(stream) if stream else _nullcontext()):
            while time.perf_counter() < stop:
                model(batch)
                if stream is not None:
                    stream.synchronize()
                done[i] += 1

    threads = [threading.Thread(target=requester, args=(i,)) for i in range(requesters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_merged(model, event_input: torch.Tensor, requesters: int, merge: int, seconds: float,
               device: torch.device) -> float:
    """Events per second when one worker merges up to ``merge`` queued events per forward
    pass, for about ``seconds`` (the queue is drained at the end and counted)."""
    pending: queue.Queue = queue.Queue()
    start = time.perf_counter()
    stop = start + seconds
    served = [0]

    def requester() -> None:
        while time.perf_counter() < stop:
            reply = threading.Event()
            pending.put(reply)
            reply.wait()

    def worker() -> None:
        with torch.no_grad():
            while time.perf_counter() < stop or not pending.empty():
                try:
                    replies = [pending.get(timeout=0.05)]
                except queue.Empty:
                    continue
                while len(replies) < merge:
                    try:
                        replies.append(pending.get_nowait())
                    except queue.Empty:
                        break
                model(event_input.repeat(len(replies), *[1] * (event_input.dim() - 1)))
                synchronize(device)
                served[0] += len(replies)
                for reply in replies:
                    reply.set()

    threads = [threading.Thread(target=requester) for _ in range(requesters)]
    server = threading.Thread(target=worker)
    server.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.join()
    return served[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="facile,deepcalo,resnet50")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--requesters", default="1,2,4,8")
    parser.add_argument("--merge", default="1,8,32,100")
    parser.add_argument("--merge-requesters", type=int, default=128,
                        help="requesters feeding the merging worker")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"device {device} ({gpu}), torch {torch.__version__}, python {sys.version.split()[0]}")
    results = {"device": str(device), "gpu": gpu, "torch": torch.__version__, "models": {}}
    for name in args.models.split(","):
        spec = SPECS[name]
        model = load_model(name).to(device)
        batch = make_batch(name, 1, device)
        with torch.no_grad():                                   # warm-up
            for _ in range(3):
                model(batch)
        synchronize(device)
        entry = {"event_batch": spec.event_batch, "weights": origin(name),
                 "requesters": {}, "merged": {}}
        print(f"\n{name}: batch {spec.event_batch} per event (one request, one 'inference' "
              f"in the paper's words); weights {origin(name)}")
        print(f"  paper: {PAPER[name]}")
        print(f"  {'requesters':>10} {'events/s':>10} {'rows/s':>13}")
        for n in map(int, args.requesters.split(",")):
            rate = run_requesters(model, batch, n, args.seconds, device)
            entry["requesters"][n] = {"events_per_s": rate, "rows_per_s": rate * spec.event_batch}
            print(f"  {n:>10} {rate:>10.1f} {rate * spec.event_batch:>13.0f}")
        print(f"  {'merge':>10} {'events/s':>10} {'rows/s':>13}  "
              f"({args.merge_requesters} requesters, one merging worker)")
        for merge in map(int, args.merge.split(",")):
            if merge * spec.event_batch > spec.max_batch_size:
                continue
            rate = run_merged(model, batch, args.merge_requesters, merge, args.seconds, device)
            entry["merged"][merge] = {"events_per_s": rate, "rows_per_s": rate * spec.event_batch}
            print(f"  {merge:>10} {rate:>10.1f} {rate * spec.event_batch:>13.0f}")
        results["models"][name] = entry
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
