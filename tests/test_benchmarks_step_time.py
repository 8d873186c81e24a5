"""``benchmarks/step_time.py`` in ``--quick`` mode on the CPU: the script runs and reports every row.

These tests check the report's structure and the quantities that do not depend on the
machine (critical paths, saved-activation bytes), never how fast a method is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "step_time.py"
FAMILIES = ("transformer", "residual")
METHODS = ("backprop", "hbll-reference", "hbll-fused")
QUICK_BLOCKS = (4, 8)
TABLE_ROW = re.compile(r"^\| (\d+) \| ([\w-]+) \| ")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, str]:
    """Run the script once in quick mode and return its JSON report and its printed tables."""
    json_path = tmp_path_factory.mktemp("step_time") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1", "--json", str(json_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, f"step_time.py failed:\n{completed.stderr[-4000:]}"
    return json.loads(json_path.read_text()), completed.stdout


def _rows_by_key(report: dict) -> dict[tuple[str, int, str], dict]:
    return {(row["family"], row["num_blocks"], row["method"]): row for row in report["results"]}


def test_json_has_every_configuration(quick_run):
    report, _ = quick_run
    rows = _rows_by_key(report)
    expected = {(family, n, method) for family in FAMILIES for n in QUICK_BLOCKS for method in METHODS}
    assert set(rows) == expected
    assert len(report["results"]) == len(expected)


def test_step_times_are_positive(quick_run):
    report, _ = quick_run
    for row in report["results"]:
        key = (row["family"], row["num_blocks"], row["method"])
        assert row["status"] == "ok", key
        assert row["step_time_s"] > 0, key
        assert len(row["step_times_s"]) == report["settings"]["steps"], key
        assert all(t > 0 for t in row["step_times_s"]), key


def test_ratio_to_backprop_uses_same_family_and_n(quick_run):
    report, _ = quick_run
    rows = _rows_by_key(report)
    for (family, n, method), row in rows.items():
        expected = row["step_time_s"] / rows[(family, n, "backprop")]["step_time_s"]
        assert row["ratio_to_backprop"] == pytest.approx(expected), (family, n, method)


def test_critical_paths_are_integers(quick_run):
    report, _ = quick_run
    for row in report["results"]:
        assert isinstance(row["critical_path"], int), row
        assert row["critical_path"] > 0, row


def test_hbll_critical_path_below_backprop_at_n8(quick_run):
    report, _ = quick_run
    rows = _rows_by_key(report)
    for family in FAMILIES:
        backprop = rows[(family, 8, "backprop")]["critical_path"]
        assert backprop == 2 * 8 + 4, family
        for method in ("hbll-reference", "hbll-fused"):
            assert rows[(family, 8, method)]["critical_path"] < backprop, (family, method)


def test_backprop_saved_activations_grow_with_n(quick_run):
    report, _ = quick_run
    rows = _rows_by_key(report)
    for family in FAMILIES:
        small = rows[(family, 4, "backprop")]["saved_activation_bytes"]
        large = rows[(family, 8, "backprop")]["saved_activation_bytes"]
        assert small > 0, family
        assert large > small, family


def test_reference_node_saves_less_than_backprop(quick_run):
    # An HBLL node's local graph contains its own module and exit-head evaluations (and
    # the stem for nodes that start at 0), while backprop's one graph contains all N blocks.
    report, _ = quick_run
    rows = _rows_by_key(report)
    for family in FAMILIES:
        node = rows[(family, 8, "hbll-reference")]["largest_node_saved_bytes"]
        assert 0 < node < rows[(family, 8, "backprop")]["largest_node_saved_bytes"], family
        assert node < rows[(family, 8, "hbll-reference")]["saved_activation_bytes"], family
        assert rows[(family, 8, "hbll-fused")]["largest_node_saved_bytes"] is None, family


def test_growth_covers_every_family_and_method(quick_run):
    report, _ = quick_run
    growth = {(entry["family"], entry["method"]): entry for entry in report["growth"]}
    assert set(growth) == {(family, method) for family in FAMILIES for method in METHODS}
    for key, entry in growth.items():
        assert (entry["blocks_from"], entry["blocks_to"]) == QUICK_BLOCKS, key
        assert entry["growth"] > 0, key
        assert entry["target"] is None, key


def test_printed_tables_have_every_row(quick_run):
    _, stdout = quick_run
    assert stdout.startswith("Machine: ")
    assert "torch " in stdout.splitlines()[0]
    rows_by_family: dict[str, set[tuple[int, str]]] = {}
    family = None
    for line in stdout.splitlines():
        if line.startswith("### "):
            heading = line[4:].split(":")[0]
            family = heading if heading in FAMILIES else None
            continue
        match = TABLE_ROW.match(line)
        if family and match:
            rows_by_family.setdefault(family, set()).add((int(match.group(1)), match.group(2)))
    expected = {(n, method) for n in QUICK_BLOCKS for method in METHODS}
    assert set(rows_by_family) == set(FAMILIES)
    for family, rows in rows_by_family.items():
        assert rows == expected, family
    assert "saved activations, whole step (MiB)" in stdout
    assert "### Step time growth from N = 4 to N = 8" in stdout
