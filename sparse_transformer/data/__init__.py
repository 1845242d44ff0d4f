"""LightningDataModules, one per kind of data; configs name them as ``sparse_transformer.data.<Name>``.

Imported on first use, so ``python -m sparse_transformer.data.images`` (and ``.text``, ``.audio``) runs its
module once, not after this package has imported it.
"""

from importlib import import_module

_MODULES = {
    "AudioFolderDataModule": "audio",
    "ByteTextDataModule": "text",
    "CIFAR10DataModule": "images",
    "Enwik8DataModule": "text",
    "ImageFolderDataModule": "images",
    "ImageNet64DataModule": "images",
}

__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_MODULES[name]}"), name)
