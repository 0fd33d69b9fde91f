"""``recorun-bench load``: an open-loop load generator for one model of a Triton server.

Requests are sent at a fixed offered rate whatever the server answers: their send times are
drawn in advance (Poisson inter-arrival times from a seeded generator, or constant ones), and
each is sent with ``tritonclient.grpc``'s ``async_infer``, so that requests overlap when the
server is slower than the rate. Inputs are a small pool of real request batches, built from a
sample file by the same input builders as the SONIC producers (FACILE: one event's HCAL digis
through :func:`recorun.data.hcal.facile_inputs`; DeepCalo: one event's electron images;
ResNet-50: one event's jet images, anti-kt jets as ``workflow_resnet50.yaml`` makes them),
cycled through.

Per rate: the offered rate; the schedule's own rate (Poisson: near the offered one); the rate
actually sent, over the time sending took (lower when the generator itself falls behind its
schedule, as ``send_lag_ms_p99``, send time minus scheduled time, shows); the achieved
throughput (successful answers per second, from the first send to the last answer); the
latency from send to answer (p50, p90, p99, mean, ms); errors; requests sent and answered;
requests still outstanding at the end (``lagging``: not answered within ``--drain`` seconds
after the last send; they are cancelled); and whether the server kept up: achieved >= 0.95 x
the schedule's rate, nothing lagging or dropped, no errors, and the median latency of the
last quarter of the requests at most twice that of the first quarter plus 5 ms (else it is
growing without bound). With ``--concurrency-limit N`` a request that is due while N are
outstanding is not sent (``dropped``); the schedule is not shifted.
"""
from __future__ import annotations

import math
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recorun.sonic_clients.base import SonicError

from .runs import BadArgument, StudyError, server

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "data" / "samples"
#: the sample each model's inputs come from by default
DEFAULT_SAMPLES = {"facile": SAMPLES / "hlt_sample.root",
                   "deepcalo": SAMPLES / "hlt_sample.root",
                   "resnet50": SAMPLES / "jets_sample.root"}
#: events read from the sample (one request batch each, at most ``--pool`` kept)
READ_EVENTS = 32
KEPT_UP_FRACTION = 0.95


def parse_rates(text: str) -> list[float]:
    """``"50,100"`` -> ``[50.0, 100.0]`` (requests per second, each > 0)."""
    try:
        rates = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadArgument(f"--rate: expected comma-separated numbers, got {text!r}") from None
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise BadArgument(f"--rate: every rate must be > 0 (requests/s), got {text!r}")
    return rates


# --- inputs ----------------------------------------------------------------------------------

def _events(path: Path, prefixes: tuple[str, ...], count: int):
    """The first ``count`` events of the sample's branches starting with ``prefixes``, as an
    awkward array (inner shapes of flattened branches restored)."""
    import awkward as ak
    import uproot

    from recorun.data.layout import read_shapes, restore_inner

    try:
        file = uproot.open(path)
    except Exception as exc:                                  # noqa: BLE001
        raise BadArgument(f"--sample {path}: cannot be read as a ROOT file ({exc})") from None
    with file:
        trees = [k for k, kind in file.classnames().items() if kind == "TTree"]
        if not trees:
            raise BadArgument(f"--sample {path}: no TTree in the file")
        tree = file[trees[0]]
        names = [b for b in tree.keys() if b.startswith(prefixes)]
        if not names:
            raise BadArgument(f"--sample {path}: no branch {'* or '.join(prefixes)}*")
        arrays = tree.arrays(names, entry_stop=count)
        shapes = read_shapes(file)
    fields = {}
    for name in names:
        column = arrays[name]
        if name in shapes:
            column = restore_inner(column, shapes[name])
        fields[name] = column
    return ak.Array(fields)


def _facile(path: Path) -> list[dict]:
    from recorun.data.hcal import facile_inputs

    events = _events(path, ("HcalDigi_",), READ_EVENTS)
    out = []
    for event in events:
        digis = {name[len("HcalDigi_"):]: np.asarray(event[name]) for name in events.fields}
        matrix = facile_inputs(digis)
        if len(matrix):
            out.append({"hcal_channels": matrix})
    return out


def _deepcalo(path: Path) -> list[dict]:
    events = _events(path, ("Electron_image",), READ_EVENTS)
    out = []
    for images in events["Electron_image"]:
        images = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
        if len(images):
            out.append({"electron_images": images.reshape(-1, 4, 56, 11)})
    return out


def _resnet50(path: Path) -> list[dict]:
    import awkward as ak

    from recorun.modules.jets import cluster_antikt, jet_images

    events = _events(path, ("Particle_",), READ_EVENTS)
    particles = ak.zip({name[len("Particle_"):]: events[name] for name in events.fields})
    out = []
    for event in particles[:8]:                # clustering and imaging take a while per event
        jets, constituents = cluster_antikt(event, 0.8, 1.0)
        images = jet_images(jets, constituents, max_jets=10, min_pt=1.0)
        if len(images):
            out.append({"jet_images": images})
    return out


BUILDERS = {"facile": _facile, "deepcalo": _deepcalo, "resnet50": _resnet50}


def input_pool(model: str, sample: Path | None, size: int) -> list[dict]:
    """Up to ``size`` request batches for ``model``: a ``.npy``/``.npz`` file holds one batch
    (``.npz``: one array per input name); a ROOT file is read by the model's builder."""
    from recorun.model_specs import SPECS

    path = Path(sample) if sample else DEFAULT_SAMPLES[model]
    if not path.is_file():
        raise BadArgument(f"--sample {path}: no such file")
    spec = SPECS[model]
    if path.suffix in (".npy", ".npz"):
        loaded = np.load(path)
        arrays = ({k: loaded[k] for k in loaded.files} if path.suffix == ".npz"
                  else {spec.inputs[0].name: loaded})
        pool = [arrays]
    else:
        pool = BUILDERS[model](path)
    if not pool:
        raise BadArgument(f"--sample {path}: no {model} inputs in it")
    for batch in pool:
        for tensor in spec.inputs:
            array = batch.get(tensor.name)
            if array is None or tuple(array.shape[1:]) != tensor.shape:
                raise BadArgument(f"--sample {path}: {model} needs input {tensor.name} of "
                                  f"shape (n, {', '.join(map(str, tensor.shape))})")
            batch[tensor.name] = np.ascontiguousarray(array, dtype=np.float32)
    return pool[:size]


# --- one rate --------------------------------------------------------------------------------

def schedule(rate: float, duration_s: float, arrivals: str, seed: int) -> np.ndarray:
    """Send times (s from the start) of the requests of one run."""
    if arrivals == "constant":
        return np.arange(0.0, duration_s, 1.0 / rate)
    rng = np.random.default_rng(seed)
    expected = rate * duration_s
    times = np.cumsum(rng.exponential(1.0 / rate, int(expected + 10 * math.sqrt(expected) + 20)))
    while times[-1] < duration_s:               # (essentially never) more needed
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate,
                                                                                 len(times)))])
    return times[times < duration_s]


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) by linear interpolation; 0.0 when there are no values."""
    if not sorted_values:
        return 0.0
    return float(np.percentile(np.asarray(sorted_values), 100.0 * q))


@dataclass
class _Request:
    scheduled: float
    sent: float = 0.0
    answered: float = 0.0
    ok: bool = False
    done: bool = False
    context: object = None


def make_inputs(pool: list[dict]) -> list[list]:
    """tritonclient InferInput lists, one per pool batch (serialized once, reused)."""
    import tritonclient.grpc as grpcclient

    out = []
    for batch in pool:
        inputs = []
        for name, array in batch.items():
            item = grpcclient.InferInput(name, list(array.shape), "FP32")
            item.set_data_from_numpy(array)
            inputs.append(item)
        out.append(inputs)
    return out


def run_rate(address: str, model: str, inputs: list[list], rate: float, duration_s: float,
             arrivals: str, seed: int, concurrency_limit: int = 0,
             drain_s: float = 5.0, stop: threading.Event | None = None) -> dict:
    """Offer ``rate`` requests/s for ``duration_s`` and measure what comes back; ``stop``
    set (Ctrl-C) ends the sending and the waiting early."""
    import tritonclient.grpc as grpcclient

    stop = stop or threading.Event()

    client = grpcclient.InferenceServerClient(address)
    times = schedule(rate, duration_s, arrivals, seed)
    requests = [_Request(float(t)) for t in times]
    lock = threading.Lock()
    outstanding = [0]
    all_done = threading.Event()
    finished_sending = threading.Event()
    errors: list[str] = []
    dropped = 0

    def callback(request: _Request):
        def done(result, error):
            now = time.perf_counter()
            with lock:
                request.answered, request.done = now, True
                request.ok = error is None
                if error is not None and len(errors) < 5:
                    errors.append(str(error).splitlines()[0][:200])
                outstanding[0] -= 1
                if outstanding[0] == 0 and finished_sending.is_set():
                    all_done.set()
        return done

    start = time.perf_counter() + 0.05
    try:
        for i, request in enumerate(requests):
            due = start + request.scheduled
            wait = due - time.perf_counter()
            if wait > 0 and stop.wait(wait) or stop.is_set():
                break
            with lock:
                if concurrency_limit and outstanding[0] >= concurrency_limit:
                    dropped += 1
                    request.done = True
                    continue
                outstanding[0] += 1
            request.sent = time.perf_counter()
            try:
                request.context = client.async_infer(model, inputs[i % len(inputs)],
                                                     callback(request))
            except Exception as exc:                          # noqa: BLE001
                with lock:
                    outstanding[0] -= 1
                    request.done, request.answered = True, time.perf_counter()
                    if len(errors) < 5:
                        errors.append(str(exc).splitlines()[0][:200])
        send_end = time.perf_counter()
        with lock:
            finished_sending.set()
            if outstanding[0] == 0:
                all_done.set()
        drain_end = time.perf_counter() + drain_s
        while not stop.is_set() and not all_done.wait(min(0.1, max(0.0, drain_end
                                                                   - time.perf_counter()))):
            if time.perf_counter() >= drain_end:
                break
        end = time.perf_counter()
        with lock:
            lagging = [r for r in requests if r.sent and not r.done]
            snapshot = [(r.scheduled, r.sent, r.answered, r.ok) for r in requests
                        if r.sent and r.done]
        for request in lagging:
            if request.context is not None:
                request.context.cancel()
    finally:
        client.close()

    sent = sum(1 for r in requests if r.sent)
    answered = [(s, a, ok) for _, s, a, ok in snapshot]
    ok = sorted(((s, a) for s, a, good in answered if good), key=lambda x: x[0])
    latencies = sorted(1e3 * (a - s) for s, a in ok)
    last_answer = max((a for _, a in ok), default=send_end)
    elapsed = max(duration_s, (last_answer if not lagging else end) - start)
    achieved = len(ok) / elapsed
    scheduled_hz = len(requests) / duration_s      # the schedule's own rate (Poisson: ~rate)
    sent_hz = sent / max(duration_s, send_end - start)
    lags = sorted(1e3 * (s - start - t) for t, s, _, _ in snapshot) or [0.0]
    quarter = max(1, len(ok) // 4)
    first = statistics.median(1e3 * (a - s) for s, a in ok[:quarter]) if ok else 0.0
    last = statistics.median(1e3 * (a - s) for s, a in ok[-quarter:]) if ok else 0.0
    growing = last > 2.0 * first + 5.0
    n_errors = sum(1 for _, _, good in answered if not good)
    kept_up = (bool(ok) and achieved >= KEPT_UP_FRACTION * scheduled_hz and not lagging
               and not dropped and not growing and n_errors == 0)
    return {
        "offered_hz": rate, "scheduled_hz": scheduled_hz, "sent_hz": sent_hz,
        "achieved_hz": achieved,
        "duration_s": duration_s, "elapsed_s": elapsed, "arrivals": arrivals,
        "scheduled": len(requests), "sent": sent, "answered": len(ok), "errors": n_errors,
        "error_messages": errors, "dropped": dropped, "lagging": len(lagging),
        "latency_ms_p50": percentile(latencies, 0.50),
        "latency_ms_p90": percentile(latencies, 0.90),
        "latency_ms_p99": percentile(latencies, 0.99),
        "latency_ms_mean": statistics.fmean(latencies) if latencies else 0.0,
        "latency_ms_max": latencies[-1] if latencies else 0.0,
        "latency_ms_first_quarter_median": first, "latency_ms_last_quarter_median": last,
        "latency_growing": growing,
        "send_lag_ms_p99": percentile(lags, 0.99),
        "kept_up": kept_up,
    }


# --- the study -------------------------------------------------------------------------------

def check_server(address: str, model: str, timeout_s: float = 10.0) -> None:
    """BadArgument unless ``address`` is a live Triton server with ``model`` ready."""
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(address)
    except Exception as exc:                                  # noqa: BLE001
        raise BadArgument(f"--server {address}: {exc}") from None
    try:
        try:
            live = client.is_server_live(client_timeout=timeout_s)
        except Exception as exc:                              # noqa: BLE001
            raise BadArgument(f"--server {address}: no Triton server reachable there "
                              f"({str(exc).splitlines()[0][:200]})") from None
        if not live:
            raise BadArgument(f"--server {address}: the server is not live")
        try:
            ready = client.is_model_ready(model, client_timeout=timeout_s)
        except Exception:                                     # noqa: BLE001
            ready = False
        if not ready:
            raise BadArgument(f"--server {address}: model '{model}' is not ready there")
    finally:
        client.close()


def warm_up(address: str, model: str, inputs: list[list], count: int = 5) -> None:
    """A few synchronous requests: the server's first inferences are slow. Also the barrier
    between rates: it is answered after whatever the server still had queued."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    try:
        for i in range(count):
            client.infer(model, inputs[i % len(inputs)], client_timeout=120)
    except Exception as exc:                                  # noqa: BLE001
        raise StudyError(f"{model} on {address}: a warm-up request failed: "
                         f"{str(exc).splitlines()[0][:300]}") from None
    finally:
        client.close()


def _table_row(p: dict) -> str:
    return (f"  {p['offered_hz']:>8.1f} {p['sent_hz']:>8.1f} {p['achieved_hz']:>9.1f} "
            f"{p['latency_ms_p50']:>8.2f} {p['latency_ms_p90']:>8.2f} {p['latency_ms_p99']:>8.2f} "
            f"{p['latency_ms_mean']:>8.2f} {p['sent']:>6} {p['answered']:>6} {p['errors']:>4} "
            f"{p['dropped']:>5} {p['lagging']:>5} {p['send_lag_ms_p99']:>8.1f}  "
            f"{'yes' if p['kept_up'] else 'NO'}")


HEADER = ("   offered     sent  achieved      p50      p90      p99     mean   sent answrd  err "
          " drop   lag send lag  kept up\n"
          "     req/s    req/s   answ./s       ms       ms       ms       ms"
          "                                 p99 ms")


def scan(model: str, args, pool: list[dict], sample: str, points: list[dict]) -> None:
    """Run every rate of ``args.rate`` against the server (a local one started and stopped
    here unless ``args.server``), appending each rate's figures to ``points``."""
    batch = [len(next(iter(b.values()))) for b in pool]
    request_bytes = statistics.fmean(sum(a.nbytes for a in b.values()) for b in pool)
    with server([model], [args.server] if args.server else [], args.server_options) as servers:
        address = servers[0]
        # from here Ctrl-C sets a flag that the send loop checks (an exception raised inside a
        # gRPC call can leave its channel unable to close); the server is stopped on the way out
        stop = threading.Event()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            inputs = make_inputs(pool)
            warm_up(address, model, inputs)
            print(f"open-loop load on {model} at {address}: {args.arrivals} arrivals, "
                  f"{args.duration:g} s per rate, {len(pool)} input batches of {min(batch)}-"
                  f"{max(batch)} (mean {request_bytes / 1e3:.0f} kB) from {sample}", flush=True)
            print(HEADER, flush=True)
            for k, rate in enumerate(parse_rates(args.rate)):
                if stop.is_set():
                    raise KeyboardInterrupt
                point = run_rate(address, model, inputs, rate, args.duration, args.arrivals,
                                 args.seed + k, args.concurrency_limit, args.drain, stop)
                if stop.is_set():
                    raise KeyboardInterrupt
                points.append(point)
                print(_table_row(point), flush=True)
                if point["error_messages"]:
                    print(f"    first error: {point['error_messages'][0]}", flush=True)
                warm_up(address, model, inputs, count=1)      # let anything queued finish
            if stop.is_set():
                raise KeyboardInterrupt
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


def study_load(args) -> dict:
    from recorun.model_specs import SPECS

    model = args.model.strip().lower()
    if model not in SPECS:
        raise BadArgument(f"--model: unknown model '{args.model}' (models: "
                          f"{', '.join(SPECS)})")
    rates = parse_rates(args.rate)
    if not args.duration > 0:
        raise BadArgument(f"--duration must be > 0 seconds, got {args.duration}")
    if args.concurrency_limit < 0:
        raise BadArgument(f"--concurrency-limit must be >= 0, got {args.concurrency_limit}")
    if args.pool < 1:
        raise BadArgument(f"--pool must be >= 1, got {args.pool}")
    if args.server:
        check_server(args.server, model)
    pool = input_pool(model, args.sample, args.pool)
    sample = str(args.sample or DEFAULT_SAMPLES[model])
    batch = [len(next(iter(b.values()))) for b in pool]
    request_bytes = statistics.fmean(sum(a.nbytes for a in b.values()) for b in pool)
    points: list[dict] = []
    try:
        scan(model, args, pool, sample, points)
    except KeyboardInterrupt:
        error = StudyError(f"interrupted after {len(points)} of {len(rates)} rate(s)")
        error.exit_code = 130
        raise error from None
    except SonicError as exc:                     # the local server did not start
        raise StudyError(str(exc)) from None
    failed = [p for p in points if not p["kept_up"]]
    saturation = failed[0]["offered_hz"] if failed else None
    best = max(p["achieved_hz"] for p in points)
    if saturation is None:
        print(f"  the server kept up at every rate (up to {rates[-1]:g} req/s)")
    else:
        print(f"  the server did not keep up from {saturation:g} req/s on (best achieved "
              f"{best:.1f} answers/s)")
    name = f"load_{model}"
    figures = []
    args.out.mkdir(parents=True, exist_ok=True)
    if len(points) > 1:
        try:
            from . import plots

            figures.append(plots.latency_vs_rate(
                points, args.out / f"{name}.png",
                title=f"{model}: open-loop load ({args.arrivals} arrivals, "
                      f"{args.duration:g} s per rate)"))
        except ImportError as exc:
            print(f"  no plot: matplotlib is not installed ({exc.name}; pip install "
                  "'recorun[bench]')", flush=True)
    short = ("offered_hz", "scheduled_hz", "sent_hz", "achieved_hz", "latency_ms_p50",
             "latency_ms_p90", "latency_ms_p99", "latency_ms_mean", "sent", "answered",
             "errors", "dropped", "lagging", "send_lag_ms_p99", "kept_up")
    return {"study": "load", "model": model, "server": args.server or
            f"local recorun-server {model}", "sample": sample, "arrivals": args.arrivals,
            "seed": args.seed, "duration_s": args.duration,
            "concurrency_limit": args.concurrency_limit, "pool": len(pool),
            "batch_sizes": batch, "request_bytes_mean": request_bytes, "points": points,
            "saturation_hz": saturation, "max_achieved_hz": best,
            "plots": [str(p) for p in figures], "_name": name,
            "_print": {"model": model, "saturation_hz": saturation, "max_achieved_hz": best,
                       "points": [{k: p[k] for k in short} for p in points]}}


def add_parser(sub) -> None:
    """The ``load`` subcommand's arguments."""
    p = sub.add_parser("load", help="open-loop load on one model: latency and throughput "
                                    "against the offered request rate")
    p.add_argument("--model", required=True, help="facile, deepcalo or resnet50")
    p.add_argument("--rate", required=True, help="offered rate(s), requests/s, e.g. 50,100,200")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per rate (default 5)")
    p.add_argument("--server", metavar="HOST:PORT",
                   help="a running Triton server's gRPC address; none: a local recorun-server")
    p.add_argument("--server-options", nargs="*", default=[],
                   help="recorun-server options for the local server")
    p.add_argument("--arrivals", choices=("poisson", "constant"), default="poisson",
                   help="inter-arrival times: exponential (seeded) or constant")
    p.add_argument("--seed", type=int, default=1, help="the Poisson schedule's seed")
    p.add_argument("--sample", type=Path,
                   help="input sample: a ROOT file like data/samples' (default: the model's: "
                        "hlt_sample.root for facile and deepcalo, jets_sample.root for "
                        "resnet50) or a .npy/.npz request batch")
    p.add_argument("--pool", type=int, default=8, help="input batches cycled through")
    p.add_argument("--concurrency-limit", type=int, default=0, metavar="N",
                   help="at most N requests outstanding; a request due beyond that is "
                        "dropped (0: no limit)")
    p.add_argument("--drain", type=float, default=5.0, metavar="S",
                   help="seconds to wait for outstanding answers after the last send; the "
                        "rest count as lagging")
    p.add_argument("--out", type=Path, default=Path("results"), help="output directory")
