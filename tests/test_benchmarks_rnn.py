"""``benchmarks/rnn.py`` on tiny settings: every subcommand runs and reports its rows.

The checks cover the report's structure and the machine-independent critical paths,
never how fast or how accurate a method is.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "rnn.py"


def run_script(tmp_path: Path, *arguments: str) -> tuple[dict, str]:
    json_path = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments, "--json", str(json_path)],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, f"rnn.py failed:\n{completed.stderr[-4000:]}"
    return json.loads(json_path.read_text()), completed.stdout


def test_step_time_reports_every_length_and_method(tmp_path):
    report, printed = run_script(
        tmp_path, "step-time", "--lengths", "8", "32", "--repeats", "1", "--warmup", "0", "--hidden-size", "16",
        "--embedding-dim", "8", "--batch-size", "4",
    )
    rows = {(row["length"], row["method"]): row for row in report["rows"]}
    assert set(rows) == {(t, m) for t in (8, 32) for m in ("hbll", "backprop", "tbptt16", "tbptt32")}
    for length in (8, 32):
        assert rows[(length, "hbll")]["critical_path"] == math.ceil(math.log2(length)) + 6
        assert rows[(length, "backprop")]["critical_path"] == 2 * length + 4
        assert rows[(length, "backprop")]["ratio_to_bptt"] == 1.0
    assert rows[(32, "tbptt16")]["critical_path"] == 32 + 16 + 4
    assert "| 32 | hbll |" in printed


def test_copy_task_reports_every_variant(tmp_path):
    report, printed = run_script(
        tmp_path, "copy-task", "--lags", "1", "--lookaheads", "0", "1", "--train-steps", "3", "--length", "8",
    )
    variants = [(row["method"], row["lookahead"], row["sweeps"]) for row in report["rows"]]
    assert variants == [("backprop", 0, 0), ("hbll", 0, 0), ("hbll", 0, 8), ("hbll", 1, 0), ("hbll", 1, 8)]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in report["rows"])
    assert "| 1 | hbll | 1 | 8 |" in printed


JOB = """\
seed_everything: 0
methods: [hbll]
model:
  network:
    class_path: hbll.networks.CharRNN
    init_args: {{max_steps: 16, embedding_dim: 8, hidden_size: 16}}
data:
  class_path: hbll_lightning.data.LMDataModule
  init_args: {{corpus: files, data_files: [{corpus}], tokenizer: char, block_size: 16, batch_size: 8, val_fraction: 0.3, test_fraction: 0.1}}
trainer:
  accelerator: cpu
  max_steps: 3
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
"""


def test_inference_reports_every_path_and_sweep(tmp_path, monkeypatch):
    import datasets

    from hbll_lightning.cli import main

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Now is the winter of our discontent, number {i}, made glorious summer." for i in range(60)))
    config = tmp_path / "job.yaml"
    config.write_text(JOB.format(corpus=corpus))
    assert main(["run", "--config", str(config), "--output_dir", str(tmp_path / "out")]) == 0

    report, printed = run_script(
        tmp_path, "inference", "--checkpoint", str(tmp_path / "out" / "checkpoint"), "--config", str(config),
        "--horizons", "16", "40", "--sequences", "2", "--continuation", "8", "--sweeps", "0", "15",
    )
    paths = [(row["horizon"], row["path"]) for row in report["rows"]]
    tree_paths = [f"tree depth {depth}" for depth in range(5)]
    assert paths == [(h, p) for h in (16, 40) for p in ("exact", *tree_paths, "initial state")]
    rows = {(row["horizon"], row["path"]): row for row in report["rows"]}
    assert rows[(16, "exact")]["relative_error"] == 0.0
    assert rows[(16, "tree depth 4")]["relative_error"] < 1e-5
    # 40 steps are windows of 16, 16 and 8 steps: one root evaluation each at depth 0.
    assert rows[(40, "tree depth 0")]["evaluations"] == 3
    assert rows[(40, "tree depth 4")]["evaluations"] == 40
    sweeps = {row["sweeps"]: row for row in report["sweeps"]}
    assert sweeps[15]["mean_relative_error"] < 1e-5
    assert sweeps[0]["rounds"] == 4 + 0 + 1
    assert "| 40 | tree depth 0 | 3 |" in printed
