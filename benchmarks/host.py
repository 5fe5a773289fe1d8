"""How much CPU the host took from this machine while a benchmark ran (Linux steal time).

On a virtual machine the hypervisor can run other guests on the physical cores behind our
virtual CPUs. The guest kernel counts that time as *steal*: a virtual CPU had work to do but no
physical core to do it on. On the 2-vCPU development machine steal ran at 10-12% of all CPU time
during a bus benchmark in one phase and under 1% in others, and latency tails follow it. The
benchmarks print the steal share beside their tables, so a reader can tell a slow result from a
slow host.

    with StealMeter() as steal:
        ...
    steal.share  # steal ticks / all ticks over the block, in [0, 1]; None off Linux

The share is over all CPUs and all of their ticks, idle ones included (as ``top``'s ``st``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_STAT = Path("/proc/stat")
_STEAL = 7  # user nice system idle iowait irq softirq steal guest guest_nice


@dataclass(frozen=True)
class CpuTicks:
    """The aggregate ``cpu`` line of ``/proc/stat``: every tick, and the stolen ones."""

    total: int
    steal: int


def cpu_ticks() -> CpuTicks | None:
    """The machine's CPU ticks so far, or None where ``/proc/stat`` is missing (not Linux)."""
    try:
        first = _STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu" or len(first) <= _STEAL + 1:
        return None
    values = [int(v) for v in first[1:]]
    # guest and guest_nice are already counted in user and nice: leave them out of the total
    return CpuTicks(total=sum(values[:_STEAL + 1]), steal=values[_STEAL])


def steal_share(before: CpuTicks | None, after: CpuTicks | None) -> float | None:
    """Stolen ticks over all ticks between two readings; None without both or without ticks."""
    if before is None or after is None or after.total <= before.total:
        return None
    return (after.steal - before.steal) / (after.total - before.total)


class StealMeter:
    """A context manager measuring the steal share of the block it wraps (module docstring)."""

    def __init__(self) -> None:
        self.share: float | None = None
        self._before: CpuTicks | None = None

    def __enter__(self) -> StealMeter:
        self._before = cpu_ticks()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.share = steal_share(self._before, cpu_ticks())


def percent(share: float | None) -> str:
    """A share as ``12.3%``, or ``n/a`` when it could not be measured."""
    return "n/a" if share is None else f"{100 * share:.1f}%"
