"""Training machinery: the LightningModule, the CLI, callbacks, checkpoints and the run folder."""
