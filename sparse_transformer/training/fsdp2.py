"""Fully sharded data parallelism that runs on CPUs (gloo) and GPUs (NCCL) alike: FSDP2 through Lightning.

Each rank holds ``1/world_size`` of every parameter, its gradient and its AdamW state (``torch``'s
``fully_shard``: parameters are DTensors sharded on their first dimension); a block's full weights exist only
while that block computes. Lightning's ``ModelParallelStrategy`` runs it, and the LightningModule's
``configure_model`` applies it (:func:`shard`). Lightning's older ``FSDPStrategy`` (FSDP1) refuses a CPU, and
its precision plugin refuses the paper's gradient clipping by norm; here clipping is ``clip_grad_norm_`` over
the DTensor gradients, which computes the norm of the whole gradient (every shard), as one process would. On
gloo the gradients are reduced with a sum that FSDP then divides, never with gloo's average, which has summed
without dividing in some torch releases (pytorch#162338): a gradient twice too large, silently.

Each process still builds the whole model once, as under any strategy (the LightningModule makes it in its
constructor), before ``configure_model`` shards it: a moment of full fp32 weights per process at start-up,
before gradients and AdamW state exist. Building it on the meta device in ``configure_model`` would remove it.

Checkpoints are one file, as with DDP: the full weights and optimizer state gathered on rank 0 and written by
the run's checkpoint writer (atomic, finite, sealed: ``checkpoint_io.py``), so ``sample.py`` reads them and a
run resumes from them on any number of processes, sharded or not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from sparse_transformer.errors import InputError
from sparse_transformer.model import Block, SparseTransformer


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with data parallelism only: every rank of every node shards the model (no tensor
    parallelism, which this model has no plan for: a tensor-parallel size above 1 would train replicas that
    never exchange gradients), and a checkpoint is one file.

    Args:
        process_group_backend: None: gloo on a CPU, NCCL on CUDA GPUs.
        timeout: how long a collective waits for the other ranks.
    """

    def __init__(self, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout):
        super().__init__(
            data_parallel_size="auto",  # the world size, set in setup_environment
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """The full weights and optimizer state of a one-file checkpoint, each rank taking its shards.

        Lightning's own load maps a checkpoint's optimizer state to parameters by number, taking the numbers for
        positions in ``model.parameters()``; an optimizer numbers them group by group, and this one's groups
        (matrices, then the rest: ``lightning_module.adamw_with_schedule``) interleave, so a checkpoint of a run
        that was not sharded would put each moment on another parameter. Here they are matched group by group,
        as ``Optimizer.load_state_dict`` matches them (:func:`by_name`)."""
        path = Path(self.broadcast(checkpoint_path))
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=self.lightning_module.strict_loading)
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=options)
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            set_optimizer_state_dict(self.model, optimizer, by_name(state, optimizer, self.model), options=options)
        return checkpoint  # the rest (loops, callbacks, schedules, data position) Lightning restores itself


def by_name(state: dict[str, Any], optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> dict[str, Any]:
    """An optimizer's ``state_dict`` keyed by parameter number as one keyed by the name of the parameter in
    ``module`` that ``optimizer`` holds at the same place in the same group (the form torch's distributed
    ``set_optimizer_state_dict`` reads); one keyed by name already is returned as it is."""
    if not any(isinstance(key, int) for key in state["state"]):
        return state
    names = {p: name for name, p in module.named_parameters()}
    saved = [i for group in state["param_groups"] for i in group["params"]]
    ours = [names[p] for group in optimizer.param_groups for p in group["params"]]
    name = dict(zip(saved, ours, strict=True))
    return {
        "state": {name[i]: moments for i, moments in state["state"].items()},
        "param_groups": [{**group, "params": [name[i] for i in group["params"]]} for group in state["param_groups"]],
    }


def shard(model: SparseTransformer, mesh: DeviceMesh) -> None:
    """Shard ``model`` over the data-parallel ranks of ``mesh``: each :class:`Block` its own unit (its weights
    gathered for its forward and backward only), then the rest (embeddings, final norm, head) as the root unit.
    Applied once; a mesh or a model this cannot train is refused in one line."""
    if isinstance(model, FSDPModule):
        return
    tensor_parallel = mesh["tensor_parallel"].size()
    if tensor_parallel > 1:  # Lightning's ModelParallelStrategy as it comes: 'auto' is every device of a node
        raise InputError(
            f"trainer.strategy: a tensor-parallel size of {tensor_parallel}, but this model has no tensor-parallel plan "
            "(its replicas would never exchange gradients); use configs/strategies/fsdp2.yaml "
            "(sparse_transformer.training.fsdp2.FSDP2Strategy)"
        )
    if model.auxiliary_loss() is not None or model.metrics():
        attention = model.config.attention
        raise InputError(
            f"trainer.strategy: sharding cannot train {getattr(attention, 'name', type(attention).__name__)} attention, "
            "whose loss term and metrics read its weights outside forward, where FSDP2 holds only a shard of them; "
            "train it with --trainer.strategy ddp"
        )
    mesh = mesh["data_parallel"]
    gloo = torch.distributed.get_backend(mesh.get_group()) == "gloo"
    for unit in [*(m for m in model.modules() if isinstance(m, Block)), model]:
        fully_shard(unit, mesh=mesh)
        if gloo:  # gradients summed, then divided by FSDP itself: gloo's AVG has summed without dividing (pytorch#162338)
            unit.set_force_sum_reduction_for_comms(True)


@contextmanager
def full_weights(module: torch.nn.Module) -> Iterator[None]:
    """The full weights of every sharded unit of ``module`` for the length of the block, on every rank (a
    collective: every rank enters it); a no-op for a module that is not sharded. Work other than a training
    step needs them: sampling on rank 0 alone, and decoding one token at a time (``Block.decode`` is not the
    ``forward`` that FSDP's hooks gather the weights for). A forward inside the block keeps them gathered."""
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]  # the root (the model) first
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for i, unit in enumerate(units):
            unit.reshard()
            unit.set_reshard_after_forward(i > 0, recurse=False)  # as fully_shard left them: the root keeps its own
