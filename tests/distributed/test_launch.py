"""Multi-process Lightning runs: every launch path, checkpoints, resuming and failures.

Each test starts real gloo processes on 127.0.0.1: through the strategy's spawn launcher,
its default launcher (the script runs again per rank), ``torchrun`` and
``accelerate launch``. All of them must train the same parameters as one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from hbll.checkpoint import load_checkpoint
from tests.data_files import write_job_files
from tests.distributed.train_script import build_module, loader, make_trainer
from tests.distributed.workers import free_port

pytestmark = pytest.mark.multiprocess

SCRIPT = Path(__file__).with_name("train_script.py")
REPO = SCRIPT.parents[2]


def _parameters(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.model.named_parameters()}


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _depth_metrics(trainer) -> dict[str, float]:
    return {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/depth")}


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    module = build_module()
    trainer = make_trainer(str(tmp_path_factory.mktemp("one")), devices=1)
    trainer.fit(module, loader(), loader(32, 4))
    return _parameters(module), _depth_metrics(trainer)


@pytest.fixture
def one_process(one_process_run) -> dict[str, torch.Tensor]:
    return one_process_run[0]


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_strategy_flag_with_spawn_matches_one_process(one_process_run, tmp_path):
    parameters, metrics = one_process_run
    module = build_module()
    trainer = make_trainer(str(tmp_path), devices=2, start_method="spawn")
    trainer.fit(module, loader(), loader(32, 4))
    _assert_same(_parameters(module), parameters)
    # Validation ran every level cut on the gathered model.
    got = _depth_metrics(trainer)
    assert sorted(got) == sorted(metrics)
    assert len(metrics) == 2 * (module.model.depth + 1)
    for key, value in metrics.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key


def test_clipping_by_norm_matches_one_process(tmp_path):
    # A small threshold makes every step clip, by the norm of the whole model's gradient.
    reference = build_module()
    make_trainer(str(tmp_path / "one"), devices=1, gradient_clip_val=0.05).fit(reference, loader())
    module = build_module()
    make_trainer(str(tmp_path / "two"), devices=2, start_method="spawn", gradient_clip_val=0.05).fit(module, loader())
    _assert_same(_parameters(module), _parameters(reference))


@pytest.mark.parametrize(
    "method,devices,tree_groups", [("hbll", 4, 2), ("backprop", 2, None)], ids=["hbll-2x2-mesh", "backprop-data-parallel"]
)
def test_replicas_match_one_process_on_the_joint_batch(method, devices, tree_groups, tmp_path):
    # Each replica trains on batches of 8; together they form the batches of 16 that one
    # process trains on. Backprop runs as plain data parallelism over all ranks.
    replicas = devices // (tree_groups or 1) if method == "hbll" else devices
    module = build_module(method=method)
    trainer = make_trainer(str(tmp_path / "mesh"), devices=devices, tree_groups=tree_groups, start_method="spawn")
    trainer.fit(module, loader(16 // replicas, 20 * replicas))
    reference = build_module(method=method)
    make_trainer(str(tmp_path / "one"), devices=1).fit(reference, loader(16, 20))
    _assert_same(_parameters(module), _parameters(reference))


class CountValidationExamples(Callback):
    """Write the number of validation examples each rank evaluated to ``directory/rank{r}``."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.count = directory, 0

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.count += len(batch[0])

    def on_validation_end(self, trainer, module) -> None:
        self.directory.mkdir(exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}").write_text(str(self.count))


@pytest.mark.parametrize("stage,tree_groups", [("validate", 1), ("fit", None)], ids=["validate-2-replicas", "fit-tree-of-2"])
def test_evaluation_counts_each_example_once(stage, tree_groups, tmp_path):
    # 33 examples over 2 ranks, so a shard padded to equal size would repeat one example.
    # Evaluation splits the data over all ranks, including those of one tree group.
    def run(trainer):
        module = build_module()
        if stage == "fit":
            trainer.fit(module, loader(), loader(11, 3))
        else:
            trainer.validate(module, loader(11, 3))
        return _depth_metrics(trainer)

    expected = run(make_trainer(str(tmp_path / "one"), devices=1))
    trainer = make_trainer(str(tmp_path / "two"), devices=2, tree_groups=tree_groups, start_method="spawn")
    trainer.callbacks.append(CountValidationExamples(tmp_path / "counts"))
    got = run(trainer)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key
    counts = sorted(int(path.read_text()) for path in (tmp_path / "counts").iterdir())
    assert counts == [16, 17]


@pytest.mark.parametrize("launcher", ["script", "torchrun", "accelerate"])
def test_launch_paths_match_one_process(launcher, one_process, tmp_path):
    out = tmp_path / "parameters.pt"
    port = str(free_port())
    commands = {
        "script": [sys.executable, str(SCRIPT), str(out)],
        "torchrun": [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", port, str(SCRIPT), str(out),
        ],
        "accelerate": [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", port, str(SCRIPT), str(out),
        ],
    }
    result = _run(commands[launcher])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks = 1 replica × 2 ranks per tree" in result.stdout + result.stderr
    _assert_same(torch.load(out), one_process)


def test_checkpoint_holds_the_full_model_and_optimizer(one_process, tmp_path):
    module = build_module()
    make_trainer(str(tmp_path), devices=2, start_method="spawn").fit(module, loader())
    checkpoint = torch.load(tmp_path / "checkpoints" / "epoch=0-step=20.ckpt", weights_only=False)
    state = {name.removeprefix("model."): value for name, value in checkpoint["state_dict"].items()}
    _assert_same({name: state[name] for name in one_process}, one_process)
    optimizer = checkpoint["optimizer_states"][0]
    num_parameters = sum(len(group["params"]) for group in optimizer["param_groups"])
    assert num_parameters == len(list(module.parameters()))
    # Every trained parameter has its AdamW moments, whichever rank owned it.
    assert len(optimizer["state"]) == num_parameters
    assert not list((tmp_path / "checkpoints").glob("*partial*"))


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_on_a_different_number_of_processes(first, second, tmp_path):
    # The chained-exit buffer is not part of a checkpoint; without it a resumed run
    # continues exactly.
    reference = build_module(chained_exit_weight=0.0)
    make_trainer(str(tmp_path / "reference"), devices=1, max_steps=20).fit(reference, loader(16, 10))

    start = build_module(chained_exit_weight=0.0)
    make_trainer(str(tmp_path / "first"), devices=first, start_method="spawn", max_steps=10).fit(start, loader(16, 10))
    checkpoint = tmp_path / "first" / "checkpoints" / "epoch=0-step=10.ckpt"
    resumed = build_module(chained_exit_weight=0.0)
    trainer = make_trainer(str(tmp_path / "second"), devices=second, start_method="spawn", max_steps=20)
    trainer.fit(resumed, loader(16, 10), ckpt_path=str(checkpoint))
    _assert_same(_parameters(resumed), _parameters(reference))


def test_hbll_run_two_processes_match_one(tmp_path):
    # Lightning starts the second process by running the command line again. Each
    # process runs the whole job of two methods, and only rank 0 writes the output.
    # Both runs are subprocesses with one thread each, because the thread count changes
    # the rounding of convolutions.
    config, data_dir = write_job_files(tmp_path)
    command = [sys.executable, "-m", "hbll_lightning.cli", "run", "--config", str(config), "--data.init_args.data_dir", str(data_dir)]
    single_result = _run([*command, "--output_dir", str(tmp_path / "one")])
    assert single_result.returncode == 0, single_result.stderr[-3000:]
    result = _run([*command, "--output_dir", str(tmp_path / "two"), "--trainer.devices", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks = 1 replica × 2 ranks per tree" in result.stdout + result.stderr
    assert result.stdout.count("Results in") == 1

    assert not list(tmp_path.glob(".two.*"))
    single, double = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two"))
    assert list(double["methods"]) == ["hbll", "backprop"]
    # The tree of 2 ranks reads one batch per step, and backprop's 2 replicas read two.
    assert [double["methods"][m]["batches_per_step"] for m in ("hbll", "backprop")] == [1, 2]
    assert double["processes"] == 2
    for method in single["methods"]:
        for expected, got in zip(single["methods"][method]["test"], double["methods"][method]["test"]):
            assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    _assert_same(
        dict(load_checkpoint(tmp_path / "two" / "checkpoint").named_parameters()),
        dict(load_checkpoint(tmp_path / "one" / "checkpoint").named_parameters()),
    )


def _group_ends(group: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize("method_index", [1, 2], ids=["first-method", "second-method"])
def test_sigterm_stops_all_hbll_run_ranks(method_index, tmp_path):
    # A scheduler stops a job by signalling its main process. The ranks must stop after the
    # same step, also in the second method, whose trainer did not start rank 1 itself.
    config, data_dir = write_job_files(tmp_path)
    log = tmp_path / "log"
    command = [
        sys.executable, "-m", "hbll_lightning.cli", "run", "--config", str(config), "--data.init_args.data_dir",
        str(data_dir), "--output_dir", str(tmp_path / "out"), "--trainer.devices", "2",
        "--trainer.max_epochs", "500" if method_index == 1 else "30",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline:
            if log.read_text().count("HBLL tree-parallel") >= method_index:
                break
            time.sleep(0.2)
        time.sleep(1)
        assert process.poll() is None, log.read_text()[-3000:]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        assert _group_ends(process.pid, timeout=30), "rank 1 still runs after rank 0 stopped"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    text = log.read_text()
    assert "rank 1: received signal 15" in text
    assert "Traceback" not in text, text[-3000:]
    assert text.count("hbll: stopped by SIGTERM") == 1
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_failing_rank_stops_run(tmp_path):
    out = tmp_path / "parameters.pt"
    started = time.monotonic()
    result = _run([sys.executable, str(SCRIPT), str(out), "--fail-rank", "1", "--timeout", "20"], timeout=240)
    assert result.returncode != 0
    assert time.monotonic() - started < 200
    assert "injected failure on rank 1 at step 3" in result.stderr
    assert "another rank raised, died or timed out" in result.stderr
    assert not out.exists()
    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    assert not [path for path in checkpoints if "partial" in path.name]
    for path in checkpoints:
        torch.load(path, weights_only=False)
