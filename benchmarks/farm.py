"""One process against a Dask farm, and one server against two behind nginx.

(a) farm: ``workflows/workflow_hlt_nominal.yaml`` (CPU only) over the HLT sample read
    ``--repeat`` times, once as one recorun process (1 thread) and once with
    ``--executor dask --local-workers 2 --chunk-size N``; events/s of each from its report
    (the farm's wall time runs from its first submission to its last result: the cluster's
    start is left out, the merge of the outputs is in). ``farm_vs_single`` = farm / single.
    The farm's overhead per chunk = (the chunks' summed task time - the single process's
    event loop) / chunks: set-up, begin_job, reading and writing part files per chunk.
(b) servers: ``--clients`` simultaneous single-thread FACILE offline clients
    (``recorun-bench clients`` machinery) against one ``recorun-server --threads 2`` and
    against two ``recorun-server --threads 1`` behind the nginx gRPC balancer
    (``recorun.server.balancer.NginxBalancer``): the same CPU threads for inference in both.
    ``two_servers_vs_one`` = events/s with two / with one.

This machine has 2 cores: the two workers, the clients and the servers all share them, so
these ratios measure the overheads, not a scale-out.

    .venv/bin/python benchmarks/farm.py [--repeat 4] [--chunk-size 50] [--clients 4] [--events 100]

Prints the figures, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]          # recorun's folder: workflows, samples

from recorun.benchmarks.studies.runs import run_clients, summary  # noqa: E402
from recorun.server.balancer import NginxBalancer  # noqa: E402
from recorun.sonic_clients.fallback import FallbackServer  # noqa: E402

HLT_NOMINAL = ROOT / "workflows" / "workflow_hlt_nominal.yaml"
HLT_SAMPLE = ROOT / "data" / "samples" / "hlt_sample.root"
FACILE = ROOT / "workflows" / "workflow_facile.yaml"


def recorun(workdir: Path, *args: str) -> dict:
    """Run recorun in ``workdir``; its report."""
    report = workdir / "report.json"
    command = [sys.executable, "-m", "recorun.framework.cli", str(HLT_NOMINAL), "-q",
               "--report-json", str(report), *args]
    run = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(report.read_text())


def farm_study(repeat: int, chunk_size: int, workers: int) -> dict:
    files = "[" + ", ".join([f"'{HLT_SAMPLE}'"] * repeat) + "]"
    with tempfile.TemporaryDirectory(prefix="recorun-farm-bench-") as tmp:
        single_dir, farm_dir = Path(tmp, "single"), Path(tmp, "farm")
        single_dir.mkdir()
        farm_dir.mkdir()
        single = recorun(single_dir, "--set", f"source.files={files}", "-j", "1")
        farm = recorun(farm_dir, "--set", f"source.files={files}", "--executor", "dask",
                       "--local-workers", str(workers), "--chunk-size", str(chunk_size))
    chunks = farm["farm"]["chunks"]
    events = single["events"]["read"]
    if farm["events"]["read"] != events:
        raise SystemExit(f"the farm read {farm['events']['read']} events, one process {events}")
    overhead = (farm["farm"]["chunk_wall_s_total"] - single["wall_s"]) / chunks
    return {"events": events, "chunks": chunks, "workers": workers,
            "single_hz": single["throughput_hz"], "farm_hz": farm["throughput_hz"],
            "single_wall_s": single["wall_s"], "farm_wall_s": farm["wall_s"],
            "chunk_task_s_total": farm["farm"]["chunk_wall_s_total"],
            "overhead_per_chunk_s": overhead,
            "farm_vs_single": farm["throughput_hz"] / single["throughput_hz"]}


def clients_against(servers: list[str], clients: int, events: int, tag: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"recorun-farm-bench-{tag}-") as tmp:
        return summary(run_clients(FACILE, servers, clients, events, Path(tmp)))


def servers_study(clients: int, events: int) -> dict:
    one = FallbackServer(["facile"], ["--threads", "2"]).start()
    try:
        single = clients_against([one.grpc], clients, events, "one")
    finally:
        one.stop()
    pair = [FallbackServer(["facile"], ["--threads", "1"]).start() for _ in range(2)]
    try:
        with NginxBalancer([s.grpc for s in pair]) as balancer:
            both = clients_against([balancer.address], clients, events, "two")
            reached = balancer.upstream_counts()
    finally:
        for server in pair:
            server.stop()
    return {"clients": clients, "events_per_client": events,
            "one_server_hz": single["throughput_hz"], "two_servers_hz": both["throughput_hz"],
            "requests_per_upstream": dict(reached),
            "two_servers_vs_one": both["throughput_hz"] / single["throughput_hz"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4, help="times the HLT sample is read")
    parser.add_argument("--chunk-size", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--events", type=int, default=100, help="events per FACILE client")
    args = parser.parse_args()

    farm = farm_study(args.repeat, args.chunk_size, args.workers)
    print(f"farm: {farm['events']} events of workflow_hlt_nominal.yaml; one process "
          f"{farm['single_hz']:.1f} events/s ({farm['single_wall_s']:.2f} s); "
          f"{farm['workers']} Dask workers, {farm['chunks']} chunks: {farm['farm_hz']:.1f} "
          f"events/s ({farm['farm_wall_s']:.2f} s); farm/single {farm['farm_vs_single']:.2f}; "
          f"overhead per chunk {farm['overhead_per_chunk_s']:.2f} s")
    servers = servers_study(args.clients, args.events)
    print(f"servers: {servers['clients']} FACILE clients x {servers['events_per_client']} "
          f"events; one server {servers['one_server_hz']:.1f} events/s, two behind nginx "
          f"{servers['two_servers_hz']:.1f} events/s (requests per upstream "
          f"{servers['requests_per_upstream']}); two/one {servers['two_servers_vs_one']:.2f}")
    print(f"machine: {os.cpu_count()} cores")
    print(json.dumps({"farm": farm, "servers": servers,
                      "farm_vs_single": farm["farm_vs_single"],
                      "two_servers_vs_one": servers["two_servers_vs_one"]}))


if __name__ == "__main__":
    main()
