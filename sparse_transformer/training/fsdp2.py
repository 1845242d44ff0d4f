"""Fully sharded data parallelism that runs on CPUs (gloo) and GPUs (NCCL) alike: FSDP2 through Lightning.

Each rank holds ``1/world_size`` of every parameter, its gradient and its AdamW state (``torch``'s
``fully_shard``: parameters are DTensors sharded on their first dimension); a block's full weights exist only
while that block computes. Lightning's ``ModelParallelStrategy`` runs it, and the LightningModule's
``configure_model`` applies it (:func:`shard`). Lightning's older ``FSDPStrategy`` (FSDP1) refuses a CPU, and
its precision plugin refuses the paper's gradient clipping by norm; here clipping is ``clip_grad_norm_`` over
the DTensor gradients, which computes the norm of the whole gradient (every shard), as one process would.

Checkpoints are one file, as with DDP: the full weights and optimizer state gathered on rank 0 and written by
the run's checkpoint writer (atomic, finite, sealed: ``checkpoint_io.py``), so ``sample.py`` reads them and a
run resumes from them on any number of processes, sharded or not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from sparse_transformer.model import Block


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


def shard(model: torch.nn.Module, mesh: DeviceMesh) -> None:
    """Shard ``model`` over ``mesh``: each :class:`Block` its own unit (its weights gathered for its forward and
    backward only), then the rest (embeddings, final norm, head) as the root unit. Applied once."""
    if isinstance(model, FSDPModule):
        return
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


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
