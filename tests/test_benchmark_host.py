"""benchmarks/host.py: the steal share the benchmarks print beside their tables."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "host.py"
_spec = importlib.util.spec_from_file_location("benchmark_host", _PATH)
host = importlib.util.module_from_spec(_spec)
sys.modules["benchmark_host"] = host
_spec.loader.exec_module(host)


def _stat(tmp_path: Path, line: str) -> Path:
    path = tmp_path / "stat"
    path.write_text(f"{line}\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 12345\n")
    return path


def test_parses_the_aggregate_line_and_leaves_guest_time_out(tmp_path, monkeypatch):
    # user nice system idle iowait irq softirq steal guest guest_nice
    monkeypatch.setattr(host, "_STAT", _stat(tmp_path, "cpu  100 5 20 800 10 0 5 60 40 1"))
    ticks = host.cpu_ticks()
    assert ticks == host.CpuTicks(total=100 + 5 + 20 + 800 + 10 + 0 + 5 + 60, steal=60)


def test_share_between_two_readings():
    before, after = host.CpuTicks(total=1000, steal=10), host.CpuTicks(total=1400, steal=70)
    assert host.steal_share(before, after) == pytest.approx(60 / 400)
    assert host.steal_share(after, after) is None  # no ticks passed
    assert host.steal_share(None, after) is None
    assert host.percent(0.15) == "15.0%" and host.percent(None) == "n/a"


def test_no_proc_stat_or_a_foreign_format_means_unmeasured(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "_STAT", tmp_path / "missing")
    assert host.cpu_ticks() is None
    monkeypatch.setattr(host, "_STAT", _stat(tmp_path, "cpu  1 2 3"))  # an old kernel: no steal column
    assert host.cpu_ticks() is None
    with host.StealMeter() as meter:
        pass
    assert meter.share is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="steal time is read from Linux /proc/stat")
def test_the_meter_reads_this_machine():
    with host.StealMeter() as meter:
        sum(i * i for i in range(2_000_000))  # long enough for the tick counters to move
    assert meter.share is not None and 0.0 <= meter.share <= 1.0
