"""A callback for numerics tests: what the first training steps computed, written by rank 0 to a file."""

import lightning as L
import torch
import torch.distributed as dist


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor gathered whole (every rank calls it), a plain tensor as it is; on the CPU, a copy."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


class RecordSteps(L.Callback):
    """Per training step, into ``path`` (``torch.save``): the loss over the global batch, every gradient before
    clipping and after it (the gradient the optimizer used; Lightning zeroes it only at the next step), and the
    parameters after the update."""

    def __init__(self, path: str, steps: int = 2):
        self.path, self.steps = path, steps
        self.records: list[dict] = []
        self.before: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step < self.steps:
            self.before = {name: full(p.grad) for name, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if len(self.records) >= self.steps:
            return
        loss = outputs["loss"].detach().clone()
        if trainer.world_size > 1:  # a sum, then divided here: the mean does not rest on the backend's AVG
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss /= trainer.world_size
        self.records.append({
            "loss": loss.item(),
            "grad_before_clipping": self.before,
            "grad": {name: full(p.grad) for name, p in pl_module.named_parameters()},
            "param": {name: full(p) for name, p in pl_module.named_parameters()},
        })  # fmt: skip
        if trainer.is_global_zero and len(self.records) == self.steps:
            torch.save(self.records, self.path)
