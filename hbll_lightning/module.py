"""``HBLLModule``: a LightningModule that trains an ``HBLLModel`` with the local objectives."""

from __future__ import annotations

import math
import time
from typing import Any, Literal, Optional, Sequence

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric

from hbll.distributed import TreeParallel
from hbll.engine import BackpropEngine, NodeComm, ReferenceEngine, StepResult, build_engine
from hbll.model import ExitHeadPolicy, HBLLModel
from hbll.networks import NetworkSpec, Task
from hbll.objectives import ObjectiveConfig
from hbll.optim import level_param_groups
from hbll.recurrent import RecurrentHBLL, build_recurrent_engine, parse_method
from hbll.tree import Tree

__all__ = ["HBLLModule", "ModulesSpec", "PrebuiltModel"]

# "hbll", "backprop", or "tbptt<k>" (truncated backprop through time, recurrent networks only).
Method = str
# The evaluated networks of a recurrent model: the cell step by step, and the tree's estimates.
RECURRENT_PATHS = ("sequential", "tree")


class ModulesSpec(NetworkSpec):
    """A network spec around a stem, blocks and head that the user already built."""

    def __init__(self, stem: nn.Module, blocks: Sequence[nn.Module], head: nn.Module, task: Task = "classification") -> None:
        super().__init__(len(blocks))
        self.modules = (stem, list(blocks), head)
        self.task = task

    def build(self) -> tuple[nn.Module, list[nn.Module], nn.Module]:
        return self.modules

    def config(self) -> dict:
        return {"class_path": None, "num_blocks": self.num_blocks, "task": self.task}


class PrebuiltModel(NetworkSpec):
    """A network spec around an ``HBLLModel`` that the user already built."""

    def __init__(self, model: HBLLModel, task: Task = "classification") -> None:
        super().__init__(model.num_blocks)
        self.model = model
        self.task = task

    def build_model(self, exit_heads: Optional[ExitHeadPolicy] = None, **kwargs: Any) -> HBLLModel:
        if exit_heads is not None and exit_heads != self.model.exit_head_policy:
            raise ValueError(
                f"exit_heads={exit_heads!r} conflicts with the given model, which was built with "
                f"exit_heads={self.model.exit_head_policy!r}; leave exit_heads unset"
            )
        return self.model

    def config(self) -> dict:
        return {"class_path": None, "num_blocks": self.num_blocks, "task": self.task}


class HBLLModule(LightningModule):
    """Train a network with HBLL's local objectives, or with backprop as the baseline.

    Args:
        network: the spec that builds ``(stem, blocks, head)``.
        method: ``"hbll"`` trains every tree node on its local objective; ``"backprop"``
            trains the full network end to end with the same architecture (for a
            recurrent network, backprop through time); ``"tbptt<k>"``, such as
            ``"tbptt16"``, is truncated backprop through time over k steps.
        exit_heads: the exit-head policy; ``None`` takes the network's default.
        exit_weight, consistency_weight, consistency_lambda, init_sigma, learn_sigma,
            consistency_weight_final, consistency_lambda_final: the local objective and
            its schedules (see ``hbll.ObjectiveConfig``).
        consistency_sweeps, sweeps_from, chain_length, chained_exit_weight,
            chained_exit_trains_head: the leaf-input options of ``hbll.ReferenceEngine``:
            K Jacobi sweeps, the fraction of training from which they run, the leaves
            trained on chained inputs per step, the weight of the exit term on pipelined
            chained inputs, and whether that term trains the final head. A recurrent
            network takes the sweeps only, and ignores the chained exits.
        lr: peak learning rate of AdamW.
        level_lr_scale: the learning rate of a tree node at level ℓ is
            ``lr * level_lr_scale ** ℓ`` (see ``hbll.level_param_groups``).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        lr_schedule: ``"cosine"`` decays to zero over the run, ``"constant"`` keeps ``lr``.
        engine: how an HBLL step runs (see ``hbll.build_engine``): ``"fused"`` batches the
            module calls of each round, ``"reference"`` runs them one at a time, ``"auto"``
            batches on CUDA devices only.
        lookahead_weight: for a recurrent network with lookahead heads, the weight of
            their losses (see ``hbll.recurrent.RecurrentEngine``).

    Validation and test report the loss at every level cut, plus the accuracy
    (classification) or the perplexity (language modelling), as ``val/depth{ℓ}/...``.
    A recurrent network (a spec with ``recurrent = True``, such as ``hbll.networks.CharRNN``)
    reports two paths instead: ``val/sequential/...``, the cell run step by step as an
    ordinary RNN, and ``val/tree/...``, every step's state estimated by the tree
    messages and ``consistency_sweeps`` sweeps in ``L + K + 1`` rounds. Language models
    also report ``bits_per_char`` when the network's metric says so. ``mean_step_time()``
    returns the mean wall time of a training step.
    """

    def __init__(
        self,
        network: NetworkSpec,
        method: Method = "hbll",
        exit_heads: Optional[ExitHeadPolicy] = None,
        exit_weight: float = 1.0,
        consistency_weight: float = 0.3,
        consistency_lambda: float = 1.0,
        init_sigma: float = 1.0,
        learn_sigma: bool = True,
        consistency_weight_final: Optional[float] = None,
        consistency_lambda_final: Optional[float] = None,
        consistency_sweeps: int = 0,
        sweeps_from: float = 0.0,
        chain_length: int = 0,
        chained_exit_weight: float = 3.0,
        chained_exit_trains_head: bool = True,
        lr: float = 2e-3,
        level_lr_scale: float = 1.0,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        engine: Literal["auto", "fused", "reference"] = "auto",
        lookahead_weight: float = 1.0,
    ) -> None:
        super().__init__()
        _, truncation = parse_method(method)
        self.recurrent = bool(getattr(network, "recurrent", False))
        if truncation is not None and not self.recurrent:
            raise ValueError(
                f"method {method!r} is truncated backprop through time, which needs a recurrent network "
                f"such as hbll.networks.CharRNN; {type(network).__name__} is not one"
            )
        if self.recurrent and chain_length:
            raise ValueError("chain_length applies to block trunks; a recurrent network takes consistency_sweeps instead")
        if self.recurrent and level_lr_scale != 1.0:
            raise ValueError("level_lr_scale applies to block trunks; a recurrent network trains at one lr")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        self.save_hyperparameters(ignore=["network"])
        self.network = network
        self.method = method
        self.task = network.task
        self.objective = ObjectiveConfig(
            exit_weight=exit_weight,
            consistency_weight=consistency_weight,
            consistency_lambda=consistency_lambda,
            init_sigma=init_sigma,
            learn_sigma=learn_sigma,
            consistency_weight_final=consistency_weight_final,
            consistency_lambda_final=consistency_lambda_final,
        )
        self.engine = self.build_engine()
        self.last_critical_path: Optional[int] = None
        self._step_started: Optional[float] = None
        self._step_times: list[float] = []

        # A network with data-dependent arguments left as None (such as vocab_size) is
        # built in setup(), once the datamodule is known.
        self.model: Optional[HBLLModel | RecurrentHBLL] = None
        if not network.missing_arguments():
            self._build_model()
        depths = range(len(RECURRENT_PATHS) if self.recurrent else Tree(network.num_blocks).depth + 1)
        self.eval_loss = nn.ModuleList(MeanMetric() for _ in depths)
        self.eval_accuracy = nn.ModuleList(MeanMetric() for _ in depths)

    def _build_model(self) -> None:
        hp = self.hparams
        self.model = self.network.build_model(hp.exit_heads, init_sigma=hp.init_sigma, learn_sigma=hp.learn_sigma)

    def setup(self, stage: str) -> None:
        if self.model is not None:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError(
                f"network arguments {self.network.missing_arguments()} are None and the trainer has no "
                "datamodule to read them from; set them in the network spec or pass datamodule=... to the trainer"
            )
        self.network.fill_from_data(datamodule)
        self._build_model()

    @classmethod
    def from_modules(
        cls, stem: nn.Module, blocks: Sequence[nn.Module], head: nn.Module, task: Task = "classification", **kwargs: Any
    ) -> "HBLLModule":
        """Build the module from a stem, blocks and head you already have."""
        return cls(ModulesSpec(stem, blocks, head, task), **kwargs)

    @classmethod
    def from_model(cls, model: HBLLModel, task: Task = "classification", **kwargs: Any) -> "HBLLModule":
        """Train an ``HBLLModel`` you already built; its σ settings and exit heads are kept."""
        return cls(PrebuiltModel(model, task), **kwargs)

    def build_engine(self, comm: Optional[NodeComm] = None) -> ReferenceEngine | BackpropEngine:
        """Return the engine for this module's method and objective.

        ``comm`` places the nodes on processes (see ``hbll.distributed``); by default all
        of them are in this one.
        """
        hp = self.hparams
        if self.recurrent:
            if comm is not None:
                raise NotImplementedError(
                    "a recurrent network trains in one process: its leaves share one cell, so the tree "
                    "over time does not split across processes; run with devices=1"
                )
            return build_recurrent_engine(
                self.method,
                self.objective,
                consistency_sweeps=hp.consistency_sweeps,
                sweeps_from=hp.sweeps_from,
                lookahead_weight=hp.get("lookahead_weight", 1.0),
            )
        return build_engine(
            self.method,
            self.objective,
            consistency_sweeps=hp.consistency_sweeps,
            sweeps_from=hp.sweeps_from,
            chain_length=hp.chain_length,
            chained_exit_weight=hp.chained_exit_weight,
            chained_exit_trains_head=hp.chained_exit_trains_head,
            engine=hp.get("engine", "auto"),
            comm=comm,
        )

    def forward(self, x: torch.Tensor, depth: Optional[int] = None) -> torch.Tensor:
        if self.recurrent:
            if depth is not None:
                raise ValueError("a recurrent network runs step by step; read coarse states with model.cut_state(x, depth)")
            return self.model(x)
        return self.model(x, depth=depth)

    # Training -------------------------------------------------------------------------

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.run_engine_step(self.engine, batch)

    def run_engine_step(
        self,
        engine: ReferenceEngine | BackpropEngine,
        batch: tuple[torch.Tensor, torch.Tensor],
        parallel: Optional[TreeParallel] = None,
    ) -> torch.Tensor:
        """Compute one step's loss with ``engine`` and log it; the caller runs backward.

        With ``parallel``, the returned loss covers this rank's nodes, and the logged loss
        and node losses are those of the whole tree.
        """
        x, y = batch
        result = engine.compute_losses(self.model, x, y, self.training_progress())
        self.last_critical_path = result.critical_path
        self._log_step(result, x.shape[0], parallel)
        return result.loss

    def training_progress(self) -> float:
        """Return the fraction of training done, from 0 to 1, which drives the schedules.

        Without a trainer, or with no known length of training, it is 1: the schedules
        sit at their final values.
        """
        if self._trainer is None:
            return 1.0
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 1:
            return 1.0
        return min(self.global_step / (total - 1), 1.0)

    def _log_step(self, result: StepResult, batch_size: int, parallel: Optional[TreeParallel]) -> None:
        loss = parallel.total_loss(result.loss) if parallel is not None else result.loss.detach()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/critical_path", float(result.critical_path), batch_size=batch_size)
        # Per-node values are many scalars, so they go out only on logging steps.
        log_every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if self.global_step % max(log_every, 1):
            return
        node_losses = parallel.gather_node_losses(result.node_losses) if parallel is not None else result.node_losses
        node_values = {
            f"train/node/{name}/{part}": value
            for name, parts in node_losses.items()
            for part, value in parts.items()
        }
        self.log_dict(node_values, batch_size=batch_size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning calls this after the optimizer step, so the time covers the whole step.
        if self._step_started is not None:
            self._step_times.append(time.perf_counter() - self._step_started)
            self._step_started = None

    def mean_step_time(self, skip: int = 5) -> Optional[float]:
        """Return the mean wall time of a training step, leaving out the first ``skip`` (warm-up) steps."""
        times = self._step_times[skip:] if len(self._step_times) > skip else self._step_times
        return sum(times) / len(times) if times else None

    def configure_optimizers(self) -> dict:
        if self.recurrent:
            groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.hparams.lr}]
        else:
            groups = level_param_groups(self.model, self.hparams.lr, self.hparams.level_lr_scale)
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_schedule == "constant" and self.hparams.warmup_steps == 0:
            return {"optimizer": optimizer}
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = self.hparams.warmup_steps
        cosine = self.hparams.lr_schedule == "cosine"

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # Evaluation at every depth ----------------------------------------------------------

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate_depths(batch)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate_depths(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_depth_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_depth_metrics("test")

    def _evaluate_depths(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        if self.recurrent:
            return self._evaluate_paths(x, y)
        hidden_states = self.model.stem(x)
        # Weight by the number of predictions so the epoch mean is per token or per image.
        weight = float(y.numel())
        for depth in range(self.model.depth + 1):
            logits = self.model.head(self.model.run_nodes(hidden_states, self.model.tree.level_cut(depth)))
            self.eval_loss[depth].update(self.objective.task_loss(logits, y), weight)
            self.eval_accuracy[depth].update((logits.argmax(-1) == y).float().mean(), weight)

    def _evaluate_paths(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # The exact sequential RNN, and the tree's estimates of every state with the
        # training's sweeps: L + K + 1 rounds.
        model, weight = self.model, float(y.numel())
        estimates = model.approximate_states(x, sweeps=self.hparams.consistency_sweeps)
        for row, states in enumerate((model.sequence_states(x), estimates)):
            logits = model.head(torch.stack([model.readout(state) for state in states], dim=1))
            self.eval_loss[row].update(self.objective.task_loss(logits, y), weight)
            self.eval_accuracy[row].update((logits.argmax(-1) == y).float().mean(), weight)

    def eval_rows(self) -> list[tuple[str, dict]]:
        """Return the evaluated networks as ``(key, description)``: level cuts, or a recurrent net's two paths."""
        if self.recurrent:
            steps = self.model.num_blocks
            evaluations = {"sequential": steps, "tree": self._tree_path_rounds()}
            return [(path, {"path": path, "num_modules": evaluations[path]}) for path in RECURRENT_PATHS]
        return [
            (f"depth{depth}", {"depth": depth, "num_modules": len(self.model.tree.level_cut(depth))})
            for depth in range(self.model.depth + 1)
        ]

    def _tree_path_rounds(self) -> int:
        # L message rounds, then K sweeps and the final leaves of leaf_steps steps each.
        model = self.model
        return model.depth + (self.hparams.consistency_sweeps + 1) * model.leaf_steps

    def _log_depth_metrics(self, stage: str) -> None:
        # compute() already averages over processes, so the values go out as plain floats.
        rows = self.eval_rows()
        main_row = 0 if self.recurrent else len(rows) - 1
        for index, (key, _) in enumerate(rows):
            loss = float(self.eval_loss[index].compute())
            metrics = {f"{stage}/{key}/loss": loss}
            if self.task == "language_modeling":
                metrics[f"{stage}/{key}/perplexity"] = math.exp(loss)
                if self.network.metric == "bits_per_char":
                    metrics[f"{stage}/{key}/bits_per_char"] = loss / math.log(2)
            else:
                metrics[f"{stage}/{key}/accuracy"] = float(self.eval_accuracy[index].compute())
            # The values are equal on every rank, so syncing keeps them and only stops
            # Lightning's warning about unsynced epoch-level logs.
            self.log_dict(metrics, prog_bar=index == main_row, sync_dist=True)
            self.eval_loss[index].reset()
            self.eval_accuracy[index].reset()

    def depth_metrics(self, stage: str) -> list[dict[str, float]]:
        """Read the last logged metrics of ``stage`` for every evaluated network from the trainer."""
        metrics = self.trainer.callback_metrics
        rows = []
        for key, description in self.eval_rows():
            row = dict(description)
            prefix = f"{stage}/{key}/"
            row.update({name[len(prefix):]: float(value) for name, value in metrics.items() if name.startswith(prefix)})
            rows.append(row)
        return rows
