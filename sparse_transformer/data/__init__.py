"""LightningDataModules, one per kind of data; configs name them as ``sparse_transformer.data.<Name>``."""

from sparse_transformer.data.audio import AudioFolderDataModule
from sparse_transformer.data.images import CIFAR10DataModule, ImageFolderDataModule, ImageNet64DataModule
from sparse_transformer.data.text import ByteTextDataModule, Enwik8DataModule

__all__ = [
    "AudioFolderDataModule",
    "ByteTextDataModule",
    "CIFAR10DataModule",
    "Enwik8DataModule",
    "ImageFolderDataModule",
    "ImageNet64DataModule",
]
