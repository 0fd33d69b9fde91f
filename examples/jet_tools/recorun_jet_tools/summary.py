"""A report section of the plugin's own (recorun's hooks: recorun/framework/hookspecs.py)."""
from __future__ import annotations

from recorun import hookimpl

PATH = "dijet_highmass"


@hookimpl
def recorun_report_sections(report, options):
    """``dijet``: how many events the dijet path saw and selected, when the job has it."""
    path = report["paths"].get(PATH)
    if path is None:
        return None
    seen, selected = path["visited"], path["passed"]
    return {"dijet": {"path": PATH, "events": seen, "selected": selected,
                      "efficiency": selected / seen if seen else None}}


@hookimpl
def recorun_text_report(report):
    section = report.get("dijet")
    if section is None or section["efficiency"] is None:
        return None
    return (f"DijetReport {section['selected']} of {section['events']} events selected by "
            f"{section['path']} ({100 * section['efficiency']:.1f} %)")
