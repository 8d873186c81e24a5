"""End-to-end tests of the `hbll` command on tiny Fashion-MNIST files in the real IDX format."""

import json
from pathlib import Path

import pytest
import torch

from hbll.checkpoint import load_checkpoint
from hbll_lightning.cli import main
from hbll_lightning.data import FashionMNISTDataModule
from tests.data_files import JOB_CONFIG, write_job_files


@pytest.fixture
def job_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_job_files(tmp_path)


def _run(config: Path, data_dir: Path, output_dir: Path, *extra: str) -> int:
    return main(["run", "--config", str(config), "--data.init_args.data_dir", str(data_dir), "--output_dir", str(output_dir), *extra])


def test_cli_run_writes_complete_output(job_files, tmp_path):
    config, data_dir = job_files
    output_dir = tmp_path / "out"
    assert _run(config, data_dir, output_dir) == 0

    assert {p.name for p in output_dir.iterdir()} >= {"report.json", "depth_vs_accuracy.png", "checkpoint", "hbll", "backprop"}
    assert not list(tmp_path.glob(".out.partial-*"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain.txt").write_text("")
    assert output_dir.stat().st_mode == (tmp_path / "plain").stat().st_mode
    assert (output_dir / "checkpoint" / "model.safetensors").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode
    report = json.loads((output_dir / "report.json").read_text())
    assert report["metric"] == "accuracy"
    assert report["processes"] == 1
    for method, critical_path in (("hbll", 2 + 5), ("backprop", 2 * 3 + 4)):
        result = report["methods"][method]
        assert [row["depth"] for row in result["test"]] == [0, 1, 2]
        assert [row["num_modules"] for row in result["test"]] == [1, 2, 3]
        assert all(0.0 <= row["accuracy"] <= 1.0 for row in result["test"])
        assert result["steps"] == 5  # 160 training images in batches of 32
        assert result["critical_path_per_step"] == critical_path
        assert result["wall_time_s"] > 0


def test_cli_run_checkpoint_reproduces_report(job_files, tmp_path):
    config, data_dir = job_files
    output_dir = tmp_path / "out"
    _run(config, data_dir, output_dir, "--methods", "[hbll]")
    report = json.loads((output_dir / "report.json").read_text())
    saved = json.loads((output_dir / "checkpoint" / "hbll_config.json").read_text())
    assert saved["tree"]["num_blocks"] == 3
    assert saved["tree"]["level_cuts"] == [[[0, 3]], [[0, 1], [1, 3]], [[0, 1], [1, 2], [2, 3]]]

    model = load_checkpoint(output_dir / "checkpoint").eval()
    data = FashionMNISTDataModule(data_dir=str(data_dir), batch_size=32, val_size=40)
    data.setup("test")
    x, y = data.test_set.tensors
    with torch.no_grad():
        for row in report["methods"]["hbll"]["test"]:
            accuracy = (model(x, depth=row["depth"]).argmax(-1) == y).float().mean().item()
            assert accuracy == pytest.approx(row["accuracy"], abs=1e-6)


def test_cli_run_nonempty_output_dir_is_kept(job_files, tmp_path, capsys):
    config, data_dir = job_files
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("keep me")
    assert _run(config, data_dir, output_dir) == 2
    assert "is not empty; pass --overwrite true" in capsys.readouterr().err
    assert (output_dir / "notes.txt").read_text() == "keep me"


def test_cli_run_overwrite_replaces_previous_run(job_files, tmp_path):
    config, data_dir = job_files
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "old.txt").write_text("previous run")
    assert _run(config, data_dir, output_dir, "--methods", "[backprop]", "--overwrite", "true") == 0
    assert not (output_dir / "old.txt").exists()
    assert (output_dir / "report.json").is_file()
    assert not list(tmp_path.glob(".out.*"))


def test_cli_run_failure_leaves_no_output(job_files, tmp_path, capsys):
    config, _ = job_files
    output_dir = tmp_path / "out"
    assert _run(config, tmp_path / "missing-dir", output_dir) == 2
    assert "missing-dir" in capsys.readouterr().err
    assert not output_dir.exists()
    assert not list(tmp_path.glob(".out.*"))


def test_cli_unknown_config_key_names_key_and_fix(job_files, tmp_path, capsys):
    config, data_dir = job_files
    config.write_text(JOB_CONFIG.replace("  lr: 0.01", "  lr: 0.01\n  learning_rat: 0.1"))
    assert _run(config, data_dir, tmp_path / "out") == 2
    message = capsys.readouterr().err
    assert "learning_rat" in message
    assert "Fix the key's spelling or remove it" in message
    assert not (tmp_path / "out").exists()


def test_cli_abbreviated_key_is_rejected(job_files, tmp_path, capsys):
    config, data_dir = job_files
    assert _run(config, data_dir, tmp_path / "out", "--smok", "true") == 2
    assert "--smok" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_smoke_caps_warmup(job_files, tmp_path):
    config, data_dir = job_files
    config.write_text(JOB_CONFIG.replace("  lr: 0.01", "  lr: 0.01\n  warmup_steps: 500"))
    _run(config, data_dir, tmp_path / "out", "--smoke", "true", "--methods", "[hbll]")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["smoke"] is True
    assert report["methods"]["hbll"]["hparams"]["warmup_steps"] == 5


def test_cli_unknown_method_names_choices(job_files, tmp_path, capsys):
    config, data_dir = job_files
    assert _run(config, data_dir, tmp_path / "out", "--methods", "[sgd]") == 2
    assert "methods: method must be 'hbll', 'backprop' or 'tbptt<k>'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_empty_methods_are_rejected(job_files, tmp_path, capsys):
    config, data_dir = job_files
    assert _run(config, data_dir, tmp_path / "out", "--methods", "[]") == 2
    assert "methods must be a non-empty list" in capsys.readouterr().err


def test_cli_unseeded_run_is_rejected(job_files, tmp_path, capsys):
    config, data_dir = job_files
    assert _run(config, data_dir, tmp_path / "out", "--seed_everything", "false") == 2
    assert "seed_everything is false" in capsys.readouterr().err


def test_cli_fit_subcommand_trains(job_files, tmp_path):
    config, data_dir = job_files
    code = main(["fit", "--config", str(config), "--data.init_args.data_dir", str(data_dir), "--trainer.default_root_dir", str(tmp_path / "fit"), "--trainer.max_steps", "2"])
    assert code == 0


def test_cli_help_lists_run(capsys):
    assert main(["--help"]) == 0
    assert "hbll run --config CONFIG" in capsys.readouterr().out


def test_cli_run_rejects_spawn_start(job_files, tmp_path, capsys):
    config, data_dir = job_files
    code = _run(config, data_dir, tmp_path / "out", "--trainer.devices", "2", "--trainer.strategy", "hbll_spawn")
    assert code == 2
    assert "start method 'spawn' runs only the training function" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_run_rejects_multiprocess_recurrent_net(tmp_path, capsys):
    # The check runs before Lightning starts a second process, so it needs none.
    config = Path(__file__).parents[2] / "configs" / "shakespeare_rnn.yaml"
    code = main(["run", "--config", str(config), "--smoke", "true", "--trainer.devices", "2", "--output_dir", str(tmp_path / "out")])
    assert code == 2
    assert "trains a recurrent network in one process" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
