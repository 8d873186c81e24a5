"""``HBLLStrategy``: the Lightning strategy that owns the HBLL training step.

``import hbll_lightning`` registers it under the name ``"hbll"``, so
``Trainer(strategy="hbll")`` selects it; ``"hbll_spawn"`` starts its processes with
``spawn``. The strategy, not the LightningModule, picks the engine that executes a step,
so one module trains in one process or tree-parallel across many.

With one process it runs the engine that ``HBLLModule(engine=...)`` picks on one device.
With ``devices=P`` (times ``num_nodes``) it starts P processes through Lightning's
launchers, or joins the processes that ``torchrun`` or ``accelerate launch`` started, and
trains one HBLL model across them (see ``hbll.distributed``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from datetime import timedelta
from typing import Any, Callable, Literal, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler

from hbll.distributed import Placement, TreeParallel
from hbll.engine import BackpropEngine, ReferenceEngine

__all__ = ["HBLLStrategy", "AtomicCheckpointIO", "ProcessLayoutError"]

log = logging.getLogger(__name__)


# Extra ranks that this process started. A later Trainer of the same job starts none, so
# its launcher has no process to pass a signal to.
_STARTED_RANKS: list[Any] = []


def engine_label(engine: Any, device: torch.device) -> str:
    """Return the log name of ``engine`` on ``device``, noting when a fused engine runs unbatched there."""
    device_types = getattr(engine, "device_types", None)
    if device_types is not None and device.type not in device_types:
        return f"{engine.name} engine on {device}, one call at a time (it batches on {'/'.join(device_types)} only)"
    return f"{engine.name} engine on {device}"


class ProcessLayoutError(ValueError):
    """Error for a process count that does not fit the model or the launcher."""


def check_process_count(module: Any, processes: int) -> None:
    """Raise ``ProcessLayoutError`` if ``module`` cannot train over ``processes`` processes."""
    if processes > 1 and getattr(module, "recurrent", False):
        raise ProcessLayoutError(
            "strategy='hbll' trains a recurrent network in one process: all its leaves share one cell, "
            f"so the tree over time does not split across processes; run with devices=1, not {processes} processes"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file and rename it, so no partial file is left behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = str(path)
        if "://" in path and not path.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = path.removeprefix("file://")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        partial = f"{path}.partial-{os.getpid()}"
        try:
            torch.save(checkpoint, partial)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)


class HBLLStrategy(DDPStrategy):
    """Run HBLL training steps in one process or tree-parallel across several.

    Args:
        tree_groups: with P processes, the ranks that share one tree's nodes; P divided by
            it gives the data-parallel replicas. ``None`` splits the tree over all P.
            Backprop runs ignore it and train as plain data parallelism.
        placement: which tree rank owns each node: ``"balanced"`` (the default), a
            mapping from nodes, spans or node names to tree ranks, or a callable (see
            ``hbll.distributed.resolve_placement``).
        timeout: the process group's timeout. When a rank fails, the others stop with an
            error once a collective has waited this long.
        start_method: ``"popen"`` runs the script again for each extra process;
            ``"spawn"`` suits notebooks and pytest.
        process_group_backend: ``"gloo"`` on CPU and ``"nccl"`` on GPU unless given.
        device: the device of a one-process run, instead of the first of the trainer's
            devices.
    """

    strategy_name = "hbll"

    def __init__(
        self,
        tree_groups: Optional[int] = None,
        placement: Placement = "balanced",
        timeout: Optional[timedelta] = timedelta(minutes=30),
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        process_group_backend: Optional[str] = None,
        device: Optional[str | torch.device] = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("checkpoint_io", AtomicCheckpointIO())
        super().__init__(timeout=timeout, start_method=start_method, process_group_backend=process_group_backend, **kwargs)
        self.tree_groups = tree_groups
        self.placement = placement
        self._device = torch.device(device) if device is not None else None
        self.engine: Optional[ReferenceEngine | BackpropEngine] = None
        self.parallel: Optional[TreeParallel] = None
        # Number of batches that one training step reads: one per data-parallel replica.
        self.data_replicas = 1
        self._layouts: list[list[list[torch.nn.Parameter]]] = []

    @property
    def root_device(self) -> torch.device:
        if self._device is not None:
            return self._device
        if not self.parallel_devices:
            return torch.device("cpu")
        return super().root_device

    @property
    def is_multiprocess(self) -> bool:
        return self.num_nodes * self.num_processes > 1

    def _configure_launcher(self) -> None:
        if self.is_multiprocess:
            super()._configure_launcher()

    def setup_environment(self) -> None:
        # torchrun, accelerate launch and Lightning's own launcher set WORLD_SIZE. With a
        # different count in the trainer, some ranks would train and the others fail.
        launched = os.environ.get("WORLD_SIZE")
        requested = self.num_nodes * self.num_processes
        if launched is not None and int(launched) != requested:
            raise ProcessLayoutError(
                f"the launcher started {launched} processes (WORLD_SIZE={launched}), but the trainer is set to "
                f"devices={self.num_processes} on num_nodes={self.num_nodes}, {requested} in all; set devices "
                "(--trainer.devices in the hbll command) to the processes per node (torchrun --nproc_per_node, "
                "accelerate launch --num_processes)"
            )
        super().setup_environment()

    def setup_distributed(self) -> None:
        if self.is_multiprocess:
            super().setup_distributed()
        else:
            self.set_world_ranks()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # In training the ranks of one tree group read the same batch and the replicas split
        # the data. Evaluation runs on the whole synced model, so all ranks split the data.
        if self.parallel is None or self._evaluating():
            return super().distributed_sampler_kwargs
        return {"num_replicas": self.parallel.mesh.replicas, "rank": self.parallel.mesh.replica}

    def _evaluating(self) -> bool:
        module = self.lightning_module
        trainer = module._trainer if module is not None else None
        return trainer is not None and trainer.state.stage is not None and trainer.state.stage.evaluating

    def process_dataloader(self, dataloader: object) -> object:
        # Lightning's DistributedSampler pads every rank's shard with repeated examples.
        # Evaluation shards without repeats, so the metrics equal one process's, and a rank
        # may run one batch more than another.
        sampler = getattr(dataloader, "sampler", None)
        if not self._evaluating() or type(sampler) is not DistributedSampler:
            return dataloader
        if sampler.shuffle or len(sampler.dataset) < sampler.num_replicas:
            return dataloader
        unrepeated = UnrepeatedDistributedSampler(sampler.dataset, num_replicas=sampler.num_replicas, rank=sampler.rank, shuffle=False)
        return _update_dataloader(dataloader, unrepeated, mode=self.lightning_module.trainer.state.stage)

    def setup(self, trainer: Trainer) -> None:
        module = self.lightning_module
        if not (hasattr(module, "build_engine") and hasattr(module, "run_engine_step")):
            raise TypeError(
                f"strategy='hbll' trains an hbll_lightning.HBLLModule, got {type(module).__name__}; "
                "wrap your network with HBLLModule(network=...) or HBLLModule.from_modules(stem, blocks, head)"
            )
        if self.is_multiprocess:
            super().setup(trainer)
            return
        # One process: no process group, and the plain strategy setup.
        self.engine = module.build_engine()
        model = module.model
        if getattr(module, "recurrent", False):
            size = f"{model.num_blocks} time steps in leaves of {model.leaf_steps}"
        else:
            size = f"{model.num_blocks} blocks"
        rank_zero_info(f"HBLLStrategy: {engine_label(self.engine, self.root_device)}, {size}, tree depth {model.depth}")
        Strategy.setup(self, trainer)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # No DistributedDataParallel wrapper: the engine and TreeParallel decide what
        # crosses ranks.
        return model

    def configure_ddp(self) -> None:
        # Called while fitting with several processes, after the model moved to its
        # device and before the optimizers exist.
        module = self.lightning_module
        check_process_count(module, self.num_nodes * self.num_processes)
        tree_groups = 1 if module.method == "backprop" else self.tree_groups
        self.parallel = TreeParallel(module.model, tree_groups, self.placement, device=self.root_device)
        self.data_replicas = self.parallel.mesh.replicas
        self.engine = module.build_engine(comm=self.parallel.comm)
        # Clipping by norm uses the norm of the whole model's gradient, as in one process.
        parallel = self.parallel
        self.precision_plugin.clip_grad_by_norm = lambda optimizer, clip_val: parallel.clip_grad_norm_(clip_val)
        rank_zero_info(f"HBLLStrategy: {engine_label(self.engine, self.root_device)}\n{self.parallel.describe()}")
        mesh = self.parallel.mesh
        log.debug(
            f"rank {mesh.rank} (tree rank {mesh.tree_rank}, replica {mesh.replica}) owns nodes "
            + " ".join(str(node) for node in self.parallel.owned_nodes())
        )

    def setup_optimizers(self, trainer: Trainer) -> None:
        super().setup_optimizers(trainer)
        if self.parallel is not None:
            self._layouts = [self.parallel.restrict_optimizer(optimizer) for optimizer in self.optimizers]

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs["batch"]
        with self.precision_plugin.train_step_context():
            loss = self.lightning_module.run_engine_step(self.engine, batch, parallel=self.parallel)
        if self.parallel is not None and self.parallel.stop_agreed:
            # Every rank reads the same all-reduced value, so all stop after this step.
            self.lightning_module.trainer._signal_connector.received_sigterm = True
        return loss

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        if self.parallel is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def closure_with_reduced_gradients() -> Any:
            # After the last backward of the step, so accumulated gradients reduce once,
            # and before gradient clipping, so clipping gets the same values as in one process.
            result = closure()
            self.parallel.reduce_gradients()
            return result

        return super().optimizer_step(optimizer, closure_with_reduced_gradients, model, **kwargs)

    # Full model at evaluation, checkpoints and the end of training -------------------------

    def _sync(self) -> None:
        if self.parallel is not None:
            self.parallel.sync_parameters()

    def on_train_start(self) -> None:
        super().on_train_start()
        self._install_sigterm_handler()

    def on_validation_start(self) -> None:
        self._install_sigterm_handler()
        self._sync()

    def on_test_start(self) -> None:
        self._install_sigterm_handler()
        self._sync()

    def _install_sigterm_handler(self) -> None:
        """Replace Lightning's SIGTERM handler with one that stops all ranks at one point.

        Lightning's handler broadcasts from inside the signal handler. That broadcast can
        meet another rank's tree message or gradient reduction, and both ranks then wait
        until the process group times out. This handler passes the signal on to the ranks
        that this process started and records a stop request. In training the step's loss
        all-reduce carries the request, so every rank sets Lightning's flag after the same
        step. Evaluation batches run no collective, so there each rank sets the flag at
        once and stops at its next batch.
        """
        if not self.is_multiprocess or threading.current_thread() is not threading.main_thread():
            return
        started = getattr(self.launcher, "procs", None)
        if started:
            _STARTED_RANKS[:] = started
        connector = self.lightning_module.trainer._signal_connector
        forwarded = False

        def on_sigterm(signum: int, frame: Any) -> None:
            nonlocal forwarded
            log.info(f"rank {self.global_rank}: received signal {signum}, stopping after the current step")
            if not forwarded:
                forwarded = True
                for process in _STARTED_RANKS:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signum)
            if self.parallel is not None and not self._evaluating():
                self.parallel.stop_requested = True
            else:
                connector.received_sigterm = True

        signal.signal(signal.SIGTERM, on_sigterm)

    def on_predict_start(self) -> None:
        self._sync()

    def on_train_end(self) -> None:
        self._sync()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        self._sync()
        return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: Any) -> dict:
        if self.parallel is None:
            return super().optimizer_state(optimizer)
        layout = self._layouts[self.optimizers.index(optimizer)]
        return self.parallel.gather_optimizer_state(optimizer, layout)

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        if self.parallel is None:
            return super().load_optimizer_state_dict(checkpoint)
        for optimizer, layout, state in zip(self.optimizers, self._layouts, checkpoint["optimizer_states"]):
            optimizer.load_state_dict(self.parallel.local_optimizer_state(state, optimizer, layout))

    def teardown(self) -> None:
        self.parallel = None
        super().teardown()


StrategyRegistry.register(
    HBLLStrategy.strategy_name,
    HBLLStrategy,
    description="Hierarchical Block-Local Learning: each tree node trains on its local objective",
)
StrategyRegistry.register(
    "hbll_spawn",
    HBLLStrategy,
    description="Hierarchical Block-Local Learning, processes started with spawn",
    start_method="spawn",
)
