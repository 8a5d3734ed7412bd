"""The benchmark script still runs. Its figures are not checked here.

The machine is shared and noisy, so no test asserts a speed: the benchmark
reports ratios, and docs/benchmarks.md records a full run.
"""

import importlib.util
import subprocess
import sys

from conftest import ROOT

BENCH = ROOT / "bench" / "bench_store.py"


def load_bench_sizes():
    spec = importlib.util.spec_from_file_location("bench_store", str(BENCH))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SIZES


def expected_rows(sizes):
    """Return the (measure, messages) pairs the table must have, in order."""
    rows = [
        ("record_message ask (wal, synchronous=full)", sizes["record"]),
        ("record_message ask (wal, synchronous=normal)", sizes["record"]),
        ("record_message tell + trial rows (wal, synchronous=full)", sizes["record"]),
        ("record_message tell + trial rows (wal, synchronous=normal)", sizes["record"]),
    ]
    for count in sizes["replay"]:
        rows.append(("iter_replay speed", count))
        rows.append(("iter_replay peak memory", count))
    for count in sizes["update"]:
        rows.append(("--update (upgrade_file)", count))
    return rows


def test_bench_tiny_prints_every_row():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--size", "tiny"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert table[0].startswith("| measure | messages | aepsych_store | plain sqlite3 | ratio | target | met |")
    body = table[1:]
    expected = expected_rows(load_bench_sizes()["tiny"])
    assert len(body) == len(expected), result.stdout
    for line, (measure, count) in zip(body, expected):
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        assert cells[0] == measure, line
        assert cells[1] == "{:,}".format(count), line
        assert cells[4], "no ratio in: " + line
        assert cells[6] in ("yes", "no"), line
