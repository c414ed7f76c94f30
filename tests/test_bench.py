"""The benchmark package's own pieces: report writing and profile summaries (fast, no mounts).

The quick mode itself (``python -m bench --quick``) runs in CI as a separate smoke step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.profile import summarize_collapsed
from bench.report import write_all
from bench.results import Scenario


def test_summarize_collapsed_counts_own_and_inclusive_samples() -> None:
    text = ("<module> (mmfs/daemon.py:3);read (mmfs/vfs.py:10);get (mmfs/tiers/disk.py:5) 3\n"
            "<module> (mmfs/daemon.py:3);EpollIOManager.get_events (trio/_core/_io_epoll.py:243) 6\n"
            "<module> (mmfs/daemon.py:3);read (mmfs/vfs.py:12) 1\n")
    got = summarize_collapsed(text)
    assert got["samples"] == 4 and got["idle_pct"] == 60.0
    assert got["self"][0] == ("get (mmfs/tiers/disk.py)", 75.0)
    assert dict(got["inclusive"])["read (mmfs/vfs.py)"] == 100.0


def test_report_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    s = Scenario("sequential", "3. Sequential")
    s.figure("native", "native", "GB/s").values.extend([1.0, 2.0, 3.0])
    s.figure("mmfs", "mmfs", "GB/s", baseline="native").values.extend([0.5, 1.0, 1.5])
    run = {"command": "python -m bench", "started": "now", "seconds": 1.0, "commit": "x",
           "config": {"quick": True},
           "machine": {"cores": 2, "cpu": "x", "ram_bytes": 2**30, "kernel": "k", "python": "3.11"}}
    md = write_all(run, [s, Scenario("scale", "7").unavailable("no mmfs")], tmp_path).read_text()
    assert "| mmfs | GB/s | 3 | 0.500 | 1.00 | 1.50 | native | 0.5× |" in md
    assert "**not available**: no mmfs" in md
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["scenarios"][0]["figures"][1]["ratio"] == 0.5
    assert (tmp_path / "sequential_throughput.png").stat().st_size > 0


def test_best_of_figures_compare_best_with_best_and_targets_go_both_ways(tmp_path: Path) -> None:
    s = Scenario("ingest", "8. Node ingest")
    s.figure("curl", "curl", "GB/s", stat="max").values.extend([2.0, 2.5, 1.0])
    node = s.figure("node", "node", "GB/s", baseline="curl", stat="max", target_ratio_min=0.5)
    node.values.extend([1.0, 1.5, 0.5])
    cpu = s.figure("cpu", "cpu", "CPU s/GB", stat="min", target_value=1.0)
    cpu.values.extend([3.0, 0.9, 2.0])
    assert (node.value, s.ratio(node), s.met(node)) == (1.5, 0.6, True)
    assert (cpu.value, s.met(cpu)) == (0.9, True)
    node.values[:] = [1.0]
    assert s.met(node) is False
    run = {"command": "python -m bench", "started": "now", "seconds": 1.0, "commit": "x", "config": {"quick": True},
           "machine": {"cores": 2, "cpu": "x", "ram_bytes": 2**30, "kernel": "k", "python": "3.11"}}
    md = write_all(run, [s], tmp_path).read_text()
    assert "| node [best of 1] | GB/s | 1 | 1.00 | 1.00 | 1.00 | curl | 0.4× (best / best) | ratio ≥ 0.5 | **no** |" in md
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["scenarios"][0]["figures"][0]["value"] == 2.5
    assert Scenario.from_json(data["scenarios"][0]).get("cpu").stat == "min"


def test_direct_read_reads_the_whole_file(tmp_path: Path) -> None:
    from bench.workers import direct_read

    path = tmp_path / "f"
    path.write_bytes(os.urandom((3 << 20) + 123))
    try:
        _, n = direct_read(path, block=1 << 20)
    except OSError:  # a file system without O_DIRECT (tmpfs)
        pytest.skip("no O_DIRECT here")
    assert n == (3 << 20) + 123
