"""``hbll run``: train HBLL and the backprop baseline on one config and report every depth.

Every method gets the same network spec, data, seed and trainer budget. The output
directory receives ``report.json``, a depth-versus-metric plot and the HBLL checkpoint.
All files are written into a staging directory next to ``output_dir`` and moved into
place at the end, so ``output_dir`` contains either a complete run or nothing of this run.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from hbll.checkpoint import apply_umask, save_checkpoint
from hbll.recurrent import parse_method
from hbll_lightning.cli import HBLLCLI
from hbll_lightning.module import HBLLModule
from hbll_lightning.plots import plot_depth_metric
from hbll_lightning.strategy import check_process_count

__all__ = ["run_job", "JobConfigError", "REPORT_NAME"]

logger = logging.getLogger(__name__)

REPORT_NAME = "report.json"


class JobConfigError(ValueError):
    """An invalid value of a job key of ``hbll run`` (methods, seed_everything)."""


class _ComparisonJob:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.seed: Optional[int] = None
        self.methods: list[str] = []
        self.output_dir: Optional[Path] = None
        self.overwrite = False
        self.staging: Optional[Path] = None
        self.method = ""
        # With several processes every one runs the whole job, but only global rank 0 writes.
        self.is_main = True

    def configure(self, cli: HBLLCLI) -> None:
        """Set the method, seed and log directory of one run before LightningCLI builds it."""
        config = cli.config
        if self.staging is None:
            self._prepare_output(config)
        config.model.method = self.method
        config.trainer.default_root_dir = str(self.staging / self.method)
        config.trainer.enable_checkpointing = False

    def _prepare_output(self, config: Any) -> None:
        methods = list(config.methods)
        if not methods:
            raise JobConfigError("methods must be a non-empty list of 'hbll', 'backprop' and 'tbptt<k>', got []")
        for method in methods:
            try:
                parse_method(method)
            except ValueError as error:
                raise JobConfigError(f"methods: {error}") from None
        self.methods = methods
        self.method = methods[0]
        if config.seed_everything is False:
            raise JobConfigError(
                "seed_everything is false, but hbll run seeds every method alike so they start from "
                "the same weights; set seed_everything to an int or true"
            )
        self.seed = int(config.seed_everything)
        self.overwrite = bool(config.overwrite)
        self.output_dir = Path(config.output_dir).resolve()
        if self.output_dir.exists() and any(self.output_dir.iterdir()) and not self.overwrite:
            raise FileExistsError(
                f"output_dir {self.output_dir} is not empty; pass --overwrite true to replace it "
                "or choose another --output_dir"
            )
        self.output_dir.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.output_dir.name}.partial-", dir=self.output_dir.parent))
        # mkdtemp creates the directory for its owner only.
        apply_umask(self.staging)

    def run(self) -> dict:
        try:
            report = self._run_methods()
            if self.is_main:
                self._publish()
        except BaseException:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
            raise
        if not self.is_main:
            # Lightning writes logs and files from global rank 0 only, so the other
            # processes' staging directories contain nothing of the run.
            shutil.rmtree(self.staging, ignore_errors=True)
        return report

    def _run_methods(self) -> dict:
        report: dict[str, Any] = {"methods": {}}
        cli = HBLLCLI(args=list(self.argv), run=False, before_instantiate=self.configure)
        report.update(self._describe_run(cli))
        report["methods"][self.method] = self._train_and_test(cli)
        # Data-dependent network arguments, such as vocab_size, are known after fit.
        report["network"] = cli.model.network.config()
        # Later methods reuse the first run's seed, so they start from the same weights and
        # see the same batches.
        for method in self.methods[1:]:
            self.method = method
            cli = HBLLCLI(args=[*self.argv, f"--seed_everything={self.seed}"], run=False, before_instantiate=self.configure)
            report["methods"][method] = self._train_and_test(cli)

        metric = cli.model.network.metric or ("perplexity" if report["task"] == "language_modeling" else "accuracy")
        report["metric"] = metric
        if self.is_main:
            (self.staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
            plot_depth_metric(report, self.staging / f"depth_vs_{metric}.png")
            print(format_report(report))
        return report

    def _describe_run(self, cli: HBLLCLI) -> dict:
        module: HBLLModule = cli.model
        return {
            "task": module.task,
            "seed": self.seed,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "torch_threads": torch.get_num_threads(),
            "processes": cli.trainer.num_devices * cli.trainer.num_nodes,
            "network": module.network.config(),
            "data": {"class_path": type(cli.datamodule).__qualname__},
            "trainer": {
                key: cli.config.trainer.get(key)
                for key in (
                    "max_epochs", "max_steps", "limit_train_batches", "limit_val_batches", "limit_test_batches", "accelerator"
                )
            },
            "smoke": bool(cli.config.smoke),
        }

    @staticmethod
    def _check_processes(cli: HBLLCLI) -> None:
        # Both checks run before Lightning starts any extra process.
        processes = cli.trainer.num_devices * cli.trainer.num_nodes
        check_process_count(cli.model, processes)
        start_method = getattr(cli.trainer.strategy, "_start_method", "popen")
        if processes > 1 and start_method != "popen":
            raise JobConfigError(
                f"hbll run needs every process to run the whole job, but start method {start_method!r} runs only "
                "the training function in the extra processes; use the default strategy 'hbll', or start the "
                "processes with torchrun"
            )

    def _train_and_test(self, cli: HBLLCLI) -> dict:
        module: HBLLModule = cli.model
        self._check_processes(cli)
        logger.info("training %s", self.method)
        start = time.perf_counter()
        cli.trainer.fit(module, datamodule=cli.datamodule)
        wall_time = time.perf_counter() - start
        # The ranks are known once fit has set up the processes.
        self.is_main = cli.trainer.is_global_zero
        # The last validation of fit ran on the final weights; read it before testing.
        val_metrics = module.depth_metrics("val")
        cli.trainer.test(module, datamodule=cli.datamodule, verbose=False)

        result = {
            "val": val_metrics,
            "test": module.depth_metrics("test"),
            "wall_time_s": round(wall_time, 2),
            "steps": cli.trainer.global_step,
            # Backprop on P processes is data parallel, so its step reads P batches where an
            # HBLL tree over the same processes reads one.
            "batches_per_step": getattr(cli.trainer.strategy, "data_replicas", 1),
            "step_time_s": module.mean_step_time(),
            "critical_path_per_step": module.last_critical_path,
            "num_blocks": module.model.num_blocks,
            "tree_depth": module.model.depth,
            "hparams": {k: v for k, v in module.hparams.items()},
        }
        if self.method == "hbll" and self.is_main:
            save_checkpoint(module.model, self.staging / "checkpoint", module.network, {"hparams": result["hparams"]})
        return result

    def _publish(self) -> None:
        # Swap the finished staging directory into place; a replaced run is removed only
        # after the new one is in place.
        previous = None
        if self.output_dir.exists():
            previous = self.output_dir.with_name(f".{self.output_dir.name}.replaced-{os.getpid()}")
            self.output_dir.rename(previous)
        self.staging.rename(self.output_dir)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        logger.info("wrote %s", self.output_dir)
        print(f"Results in {self.output_dir}")


def format_report(report: dict) -> str:
    """Render the per-depth test metric of every method as a Markdown table."""
    metric = report["metric"]
    methods = list(report["methods"])
    rows = report["methods"][methods[0]]["test"]
    header = "| network (modules) | " + " | ".join(f"{m} {metric}" for m in methods) + " |"
    lines = [header, "|" + "---|" * (len(methods) + 1)]
    for i, row in enumerate(rows):
        cells = []
        for method in methods:
            value = report["methods"][method]["test"][i].get(metric)
            if value is None:
                cells.append("n/a")
            elif metric == "accuracy":
                cells.append(f"{100 * value:.2f}%")
            else:
                cells.append(f"{value:.2f}")
        if "path" in row:
            label = f"{row['path']} path ({row['num_modules']} sequential evaluations)"
        else:
            label = f"depth {row['depth']} ({row['num_modules']})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| method | wall time (s) | steps | batches per step | time per step (s) | critical path per step |")
    lines.append("|---|---|---|---|---|---|")
    for method in methods:
        r = report["methods"][method]
        step_time = r.get("step_time_s")
        step_cell = "n/a" if step_time is None else f"{step_time:.4f}"
        lines.append(
            f"| {method} | {r['wall_time_s']:.1f} | {r['steps']} | {r.get('batches_per_step', 1)} | {step_cell} "
            f"| {r['critical_path_per_step']} |"
        )
    return "\n".join(lines)


def run_job(argv: list[str]) -> dict:
    """Run ``hbll run`` with the given command-line arguments and return the report.

    With ``devices > 1`` Lightning starts the other processes by running this process's
    command line again, so each process runs the whole job in step with the others.
    """
    return _ComparisonJob(argv).run()
