"""The studies' plots (matplotlib, Agg: no display needed), as PNG files."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_vs_clients(series: Mapping[str, Sequence[dict]], path: Path, *, title: str,
                          nominal_hz: float | None = None) -> Path:
    """Total throughput (events/s) and per-client throughput (mean, spread) against the number
    of clients, one line per series; ``nominal_hz``: one nominal process, as a reference."""
    plt = _pyplot()
    fig, (total, per) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in series.items():
        n = [p["clients"] for p in points]
        total.plot(n, [p["throughput_hz"] for p in points], "o-", label=name)
        per.errorbar(n, [p["per_client_mean_hz"] for p in points],
                     yerr=[p["per_client_std_hz"] for p in points], fmt="o-", capsize=3,
                     label=name)
    clients = sorted({p["clients"] for points in series.values() for p in points})
    if nominal_hz:
        per.axhline(nominal_hz, color="gray", ls="--", label="nominal, one process")
        total.plot(clients, [nominal_hz * c for c in clients], color="gray", ls="--",
                   label="nominal x clients (ideal)")
    for ax in (total, per):
        if clients and clients[-1] >= 4 * clients[0]:
            ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
    total.set(xlabel="simultaneous clients", ylabel="events / s (all clients)", title=title)
    per.set(xlabel="simultaneous clients", ylabel="events / s per client (mean, std)")
    for ax in (total, per):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def event_time_violins(groups: Mapping[str, Sequence[float]], path: Path, *, title: str,
                       reference_ms: float | None = None, reference_label: str = "") -> Path:
    """Distributions of per-event times (ms), one violin per group."""
    plt = _pyplot()
    names = [n for n, v in groups.items() if len(v)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 4.2))
    if names:
        ax.violinplot([list(groups[n]) for n in names], showmedians=True)
        ax.set_xticks(range(1, len(names) + 1), names)
    if reference_ms:
        ax.axhline(reference_ms, color="gray", ls="--", label=reference_label)
        ax.legend(fontsize=8)
    ax.set(ylabel="time per event (ms)", title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_vs_rate(points: Sequence[dict], path: Path, *, title: str) -> Path:
    """An open-loop load scan: latency percentiles (p50, p90, p99, mean) and achieved
    throughput against the offered request rate; rates where the server did not keep up are
    marked."""
    plt = _pyplot()
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    rates = [p["offered_hz"] for p in points]
    for key, label, style in (("latency_ms_p50", "p50", "o-"), ("latency_ms_p90", "p90", "s-"),
                              ("latency_ms_p99", "p99", "^-"),
                              ("latency_ms_mean", "mean", "x--")):
        lat.plot(rates, [p[key] for p in points], style, label=label)
    thr.plot(rates, [p["achieved_hz"] for p in points], "o-", label="achieved (answers/s)")
    thr.plot(rates, rates, color="gray", ls="--", label="offered (ideal)")
    missed = [p for p in points if not p["kept_up"]]
    if missed:
        lat.plot([p["offered_hz"] for p in missed], [p["latency_ms_p99"] for p in missed],
                 "o", mfc="none", mec="red", ms=12, label="did not keep up")
        thr.plot([p["offered_hz"] for p in missed], [p["achieved_hz"] for p in missed],
                 "o", mfc="none", mec="red", ms=12, label="did not keep up")
    for ax in (lat, thr):
        if rates and max(rates) >= 4 * min(rates):
            ax.set_xscale("log", base=2)
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if points and max(p["latency_ms_p99"] for p in points) > 20 * max(
            1e-3, min(p["latency_ms_p50"] for p in points)):
        lat.set_yscale("log")
    else:
        lat.set_ylim(bottom=0)
    thr.set_ylim(bottom=0)
    lat.set(xlabel="offered rate (requests / s)", ylabel="latency, send to answer (ms)",
            title=title)
    thr.set(xlabel="offered rate (requests / s)", ylabel="requests / s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
