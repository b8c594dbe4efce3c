"""What /proc says about another process: CPU time used and peak RSS (the benchmarks' readings)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/<pid>/stat."""
    return cpu_seconds_of(str(pid))


def cpu_seconds_of(entry: str) -> float:
    """User + system CPU time from /proc/<entry>/stat (a process, or ``self/task/<tid>``)."""
    try:
        fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds() -> dict[str, float]:
    """CPU time of each of this process's Python threads so far, by thread name (from
    /proc/self/task/<native id>/stat; threads started outside Python are left out)."""
    import threading

    return {thread.name: cpu_seconds_of(f"self/task/{thread.native_id}") for thread in threading.enumerate()}


def peak_rss(pid: int) -> str:
    """``VmHWM`` of a process, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid``, from /proc/<n>/stat."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found
