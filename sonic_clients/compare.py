"""``recorun compare A.json B.json``: two job reports side by side (e.g. nominal and SONIC).

Per module (by label): real and CPU time per event, i.e. the module's total over the job
divided by the events the job read, so that the modules' figures add up to the job's. Modules
found in one report only are listed as such. Per job: wall time per event, events per second
and CPU per event (the modules' CPU time summed, over the events read; the source, the
framework and threads outside the modules, such as gRPC's, are not in it).

Each figure is given for A and B with ``diff`` = B - A and ``ratio`` = B / A (None where A is
0 or a figure is undefined). Exit codes: 0 ok; 2 usage error; 3 a report file cannot be read or
is not a job report (the message names it).
"""
from __future__ import annotations

import argparse
import json
import sys

from recorun.framework.errors import EXIT_OK, InputError
from recorun.framework.reports import read_report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recorun compare",
        description="Compare two job reports (--report-json), e.g. a nominal job (A) and the "
                    "same workflow with SONIC producers (B): per-module real and CPU time per "
                    "event, and the jobs' wall time, events/s and CPU per event.",
        epilog="exit codes: 0 ok, 2 usage error, 3 a report file cannot be read")
    p.add_argument("a", metavar="A.json", help="the reference report, e.g. the nominal job's")
    p.add_argument("b", metavar="B.json", help="the report compared with it")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    return p


def pair(a: float | None, b: float | None) -> dict:
    """``{"a", "b", "diff": b - a, "ratio": b / a}``; None where undefined."""
    both = a is not None and b is not None
    return {"a": a, "b": b, "diff": b - a if both else None,
            "ratio": b / a if both and a != 0 else None}


def _per_event(total: float, events: int) -> float | None:
    return total / events if events else None


def compare(a: dict, b: dict, *, file_a: str = "A", file_b: str = "B") -> dict:
    """The comparison of two job reports (as :func:`recorun.framework.reports.read_report` returns)."""
    read_a, read_b = a["events"]["read"], b["events"]["read"]
    ma, mb = a["modules"], b["modules"]
    modules = {
        label: {"type_a": ma[label]["type"], "type_b": mb[label]["type"],
                "real_ms": pair(_per_event(ma[label]["real_ms_total"], read_a),
                                _per_event(mb[label]["real_ms_total"], read_b)),
                "cpu_ms": pair(_per_event(ma[label]["cpu_ms_total"], read_a),
                               _per_event(mb[label]["cpu_ms_total"], read_b))}
        for label in ma if label in mb}
    totals = {
        "wall_ms_per_event": pair(_per_event(1e3 * a["wall_s"], read_a),
                                  _per_event(1e3 * b["wall_s"], read_b)),
        "events_per_s": pair(a["throughput_hz"], b["throughput_hz"]),
        "cpu_ms_per_event": pair(_per_event(sum(m["cpu_ms_total"] for m in ma.values()), read_a),
                                 _per_event(sum(m["cpu_ms_total"] for m in mb.values()), read_b)),
    }
    return {"a": {"file": file_a, "workflow": a.get("workflow"), "events": read_a},
            "b": {"file": file_b, "workflow": b.get("workflow"), "events": read_b},
            "modules": modules,
            "only_in_a": {label: m["type"] for label, m in ma.items() if label not in mb},
            "only_in_b": {label: m["type"] for label, m in mb.items() if label not in ma},
            "totals": totals}


def _num(value: float | None, sign: str = "") -> str:
    return f"{value:>{sign}9.3f}" if value is not None else f"{'-':>9}"


def _cells(p: dict) -> str:
    ratio = f"{p['ratio']:.2f}x" if p["ratio"] is not None else "-"
    return f"{_num(p['a'])} {_num(p['b'])} {_num(p['diff'], '+')} {ratio:>7}"


def text(comparison: dict) -> str:
    """The comparison as text (what ``recorun compare`` prints)."""
    c = comparison
    lines = [f"Compare A: {c['a']['file']} ({c['a']['events']} events)",
             f"Compare B: {c['b']['file']} ({c['b']['events']} events)",
             "Compare ---------- Modules ---- [ms per event: module total / events read] "
             "------------",
             f"Compare {'real A':>9} {'real B':>9} {'diff':>9} {'ratio':>7} "
             f"{'cpu A':>9} {'cpu B':>9} {'diff':>9} {'ratio':>7}  Name"]
    for label, m in c["modules"].items():
        types = (f" ({m['type_a']} -> {m['type_b']})" if m["type_a"] != m["type_b"] else "")
        lines.append(f"Compare {_cells(m['real_ms'])} {_cells(m['cpu_ms'])}  {label}{types}")
    for side in ("a", "b"):
        for label, type_name in c[f"only_in_{side}"].items():
            lines.append(f"Compare only in {side.upper()}: {label} ({type_name})")
    lines += ["Compare ---------- Totals ------------",
              f"Compare {'':<18} {'A':>9} {'B':>9} {'diff':>9} {'ratio':>7}"]
    for name, key in (("wall ms/event", "wall_ms_per_event"), ("events/s", "events_per_s"),
                      ("CPU ms/event", "cpu_ms_per_event")):
        lines.append(f"Compare {name:<18} {_cells(c['totals'][key])}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        a, b = read_report(args.a), read_report(args.b)
    except InputError as exc:
        sys.stderr.write(f"recorun compare: error: {exc}\n")
        return exc.exit_code
    comparison = compare(a, b, file_a=args.a, file_b=args.b)
    print(json.dumps(comparison, indent=1) if args.json else text(comparison))
    return EXIT_OK
