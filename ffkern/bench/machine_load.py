"""How busy the rest of the machine was while a figure was measured.

The load average cannot tell: it counts the benchmark's own threads (on 2 cores a quiet run of 2
threads reads about 2) and it lags by a minute. What is measured instead is the CPU time the
machine spent on *other* processes during the measurement: the busy time of /proc/stat minus the
CPU time of this process and its descendants (the measuring worker), over the wall time, in cores.
A figure is marked "under load" when others used more than LOAD_THRESHOLD_CORES (or a tenth of
the cores, whichever is more): on a 2-core machine that already slows a 2-thread kernel by about
a tenth, and a speed-up between two figures taken under different load means little.
Linux only (/proc); elsewhere the fields are None and nothing is marked.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional, Tuple

LOAD_THRESHOLD_CORES = 0.2


def _clock_ticks() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return 100.0


def _machine_busy_s() -> Optional[float]:
    """Busy CPU seconds of all cores since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _clock_ticks()


def _tree_cpu_s(root: int) -> Optional[float]:
    """CPU seconds of ``root`` and every live descendant, with the time of reaped children
    (cutime, cstime), so that a child that ends during the measurement is not lost."""
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return None
    parent: Dict[int, int] = {}
    cpu: Dict[int, float] = {}
    ticks = _clock_ticks()
    for name in names:
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:  # gone meanwhile
            continue
        rest = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
        pid = int(name)
        parent[pid] = int(rest[1])
        cpu[pid] = sum(int(v) for v in rest[11:15]) / ticks  # utime, stime, cutime, cstime
    if root not in cpu:
        return None
    children: Dict[int, list] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack.extend(children.get(pid, ()))
    return total


def _loadavg() -> Optional[Tuple[float, float, float]]:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except OSError:
        return None


class LoadProbe:
    """``with LoadProbe() as probe: measure()``, then ``probe.result``: the load averages before
    and after, the cores other processes kept busy on average, and whether that is "under load"."""

    def __init__(self):
        self.result: Dict = {}

    def __enter__(self) -> "LoadProbe":
        self._wall = time.perf_counter()
        self._busy, self._mine = _machine_busy_s(), _tree_cpu_s(os.getpid())
        self._loadavg = _loadavg()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._wall
        busy, mine = _machine_busy_s(), _tree_cpu_s(os.getpid())
        others = error = None
        if None not in (busy, mine, self._busy, self._mine) and wall > 0:
            others = max(0.0, (busy - self._busy) - (mine - self._mine)) / wall
            error = 4.0 / _clock_ticks() / wall  # each of the 4 readings is whole clock ticks
        cores = os.cpu_count() or 1
        threshold = max(LOAD_THRESHOLD_CORES, 0.1 * cores)
        self.result = {
            "load_average_before": self._loadavg, "load_average_after": _loadavg(),
            "other_processes_cores": None if others is None else round(others, 3),
            "uncertainty_cores": None if error is None else round(error, 3),
            # only marked when clearly above the threshold (short figures are uncertain by ticks)
            "under_load": None if others is None else others - error > threshold,
        }


def describe(load: Optional[Dict]) -> str:
    """A short note for a log line: empty when quiet or unknown."""
    if not load or not load.get("under_load"):
        return ""
    return f" [under load: other processes used {load['other_processes_cores']:.2f} cores]"
