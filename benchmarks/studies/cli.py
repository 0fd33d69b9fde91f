"""``recorun-bench STUDY ...``: see :mod:`recorun.benchmarks.studies` and ``docs/RESULTS.md``.

Every study prints its figures and, last, one line of JSON; it also writes that JSON and its
plots into ``--out``. Exit codes: 0 done, 1 a run failed (the failing client's log is
printed), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from . import load, plots
from .runs import (
    BadArgument,
    StudyError,
    machine,
    parse_list,
    run_clients,
    server,
    sonic_models,
    summary,
)

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"

#: the paper's per-GPU throughputs (table 2, section 5.3.2: inferences/s, one per event)
PAPER_GPU = {"facile": (500.0, "paper, V100"), "deepcalo": (9800.0, "paper, V100, dynamic "
                                                                      "batching"),
             "resnet50": (25.0, "paper, T4, batch 10")}
#: the paper's scenarios (section 6): the HLT (32 000 cores, 64 000 events/s) and offline
#: reconstruction (5000 events/s on about 150 000 cores)
SCENARIOS = {"hlt": (64_000.0, 32_000), "offline": (5_000.0, 150_000)}
SCENARIO_MODELS = {"hlt": ["facile"], "offline": ["facile", "deepcalo", "resnet50"]}


def pinning(pin: bool) -> tuple[list[int] | None, list[int] | None]:
    """(server cores, client cores): with ``pin``, the server gets core 0 and the clients the
    others, emulating a remote server on one machine."""
    if not pin:
        return None, None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise BadArgument("--pin needs at least two cores")
    return cores[:1], cores[1:]


def write(out: Path, name: str, data: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def _lean(point: dict) -> dict:
    """A scan point without its list of per-event times (kept in the JSON file)."""
    return {k: v for k, v in point.items() if k != "event_ms"}


def scan(workflow: Path, counts: list[int], events: int, servers: list[str], out: Path,
         tag: str, client_cpus, start_delay_s: float | None = None) -> list[dict]:
    points = []
    for n in counts:
        results = run_clients(workflow, servers, n, events, out / "runs" / f"{tag}-{n}",
                              cpus=client_cpus, start_delay_s=start_delay_s)
        point = summary(results)
        points.append(point)
        print(f"  {tag:<12} {n:>4} clients  {point['throughput_hz']:>9.2f} ev/s total  "
              f"{point['per_client_mean_hz']:>8.2f} +- {point['per_client_std_hz']:.2f} per "
              f"client  median {point['event_ms_median']:.1f} ms/event  "
              f"{point['input_MBps']:.1f} MB/s in", flush=True)
    return points


# --- studies ---------------------------------------------------------------------------------

def study_clients(args) -> dict:
    workflow = Path(args.workflow)
    server_cpus, client_cpus = pinning(args.pin)
    models = sonic_models(workflow)
    nominal = None
    with server(models, args.server, args.server_options, server_cpus) as servers:
        print(f"clients scan of {workflow} against {', '.join(servers) or 'in-process'}")
        points = scan(workflow, parse_list(args.clients), args.events, servers, args.out,
                      "sonic", client_cpus, args.start_delay)
    if args.nominal_workflow:
        ref = Path(args.nominal_workflow)
        nominal = summary(run_clients(ref, [], 1, args.events, args.out / "runs" / "nominal",
                                      cpus=client_cpus, start_delay_s=0))
        print(f"  nominal {ref.name}: {nominal['throughput_hz']:.2f} ev/s, median "
              f"{nominal['event_ms_median']:.1f} ms/event", flush=True)
    name = f"clients_{workflow.stem}"
    figures = [
        plots.throughput_vs_clients(
            {workflow.stem: points}, args.out / f"{name}_throughput.png",
            title=f"{workflow.stem}: throughput vs clients",
            nominal_hz=nominal["throughput_hz"] if nominal else None),
        plots.event_time_violins(
            {str(p["clients"]): p["event_ms"] for p in points},
            args.out / f"{name}_event_time.png",
            title=f"{workflow.stem}: time per event vs simultaneous clients",
            reference_ms=statistics.fmean(nominal["event_ms"]) if nominal else None,
            reference_label="nominal, mean"),
    ]
    return {"study": "clients", "workflow": str(workflow), "events_per_client": args.events,
            "servers": args.server or f"local recorun-server {','.join(models)}",
            "pinned": {"server": server_cpus, "clients": client_cpus}, "points": points,
            "nominal": nominal, "plots": [str(p) for p in figures], "_name": name,
            "_print": {"throughput_hz": {p["clients"]: p["throughput_hz"] for p in points}}}


BATCHING_CONFIGS = {"off-1": ["--no-dynamic-batching", "--instances", "1"],
                    "on-1": ["--dynamic-batching", "--instances", "1"],
                    "on-2": ["--dynamic-batching", "--instances", "2"]}


def study_batching(args) -> dict:
    workflow = Path(args.workflow)
    server_cpus, client_cpus = pinning(args.pin)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in BATCHING_CONFIGS]
    if unknown:
        raise BadArgument(f"unknown configuration '{unknown[0]}' (known: "
                         f"{', '.join(BATCHING_CONFIGS)})")
    series = {}
    for config in configs:
        options = [*BATCHING_CONFIGS[config], "--max-queue-delay-us", str(args.queue_delay_us)]
        with server(["deepcalo"], [], options, server_cpus) as servers:
            print(f"deepcalo, dynamic batching {config}", flush=True)
            series[config] = scan(workflow, parse_list(args.clients), args.events, servers,
                                  args.out, f"batching-{config}", client_cpus,
                                  args.start_delay)
    figure = plots.throughput_vs_clients(
        {f"dynamic batching {c.replace('-', ', instances ')}": p for c, p in series.items()},
        args.out / "batching_throughput.png",
        title="DeepCalo: dynamic batching and instances")
    return {"study": "batching", "workflow": str(workflow), "events_per_client": args.events,
            "queue_delay_us": args.queue_delay_us,
            "pinned": {"server": server_cpus, "clients": client_cpus},
            "configs": {c: BATCHING_CONFIGS[c] for c in configs}, "series": series,
            "plots": [str(figure)], "_name": "batching",
            "_print": {c: {p["clients"]: p["throughput_hz"] for p in s}
                       for c, s in series.items()}}


def _cpu_per_event_ms(report: dict) -> float:
    events = max(1, report["events"]["read"])
    return sum(m["cpu_ms_mean"] * m["runs"] for m in report["modules"].values()) / events


def study_hlt(args) -> dict:
    sonic, nominal = Path(args.workflow), Path(args.nominal_workflow)
    server_cpus, client_cpus = pinning(args.pin)
    with server(sonic_models(sonic), args.server, args.server_options, server_cpus) as servers:
        (s,) = run_clients(sonic, servers, 1, args.events, args.out / "runs" / "hlt-sonic",
                           threads=args.threads, cpus=client_cpus, start_delay_s=0)
    (n,) = run_clients(nominal, [], 1, args.events, args.out / "runs" / "hlt-nominal",
                       threads=args.threads, cpus=client_cpus, start_delay_s=0)
    hcal = args.hcal_module

    def figures(result, label):
        report = result.report
        cpu = _cpu_per_event_ms(report)
        module = report["modules"].get(hcal, {})
        return {"workflow": label, "events": report["events"]["read"],
                "accepted": report["events"]["accepted"],
                "wall_ms_per_event": 1e3 * report["wall_s"] / max(1, report["events"]["read"]),
                "event_ms_mean": statistics.fmean(result.event_ms),
                "event_ms_median": statistics.median(result.event_ms),
                "cpu_ms_per_event": cpu,
                "hcal_cpu_ms": module.get("cpu_ms_mean", 0.0),
                "hcal_share": module.get("cpu_ms_mean", 0.0) / cpu if cpu else 0.0,
                "event_ms": result.event_ms}
    out_s, out_n = figures(s, sonic.stem), figures(n, nominal.stem)
    change = out_s["event_ms_mean"] / out_n["event_ms_mean"] - 1.0
    figure = plots.event_time_violins(
        {f"{sonic.stem}\n(FACILE as a service)": out_s["event_ms"],
         f"{nominal.stem}\n(MAHI-like fit on CPU)": out_n["event_ms"]},
        args.out / "hlt_event_time.png",
        title=f"HLT emulation, {args.threads} thread(s): time per event")
    print(f"  nominal: {out_n['event_ms_mean']:.2f} ms/event (HCAL {100 * out_n['hcal_share']:.0f}"
          f"% of {out_n['cpu_ms_per_event']:.2f} ms CPU); FACILE as a service: "
          f"{out_s['event_ms_mean']:.2f} ms/event; change {100 * change:+.1f}%")
    return {"study": "hlt", "threads": args.threads, "events": args.events,
            "pinned": {"server": server_cpus, "clients": client_cpus},
            "sonic": out_s, "nominal": out_n, "time_change": change,
            "plots": [str(figure)], "_name": "hlt",
            "_print": {"time_change": change, "nominal_hcal_share": out_n["hcal_share"]}}


def study_projection(args) -> dict:
    from recorun.sonic_clients.scaling import scale
    from recorun.model_specs import SPECS

    gpu: dict[str, tuple[float, str]] = dict(PAPER_GPU)
    if args.gpu_json:
        measured = json.loads(Path(args.gpu_json).read_text())
        for name, entry in measured.get("models", {}).items():
            rates = [v["events_per_s"] for part in ("requesters", "merged")
                     for v in entry.get(part, {}).values()]
            if rates:
                gpu[name] = (max(rates), f"measured, {measured.get('gpu', '?')} "
                                         "(benchmarks/gpu_models.py)")
    sizes = {name: (float(s.event_batch * 4 * _row_elements(s)), "model spec x the paper's "
                    "batch per event") for name, s in SPECS.items()}
    for path in args.clients_json:
        data = json.loads(Path(path).read_text())
        for model in sonic_models(Path(data["workflow"])):
            bytes_per_event = data["points"][-1]["input_bytes_per_event"]
            sizes[model] = (bytes_per_event, f"measured by recorun-bench clients ({path})")
    rows = []
    for scenario, (rate, clients) in SCENARIOS.items():
        for model in SCENARIO_MODELS[scenario]:
            per_gpu, gpu_source = gpu[model]
            size, size_source = sizes[model]
            if scenario == "hlt":
                size *= 4500 / 16000          # the HLT sends 4500 channels per event
            s = scale(event_rate=rate, clients=clients, bytes_per_event=size,
                      gpu_inferences_per_s=per_gpu)
            rows.append({"scenario": scenario, "model": model, "event_rate": rate,
                         "clients": clients, "gpu_inferences_per_s": per_gpu,
                         "gpu_source": gpu_source, "bytes_per_event": size,
                         "size_source": size_source, "gpus": s.gpus,
                         "bandwidth_gbps": s.bandwidth_gbps,
                         "bandwidth_per_gpu_gbps": s.bandwidth_per_gpu_gbps})
            print(f"  {scenario:<8} {model:<9} {rate:>8.0f} ev/s: {s.gpus:>5} GPU(s) at "
                  f"{per_gpu:g} inf/s ({gpu_source}); {s.bandwidth_gbps:.1f} Gb/s "
                  f"({size / 1e6:.3f} MB/event, {size_source})")
    return {"study": "projection", "rows": rows, "_name": "projection",
            "_print": {f"{r['scenario']}/{r['model']}": r["gpus"] for r in rows}}


def _row_elements(spec) -> int:
    count = 1
    for d in spec.inputs[0].shape:
        count *= d
    return count


# --- command line ----------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recorun-bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="study", required=True)

    def common(s, workflow):
        s.add_argument("--workflow", default=str(WORKFLOWS / workflow), help="SONIC workflow")
        s.add_argument("--events", type=int, default=100, help="events per client")
        s.add_argument("--out", type=Path, default=Path("results"),
                       help="output directory (the clients' own files go to OUT/runs/)")
        s.add_argument("--pin", action="store_true",
                       help="server on core 0, clients on the other cores (emulates a remote "
                            "server; without it they share every core)")

    c = sub.add_parser("clients", help="throughput vs simultaneous single-thread clients")
    common(c, "workflow_facile.yaml")
    c.add_argument("--clients", default="1,2,4", help="client counts, e.g. 1,2,4,8")
    c.add_argument("--start-delay", type=float, metavar="S",
                   help="the clients' common start, S seconds after they are launched "
                        "(default 6 + 2 per client: time to set up)")

    c.add_argument("--server", action="append", default=[], metavar="ADDR",
                   help="Triton server host:port (repeatable); none: a local recorun-server")
    c.add_argument("--server-options", nargs="*", default=[],
                   help="recorun-server options for the local server")
    c.add_argument("--nominal-workflow", help="a CPU-only workflow run once as the reference")

    b = sub.add_parser("batching", help="DeepCalo: dynamic batching off/on, 1 or 2 instances")
    common(b, "workflow_deepcalo.yaml")
    b.add_argument("--clients", default="1,2,4")
    b.add_argument("--start-delay", type=float, metavar="S",
                   help="the clients' common start, S seconds after they are launched "
                        "(default 6 + 2 per client: time to set up)")

    b.add_argument("--configs", default=",".join(BATCHING_CONFIGS),
                   help=f"of {', '.join(BATCHING_CONFIGS)}")
    b.add_argument("--queue-delay-us", type=int, default=500)

    h = sub.add_parser("hlt", help="workflow_hlt.yaml vs workflow_hlt_nominal.yaml")
    common(h, "workflow_hlt.yaml")
    h.add_argument("--nominal-workflow", default=str(WORKFLOWS / "workflow_hlt_nominal.yaml"))
    h.add_argument("--threads", type=int, default=1)
    h.add_argument("--hcal-module", default="hcalRecHits")
    h.add_argument("--server", action="append", default=[], metavar="ADDR")
    h.add_argument("--server-options", nargs="*", default=[])

    g = sub.add_parser("projection", help="GPUs and bandwidth for the paper's scenarios")
    g.add_argument("--gpu-json", help="the JSON line of benchmarks/gpu_models.py (else the "
                                      "paper's per-GPU throughputs)")
    g.add_argument("--clients-json", action="append", default=[],
                   help="a clients study's JSON: its measured bytes per event")
    g.add_argument("--out", type=Path, default=Path("results"))

    load.add_parser(sub)
    return p


STUDIES = {"clients": study_clients, "batching": study_batching, "hlt": study_hlt,
           "projection": study_projection, "load": load.study_load}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for option in ("workflow", "nominal_workflow", "gpu_json", "clients_json"):
        values = getattr(args, option, None) or []
        for value in [values] if isinstance(values, str) else values:
            if not Path(value).is_file():
                print(f"recorun-bench {args.study}: --{option.replace('_', '-')} {value}: no "
                      "such file", file=sys.stderr)
                return 2
    try:
        result = STUDIES[args.study](args)
    except StudyError as exc:
        print(f"recorun-bench {args.study}: {exc}", file=sys.stderr)
        return exc.exit_code
    result["machine"] = machine()
    name, short = result.pop("_name"), result.pop("_print")
    path = write(args.out, name, result)
    print(f"wrote {path}" + "".join(f", {p}" for p in result.get("plots", [])))
    print(json.dumps({"study": args.study, "json": str(path), **short}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
