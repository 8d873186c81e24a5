"""The ``hbll`` command.

- ``hbll run --config configs/fashion_mnist.yaml`` trains every method listed in the
  config on the same network, data and budget, then writes the report, the plot and the
  HBLL checkpoint to ``output_dir``.
- ``hbll fit|validate|test|predict --config ...`` are LightningCLI's own subcommands for
  a single run.

Both read the same YAML: ``model`` (``HBLLModule`` arguments), ``data`` (a datamodule
``class_path``), ``trainer`` and the job keys ``output_dir``, ``methods``, ``smoke`` and
``overwrite``.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Callable, Optional

from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from hbll_lightning.data.idx import DataFormatError
from hbll_lightning.module import HBLLModule
from hbll_lightning.strategy import ProcessLayoutError  # importing it registers strategy="hbll"

__all__ = ["HBLLCLI", "main"]

# Trainer limits that `--smoke true` applies: a run of about a minute on 2 CPU cores.
SMOKE_TRAINER_LIMITS = {
    "max_epochs": 1,
    "max_steps": -1,
    "limit_train_batches": 30,
    "limit_val_batches": 2,
    "limit_test_batches": 10,
    "val_check_interval": None,
}
SMOKE_WARMUP_STEPS = 5


class HBLLCLI(LightningCLI):
    """LightningCLI for ``HBLLModule`` with any datamodule and the job keys of ``hbll run``.

    ``before_instantiate`` lets ``hbll run`` adjust the parsed config (method, output
    directory) before the trainer, model and data are built.
    """

    def __init__(self, *args, before_instantiate: Optional[Callable[["HBLLCLI"], None]] = None, **kwargs) -> None:
        self._before_instantiate = before_instantiate
        kwargs.setdefault("model_class", HBLLModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        # Parse errors raise instead of exiting, so main() can add the fix to the message,
        # and abbreviated keys are errors rather than silent prefix matches.
        strict = {"exit_on_error": False, "allow_abbrev": False}
        parser_kwargs = {"prog": "hbll run" if kwargs.get("run") is False else "hbll", **strict}
        parser_kwargs.update({name: dict(strict) for name in self.subcommands()})
        kwargs.setdefault("parser_kwargs", parser_kwargs)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str, default="outputs/run", help="directory that receives the report, plot and checkpoint of `hbll run`")
        parser.add_argument("--methods", type=list[str], default=["hbll", "backprop"], help="methods that `hbll run` trains, in order: hbll, backprop")
        parser.add_argument("--smoke", type=bool, default=False, help="cap the run at a few batches to check that it works end to end")
        parser.add_argument("--overwrite", type=bool, default=False, help="let `hbll run` replace an output_dir that contains a previous run")
        # HBLLStrategy runs every method of HBLLModule in one process or several. Lightning's
        # own default for devices > 1 is DDP, which cannot train the tree in parallel.
        parser.set_defaults({"trainer.strategy": "hbll"})

    def parse_arguments(self, parser, args) -> None:
        if args is None:
            return super().parse_arguments(parser, args)
        # `hbll` passes the command line as ``args``, and Lightning warns when sys.argv also
        # contains arguments, so the parse runs with an empty one. The process keeps its
        # argv, because Lightning runs it again to start each extra process.
        saved_argv = sys.argv
        sys.argv = sys.argv[:1]
        try:
            super().parse_arguments(parser, args)
        finally:
            sys.argv = saved_argv

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.smoke:
            for key, value in SMOKE_TRAINER_LIMITS.items():
                config.trainer[key] = value
            # A warm-up longer than the smoke run would keep the learning rate near zero.
            config.model.warmup_steps = min(config.model.warmup_steps, SMOKE_WARMUP_STEPS)
        if self._before_instantiate is not None:
            self._before_instantiate(self)


def _print_usage() -> None:
    print(
        "usage: hbll run --config CONFIG [--key value ...]\n"
        "       hbll {fit,validate,test,predict} --config CONFIG [--key value ...]\n\n"
        "run       train every method in the config (HBLL and backprop) on the same network and\n"
        "          budget, and write report.json, depth_vs_accuracy.png and the HBLL checkpoint\n"
        "fit ...   LightningCLI subcommands for a single run; see `hbll fit --help`\n\n"
        "Add --smoke true to cap a run at a few batches. Configs live in configs/."
    )


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        _print_usage()
        return 0
    from hbll_lightning.job import JobConfigError, run_job

    try:
        if argv[0] == "run":
            run_job(argv[1:])
        else:
            HBLLCLI(args=argv)
    except (FileExistsError, FileNotFoundError, DataFormatError, JobConfigError, ProcessLayoutError) as error:
        print(f"hbll: {error}", file=sys.stderr)
        return 2
    except SIGTERMException:
        # Lightning stops every process after the current step and raises SystemExit
        # without a code, which would exit with 0.
        if rank_zero_only.rank == 0:
            print("hbll: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except ArgumentError as error:
        help_command = "hbll run --help" if argv[0] == "run" else f"hbll {argv[0]} --help"
        print(
            f"hbll: invalid configuration: {error}\n"
            f"Fix the key's spelling or remove it; `{help_command}` lists every accepted key.",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
