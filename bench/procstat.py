"""What /proc says about another process: CPU time used and peak RSS (the benchmarks' readings)."""

from __future__ import annotations

import os
import resource
import subprocess
import tempfile
import time
from collections.abc import Sequence
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


def rss(pid: int) -> str:
    """``VmRSS`` of a process, from /proc."""
    return _status_field(pid, "VmRSS")


def peak_rss(pid: int) -> str:
    """``VmHWM`` of a process, from /proc."""
    return _status_field(pid, "VmHWM")


def _status_field(pid: int, name: str) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
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


def named(command: str) -> list[int]:
    """Process ids whose command name (``/proc/<n>/comm``) is ``command`` (``postgres``: the
    server and its backends, whoever started them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == command:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def run_child(
    command: Sequence[str], cwd: Path, *, stdout_to: str | None = None
) -> tuple[float, float, int, bytes]:
    """Run a command to its end: wall seconds, CPU seconds (user + system, its children's included),
    peak RSS in KiB, and its standard output (or, with ``stdout_to``, nothing: the output goes to
    that file, e.g. ``/dev/null``). The peak is read every 20 ms while it runs: the larger of its
    ``VmHWM`` and the RSS of it and its child processes together (``ru_maxrss`` would count the
    memory of this process, which the child had until it exec'd)."""
    cpu_before = _children_cpu()
    started = time.perf_counter()
    peak = 0
    with tempfile.TemporaryFile() as captured, tempfile.TemporaryFile() as errors:
        with open(stdout_to or os.devnull, "wb") as sink:
            out = sink if stdout_to else captured
            process = subprocess.Popen(list(command), cwd=cwd, stdout=out, stderr=errors)
            while process.poll() is None:
                tree = sum(_kib(rss(pid)) for pid in [process.pid, *children(process.pid)])
                peak = max(peak, _kib(peak_rss(process.pid)), tree)
                time.sleep(0.02)
        wall = time.perf_counter() - started
        if process.returncode != 0:
            errors.seek(0)
            raise SystemExit(
                f"{' '.join(command)} exited with {process.returncode}:\n{errors.read().decode()}"
            )
        captured.seek(0)
        output = captured.read()
    return wall, _children_cpu() - cpu_before, peak, output


def _children_cpu() -> float:
    """CPU seconds of the children this process has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _kib(vm_hwm: str) -> int:
    """``"1234 kB"`` → 1234; 0 when unknown."""
    number = vm_hwm.split()[0] if vm_hwm != "unknown" else "0"
    return int(number) if number.isdigit() else 0
