"""The progress bar: a run bounded by steps shows its step, not "Epoch 5/-2".

RunProgressBar overrides a private method of Lightning's RichProgressBar (there is no public hook for the
bar's title); the first test fails loudly if Lightning renames or drops it.
"""

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from sparse_transformer.training.progress import RunProgressBar


def test_the_private_method_it_overrides_still_exists():
    assert callable(vars(RichProgressBar).get("_get_train_description")), "Lightning changed RichProgressBar's title"


def fitted(tmp_path, **limits) -> tuple[RunProgressBar, L.Trainer, BoringModel]:
    bar, model = RunProgressBar(), BoringModel()
    trainer = L.Trainer(callbacks=[bar], logger=False, enable_checkpointing=False, default_root_dir=tmp_path, **limits)
    trainer.fit(model)
    return bar, trainer, model


def test_a_run_bounded_by_steps_shows_its_step(tmp_path):
    bar, trainer, model = fitted(tmp_path, max_steps=3, limit_val_batches=0)
    assert trainer.max_epochs == -1 and bar._get_train_description(5).strip() == "Epoch 5"
    assert bar.get_metrics(trainer, model)["step"] == "3/3"


def test_a_run_bounded_by_epochs_shows_them(tmp_path):
    bar, trainer, model = fitted(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=0)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"
    assert bar.get_metrics(trainer, model)["step"] == "6"
