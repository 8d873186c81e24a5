"""``HBLLTrainer``: ``transformers.Trainer`` with HBLL's local objectives.

Swap the class name of an existing run:

    trainer = HBLLTrainer(model=model, args=TrainingArguments(...), train_dataset=...,
                          eval_dataset=..., data_collator=...)
    trainer.train()

``model`` may be a stock transformers model (a causal LM or a sequence classifier),
which the trainer wraps with ``from_stock``, or an ``HBLLForCausalLM`` /
``HBLLForSequenceClassification``. Every ``TrainingArguments`` option applies as with
``Trainer``. Evaluation reports the loss and the perplexity (causal LMs) or the accuracy
(classifiers) of every level cut. Under ``accelerate launch`` or ``torchrun`` with
several processes the tree's nodes are spread over the ranks (``HBLLArguments.tree_groups``),
as with the Lightning strategy.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, Trainer, TrainingArguments

from hbll.distributed import Placement, TreeParallel
from hbll.engine import BackpropEngine, ReferenceEngine, build_engine
from hbll.objectives import ObjectiveConfig
from hbll_hf.modeling import (
    WEIGHTS_NAME,
    HBLLForCausalLM,
    HBLLForSequenceClassification,
    HBLLPreTrainedModel,
    _load_tensors,
    shift_labels,
)

__all__ = ["HBLLArguments", "HBLLTrainer"]

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass
class HBLLArguments:
    """HBLL settings of an ``HBLLTrainer`` run; the rest comes from ``TrainingArguments``.

    Args:
        method: ``"hbll"``, or ``"backprop"`` for the standard end-to-end baseline on the
            same model, data and arguments.
        consistency_weight, consistency_lambda: weights of the consistency term.
        chained_exit_weight: weight of the pipelined chained exits (0 turns them off).
        consistency_sweeps, sweeps_from, chain_length: see ``hbll.ReferenceEngine``.
        shortcut_init: how the shortcuts of a wrapped stock model start (``"first"``,
            ``"middle"``, ``"last"`` layer of their span, or ``"fresh"``).
        exit_heads: exit-head policy of a wrapped stock model; None picks ``"shared"``
            for causal LMs and ``"local"`` for classifiers.
        tree_groups: with several processes, the ranks that share one tree; the world
            size divided by it gives the data-parallel replicas. None puts every rank
            in one tree.
        placement: ``"balanced"`` or a mapping from nodes to tree ranks.
        eval_depths: the level cuts that evaluation reports; None reports every level.
        engine: ``"auto"`` (batched calls on CUDA, one at a time on the CPU), ``"fused"``
            or ``"reference"``; see ``hbll.build_engine``.
    """

    method: str = "hbll"
    consistency_weight: float = 0.3
    consistency_lambda: float = 1.0
    chained_exit_weight: float = 3.0
    consistency_sweeps: int = 0
    sweeps_from: float = 0.0
    chain_length: int = 0
    shortcut_init: str = "first"
    exit_heads: Optional[str] = None
    tree_groups: Optional[int] = None
    placement: Placement = "balanced"
    eval_depths: Optional[list[int]] = None
    engine: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in ("hbll", "backprop"):
            raise ValueError(f"method must be 'hbll' or 'backprop', got {self.method!r}")

    def engine_options(self) -> dict[str, Any]:
        return {
            "consistency_sweeps": self.consistency_sweeps,
            "sweeps_from": self.sweeps_from,
            "chain_length": self.chain_length,
            "chained_exit_weight": self.chained_exit_weight,
        }

    def objective(self) -> ObjectiveConfig:
        return ObjectiveConfig(consistency_weight=self.consistency_weight, consistency_lambda=self.consistency_lambda)


class _Unwrapped(nn.Module):
    """Holds the model so that Accelerate leaves it without a DistributedDataParallel wrapper."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def _wrap_stock(model: nn.Module, hbll_args: HBLLArguments) -> HBLLPreTrainedModel:
    if isinstance(model, HBLLPreTrainedModel):
        return model
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"HBLLTrainer trains transformers models, got {type(model).__name__}")
    name = type(model).__name__
    cls = HBLLForSequenceClassification if "SequenceClassification" in name else HBLLForCausalLM
    if cls is HBLLForCausalLM and model.get_output_embeddings() is None:
        raise TypeError(
            f"HBLLTrainer trains causal LMs and sequence classifiers; {name} has neither an LM head nor a "
            "sequence classifier. Load it with AutoModelForCausalLM or AutoModelForSequenceClassification"
        )
    options = {"shortcut_init": hbll_args.shortcut_init}
    if hbll_args.exit_heads is not None:
        options["exit_heads"] = hbll_args.exit_heads
    return cls.from_stock(model, **options)


class HBLLTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with HBLL's local objectives.

    It takes the arguments of ``Trainer`` plus ``hbll_args`` (``HBLLArguments``). The
    logged ``loss`` is the sum of all nodes' local losses, the objective that the step
    minimises; evaluation logs ``eval_depth{ℓ}_loss`` and ``eval_depth{ℓ}_perplexity`` or
    ``eval_depth{ℓ}_accuracy`` for every level ℓ, and ``eval_loss`` of the full network.
    """

    def __init__(self, model: Optional[nn.Module] = None, args: Any = None, *trainer_args: Any, hbll_args: Optional[HBLLArguments] = None, **kwargs: Any) -> None:
        self.hbll_args = hbll_args or HBLLArguments()
        if model is None:
            raise ValueError("HBLLTrainer needs a model; model_init is not supported")
        model = _wrap_stock(model, self.hbll_args)
        if model.is_cut:
            raise ValueError("this model contains one cut only; load the whole checkpoint (from_pretrained without depth) to train it")
        super().__init__(model, args, *trainer_args, **kwargs)
        # compute_loss returns a per-batch mean, which the Trainer scales for accumulation.
        self.model_accepts_loss_kwargs = False
        self.parallel: Optional[TreeParallel] = None
        self._layout = None
        self._reduced = False
        self.engine = self._build_engine()
        model.config.training = {"method": self.hbll_args.method, **asdict(self.hbll_args)}

    # Engine and processes.

    def _build_engine(self) -> ReferenceEngine | BackpropEngine:
        options, comm = self.hbll_args.engine_options(), None
        if self.args.world_size > 1:
            tree_groups = 1 if self.hbll_args.method == "backprop" else self.hbll_args.tree_groups
            self.parallel = TreeParallel(self.model.hbll, tree_groups, self.hbll_args.placement, device=self.args.device)
            comm = self.parallel.comm
            if self.args.process_index == 0:
                logger.info("HBLLTrainer: %s engine\n%s", self.hbll_args.method, self.parallel.describe())
        return build_engine(self.hbll_args.method, self.hbll_args.objective(), engine=self.hbll_args.engine, comm=comm, **options)

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None) -> nn.Module:
        # TreeParallel reduces gradients itself, so no DistributedDataParallel wrapper.
        if self.parallel is not None and training:
            return model if isinstance(model, _Unwrapped) else _Unwrapped(model)
        return super()._wrap_model(model, training, dataloader)

    def get_train_dataloader(self) -> Any:
        dataloader = super().get_train_dataloader()
        if self.parallel is not None:
            # The ranks of one tree group train on the same batch: shard the batches over
            # the data-parallel replicas instead of over all processes.
            shard = getattr(dataloader, "batch_sampler", None)
            if shard is None or not hasattr(shard, "num_processes"):
                raise TypeError(
                    "tree-parallel training needs a map-style training dataset, which Accelerate shards with a "
                    f"batch sampler; got a {type(self.train_dataset).__name__} without one"
                )
            shard.num_processes = self.parallel.mesh.replicas
            shard.process_index = self.parallel.mesh.replica
        return dataloader

    def get_total_train_batch_size(self, args: TrainingArguments) -> int:
        # The ranks of one tree group train on the same batch, so only the replicas add
        # examples to a step. The Trainer logs this count and derives samples per second from it.
        if self.parallel is None:
            return super().get_total_train_batch_size(args)
        return self._train_batch_size * args.gradient_accumulation_steps * self.parallel.mesh.replicas

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.parallel is not None and self._layout is None:
            self._layout = self.parallel.restrict_optimizer(optimizer)
        return optimizer

    def _reduce_once(self) -> None:
        if self.parallel is not None and not self._reduced:
            self.parallel.reduce_gradients()
            self._reduced = True

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        if self.parallel is None:
            return super()._clip_grad_norm(model)
        # The norm of the whole model's gradient, as in one process, not of this rank's part.
        self._reduce_once()
        return self.parallel.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        if self.parallel is None:
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        self._reduce_once()
        return grad_norm if grad_norm is not None else self.parallel.clip_grad_norm_(float("inf"))

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        self._reduced = False
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Each rank's loss covers its own nodes; the logged loss covers the whole tree.
        return self.parallel.total_loss(loss) if self.parallel is not None else loss

    # Loss.

    def _split(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
        if "labels" not in inputs:
            raise ValueError(
                "HBLLTrainer needs labels in every batch: for causal LMs use "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False) or a dataset with a 'labels' column"
            )
        x = {key: inputs[key] for key in MODEL_INPUTS if inputs.get(key) is not None}
        labels = inputs["labels"]
        return x, shift_labels(labels) if self.model.task == "causal_lm" else labels

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if not self.model.training:
            outputs = self.model(**{k: v for k, v in inputs.items() if k in (*MODEL_INPUTS, "labels")})
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        x, y = self._split(inputs)
        result = self.engine.compute_losses(self.model.hbll, x, y, self._progress())
        self._last_critical_path = result.critical_path
        if return_outputs:
            return result.loss, {"node_losses": result.node_losses}
        return result.loss

    def _progress(self) -> float:
        total = self.state.max_steps
        if not total or total <= 1:
            return 1.0
        return min(self.state.global_step / (total - 1), 1.0)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and hasattr(self, "_last_critical_path"):
            logs = {**logs, "critical_path": self._last_critical_path}
        super().log(logs, start_time)

    # Evaluation per depth.

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Optional[list[str]] = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate every level cut and log ``{prefix}_depth{ℓ}_loss`` and its perplexity or accuracy."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            metrics = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        if self.parallel is not None:
            self.parallel.sync_parameters()
        dataloader = self.get_eval_dataloader(dataset)
        model = self.model
        depths = self.hbll_args.eval_depths if self.hbll_args.eval_depths is not None else list(range(model.hbll.depth + 1))
        totals = torch.zeros(len(depths), 3, dtype=torch.float64, device=self.args.device)
        was_training = model.training
        model.eval()
        show = self.args.disable_tqdm is False and self.is_local_process_zero()
        with torch.no_grad():
            for inputs in tqdm(dataloader, desc="Evaluating every depth", disable=not show, leave=False):
                x, y = self._split(self._prepare_inputs(inputs))
                sums = torch.stack([_example_sums(model.hbll(x, depth=depth), y) for depth in depths], dim=1)
                # Gathers every rank's examples and drops the repeats that pad the last
                # batches to equal size, so each example counts once.
                totals += self.accelerator.gather_for_metrics(sums).sum(0)
        if was_training:
            model.train()
        metrics = {}
        for row, depth in enumerate(depths):
            loss_sum, correct, count = totals[row].tolist()
            loss = loss_sum / max(count, 1)
            metrics[f"{metric_key_prefix}_depth{depth}_loss"] = loss
            if model.task == "causal_lm":
                metrics[f"{metric_key_prefix}_depth{depth}_perplexity"] = math.exp(min(loss, 50.0))
            else:
                metrics[f"{metric_key_prefix}_depth{depth}_accuracy"] = correct / max(count, 1)
        full = depths[-1]
        metrics[f"{metric_key_prefix}_loss"] = metrics[f"{metric_key_prefix}_depth{full}_loss"]
        key = "perplexity" if model.task == "causal_lm" else "accuracy"
        metrics[f"{metric_key_prefix}_{key}"] = metrics[f"{metric_key_prefix}_depth{full}_{key}"]
        model.config.training["eval"] = metrics
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def create_model_card(self, model_name: Optional[str] = None, dataset_name: Optional[str] = None, tags: Any = None, **kwargs: Any) -> None:
        """Write the HBLL model card (per-depth metrics, loading, training setup) as ``README.md`` in ``output_dir``."""
        if not self.is_world_process_zero():
            return
        from hbll_hf.hub import render_model_card

        repo_id = self.hub_model_id or model_name or os.path.basename(os.path.normpath(self.args.output_dir))
        dataset = dataset_name or kwargs.get("dataset")
        card = render_model_card(self.model, repo_id, dataset_name=dataset, tags=[tags] if isinstance(tags, str) else tags)
        with open(os.path.join(self.args.output_dir, "README.md"), "w") as file:
            file.write(card)

    # Checkpoints: the full model and the one-process optimizer state.

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        if self.parallel is not None:
            self.parallel.sync_parameters()
        super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.parallel is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        # Every rank takes part in the gather; the main process writes the state that one
        # process training all nodes would have, so a run resumes with any process count.
        state = self.parallel.gather_optimizer_state(self.optimizer, self._layout)
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        if self.parallel is None:
            super()._load_optimizer_and_scheduler(checkpoint)
        else:
            self._load_parallel(checkpoint)

    def _load_parallel(self, checkpoint: Optional[str]) -> None:
        if checkpoint is None:
            return
        full = torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(self.parallel.local_optimizer_state(full, self.optimizer, self._layout))
        scheduler_path = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(scheduler_path):
            self.lr_scheduler.load_state_dict(torch.load(scheduler_path, weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        target = model if model is not None else self.model
        path = os.path.join(resume_from_checkpoint, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"Can't find {WEIGHTS_NAME} in the checkpoint {resume_from_checkpoint}")
        _load_tensors(target, path)
        if isinstance(self.engine, ReferenceEngine):
            self.engine.reset_pipeline()


def _example_sums(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return each example's summed cross-entropy, correct predictions and counted targets, shape (batch, 3)."""
    flat_logits, flat_targets = logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)
    losses = torch.nn.functional.cross_entropy(flat_logits, flat_targets, reduction="none", ignore_index=-100)
    valid = flat_targets != -100
    correct = (flat_logits.argmax(-1) == flat_targets) & valid
    per_target = torch.stack([losses.double(), correct.double(), valid.double()], dim=-1)
    return per_target.reshape(targets.size(0), -1, 3).sum(1)
