"""``session_members``: the processes of a session, for the tests that check that a server
left none behind."""
from __future__ import annotations

from pathlib import Path


def session_members(sid: int) -> list[str]:
    """Processes (``pid command state``) whose session is ``sid`` (a server started its own)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()      # state ppid pgrp session ...
        if int(fields[3]) == sid:
            members.append(f"{entry.name} {stat.split('(', 1)[1].rsplit(')', 1)[0]} "
                           f"{fields[0]}")
    return members
