"""Every core of a node: one process, threads, ``--processes``, the Dask farm, and the anchor.

For ``workflows/workflow_hlt_nominal.yaml`` (CPU only) and ``workflows/workflow_hlt.yaml``
(FACILE as a service on a local fallback server), over one generated HLT sample of ``--events``
events (``recorun-gen hlt``, seed 7), side by side in one run, ``--repeat`` times interleaved:

* ``single``: one recorun process, 1 thread, 1 stream;
* ``threads``: one process, ``-j 2 -s 4``;
* ``processes``: ``--processes 2`` (one shared fallback server for the SONIC workflow);
* ``farm``: ``--executor dask --local-workers 2`` with its default chunk size;
* ``plain``: the anchor, two plain recorun processes at once on the two halves of the input
  (``source.skip`` and ``-n``); for the SONIC workflow both send to one recorun-server started
  by this script, so that one server serves them as one serves ``processes``.

Two figures per configuration: **events/s of the event loop** (events over the report's
``wall_s``: a one-process job's event loop; a chunked job's first chunk submitted to last
chunk done; for ``plain`` the two processes' rates added) and **events/s of the whole command**
(events over the command's wall time: start-up, set-up and the merge of the outputs
included; for ``plain`` the slower of the two). Ratios to ``single`` use the median of the
repeats. The final JSON line has ``processes_vs_single``, ``threads_vs_single``,
``farm_vs_single``, ``plain_vs_single`` (event loop) and the same ``*_command_vs_single`` for
each workflow, the chunked jobs' per-chunk overhead (a chunk's time outside its event loop:
its source and part files opened and closed, its report made; per chunk, and as a share of a
chunk's time) and the machine.

    .venv/bin/python -m recorun.benchmarks.cores [--events 480] [--repeat 2]
                                                 [--workflows nominal,sonic]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]          # recorun's folder: workflows
WORKFLOWS = {"nominal": ROOT / "workflows" / "workflow_hlt_nominal.yaml",
             "sonic": ROOT / "workflows" / "workflow_hlt.yaml"}
CONFIGS = ("single", "threads", "processes", "farm", "plain")


def recorun(workdir: Path, workflow: Path, name: str, *args: str) -> subprocess.Popen:
    report = workdir / f"{name}.json"
    command = [sys.executable, "-m", "recorun.framework.cli", str(workflow), "-q",
               "--report-json", str(report), "--set",
               f"modules.output.file={workdir / f'{name}.root'}", *args]
    return subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, workdir: Path, name: str) -> dict:
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(process.args)} failed ({process.returncode}):\n"
                         f"{err[-3000:]}")
    return json.loads((workdir / f"{name}.json").read_text())


def one_config(config: str, workflow: Path, sample: Path, events: int, workdir: Path,
               server: str | None) -> dict:
    """Run ``config`` once; its events, event-loop and whole-command rates."""
    source = ["--set", f"source.files=['{sample}']"]
    began = time.perf_counter()
    if config == "plain":
        half = events // 2
        registry = ([] if server is None else
                    ["--set", f"services.sonic={{type: ServerRegistry, fallback: false, "
                              f"servers: [{{name: node, address: '{server}'}}]}}"])
        jobs = [recorun(workdir, workflow, f"plain{i}", *source, *registry,
                        "--set", f"source.skip={skip}", "-n", str(n))
                for i, (skip, n) in enumerate(((0, half), (half, events - half)))]
        reports = [finish(job, workdir, f"plain{i}") for i, job in enumerate(jobs)]
        command_s = time.perf_counter() - began
        read = sum(r["events"]["read"] for r in reports)
        return {"events": read, "loop_hz": sum(r["throughput_hz"] for r in reports),
                "command_hz": read / command_s, "command_s": command_s}
    extra = {"single": [], "threads": ["-j", "2", "-s", "4"], "processes": ["-p", "2"],
             "farm": ["--executor", "dask", "--local-workers", "2"]}[config]
    report = finish(recorun(workdir, workflow, config, *source, *extra), workdir, config)
    command_s = time.perf_counter() - began
    read = report["events"]["read"]
    figures = {"events": read, "loop_hz": report["throughput_hz"],
               "command_hz": read / command_s, "command_s": command_s,
               "cpu_efficiency": report.get("cpu_efficiency")}
    chunked = report.get("chunked")
    if chunked:
        figures.update(chunks=chunked["chunks"], chunk_size=chunked["chunk_size"],
                       chunk_wall_s_total=chunked["chunk_wall_s_total"],
                       chunk_overhead_s_total=chunked["chunk_overhead_s_total"],
                       setup_s=chunked.get("setup_s"),
                       peak_rss_mb=[w["peak_rss_mb"] for w in chunked["workers"]])
    return figures


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def study(name: str, workflow: Path, sample: Path, events: int, repeat: int,
          workdir: Path) -> dict:
    server = None
    if name == "sonic":                           # the anchor's one server
        from recorun.sonic_clients.fallback import FallbackServer

        server = FallbackServer(["facile"]).start()
    try:
        runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        for round_ in range(repeat):
            for config in CONFIGS:
                folder = workdir / name / f"{config}-{round_}"
                folder.mkdir(parents=True)
                result = one_config(config, workflow, sample, events, folder,
                                    server.grpc if server else None)
                if result["events"] != events:
                    raise SystemExit(f"{name} {config}: {result['events']} events, not {events}")
                runs[config].append(result)
                print(f"  {name:8} {config:10} round {round_ + 1}: "
                      f"{result['loop_hz']:7.1f} events/s (event loop), "
                      f"{result['command_hz']:7.1f} events/s (whole command, "
                      f"{result['command_s']:.1f} s)", flush=True)
    finally:
        if server is not None:
            server.stop()
    single_loop, single_command = median(runs["single"], "loop_hz"), \
        median(runs["single"], "command_hz")
    out = {"events": events, "repeat": repeat,
           "configs": {c: {"loop_hz": median(r, "loop_hz"),
                           "command_hz": median(r, "command_hz"), "runs": r}
                       for c, r in runs.items()}}
    for config in ("processes", "threads", "farm", "plain"):
        out[f"{config}_vs_single"] = median(runs[config], "loop_hz") / single_loop
        out[f"{config}_command_vs_single"] = median(runs[config], "command_hz") / single_command
    for config in ("processes", "farm"):             # a chunk's time outside its event loop
        chunks = runs[config][0]["chunks"]
        overhead = median(runs[config], "chunk_overhead_s_total") / chunks
        chunk_s = median(runs[config], "chunk_wall_s_total") / chunks
        out[f"{config}_chunks"] = chunks
        out[f"{config}_overhead_per_chunk_s"] = overhead
        out[f"{config}_overhead_share"] = overhead / chunk_s if chunk_s else None
    return out


def machine() -> dict:
    return {"cores": os.cpu_count(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--events", type=int, default=480)
    cli.add_argument("--repeat", type=int, default=2)
    cli.add_argument("--workflows", default="nominal,sonic")
    args = cli.parse_args()
    names = [n for n in args.workflows.split(",") if n]
    results = {}
    with tempfile.TemporaryDirectory(prefix="recorun-cores-") as tmp:
        workdir = Path(tmp)
        sample = workdir / "hlt.root"
        subprocess.run([sys.executable, "-m", "recorun.data.generate", "hlt", str(sample),
                        "--events", str(args.events), "--seed", "7", "-q"], check=True)
        print(f"{args.events} events (recorun-gen hlt --seed 7), {os.cpu_count()} cores, "
              f"{args.repeat} rounds", flush=True)
        for name in names:
            results[name] = study(name, WORKFLOWS[name], sample, args.events, args.repeat,
                                  workdir)
    print()
    for name, r in results.items():
        print(f"{name}: events/s of the event loop (of the whole command) against one process")
        for config in ("processes", "threads", "farm", "plain"):
            print(f"  {config:10} {r[f'{config}_vs_single']:.2f}x "
                  f"({r[f'{config}_command_vs_single']:.2f}x)")
        for config in ("processes", "farm"):
            share = r[f"{config}_overhead_share"]
            print(f"  {config} overhead per chunk {r[f'{config}_overhead_per_chunk_s'] * 1000:.0f} "
                  f"ms ({100 * share:.1f} % of a chunk)" if share is not None else "")
    summary = {name: {k: v for k, v in r.items() if k != "configs"} for name, r in
               results.items()}
    for name, r in results.items():
        summary[name]["events_per_s"] = {c: {"loop": v["loop_hz"], "command": v["command_hz"]}
                                         for c, v in r["configs"].items()}
    print(json.dumps({"benchmark": "cores", "machine": machine(), **summary}))


if __name__ == "__main__":
    main()
