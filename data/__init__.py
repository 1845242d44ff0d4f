"""LightningDataModules, one per modality."""
