"""Image DataModules on PNG files the tests write: shapes, splits, determinism, workers, bad files."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_transformer.data.images import CIFAR10DataModule, ImageFolderDataModule, ImageNet64DataModule
from sparse_transformer.errors import InputError
from sparse_transformer.modality import START
from sparse_transformer.modality import Image as ImageModality


def write_pngs(folder: Path, n: int, size: int = 8, seed: int = 0) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return images


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    images = write_pngs(tmp_path / "images", 20)
    return tmp_path / "images", images


def test_images_become_start_then_raster_bytes(folder):
    root, images = folder
    dm = ImageFolderDataModule(root=str(root), image_size=8, val_fraction=0.25, batch_size=4)
    dm.setup()
    assert dm.seq_len == 192 and dm.modality == ImageModality((8, 8, 3))
    assert (len(dm.train), len(dm.val)) == (15, 5)
    seq = dm.val[0]
    assert seq.shape == (193,) and seq.dtype == torch.long and seq[0] == START
    # Every validation sequence is exactly one of the written images, in raster order.
    written = {image.tobytes() for image in images}
    assert all(bytes(dm.val[i][1:].tolist()) in written for i in range(len(dm.val)))
    train_and_val = {bytes(part[i][1:].tolist()) for part in (dm.train, dm.val) for i in range(len(part))}
    assert train_and_val == written  # the split is a partition


def test_split_and_batches_are_reproducible_given_the_seed(folder):
    root, _ = folder

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        dm = ImageFolderDataModule(root=str(root), image_size=8, batch_size=4, samples_per_epoch=8, seed=seed)
        dm.setup()
        return torch.cat(list(dm.train_dataloader())), torch.cat(list(dm.val_dataloader()))

    (a_train, a_val), (b_train, b_val), (c_train, c_val) = run(1), run(1), run(2)
    assert a_train.shape == (8, 193) and a_val.shape == (2, 193)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert not torch.equal(a_train, c_train) and not torch.equal(a_val, c_val)  # the seed also draws the split


def test_workers_give_the_same_batches(folder):
    root, _ = folder
    serial = ImageFolderDataModule(root=str(root), image_size=8, batch_size=3)
    workers = ImageFolderDataModule(root=str(root), image_size=8, batch_size=3, num_workers=2)
    serial.setup(), workers.setup()
    assert torch.equal(torch.cat(list(serial.val_dataloader())), torch.cat(list(workers.val_dataloader())))


def test_wrong_size_and_unreadable_images_fail_with_one_line(folder):
    root, _ = folder
    Image.fromarray(np.zeros((8, 10, 3), dtype=np.uint8)).save(root / "wide.png")
    dm = ImageFolderDataModule(root=str(root), image_size=8)
    with pytest.raises(InputError, match=r"wide.png is 8x10 \(rows x cols\), expected 8x8") as e:
        dm.setup()
    assert "\n" not in str(e.value)
    (root / "wide.png").unlink()
    (root / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"cannot read image .*broken.png"):
        dm.setup()


def test_missing_datasets_say_where_to_get_them(tmp_path):
    with pytest.raises(InputError, match="image folder .* not found"):
        ImageFolderDataModule(root=str(tmp_path / "none")).setup()
    with pytest.raises(InputError, match="CIFAR-10 not found or corrupt under .*; set data.init_args.download=true"):
        CIFAR10DataModule(root=str(tmp_path)).setup()
    with pytest.raises(InputError, match=r"get train_64x64.tar and valid_64x64.tar \(van den Oord et al. 2016; image-net.org"):
        ImageNet64DataModule(root=str(tmp_path)).setup()


def test_imagenet64_reads_its_two_folders(tmp_path):
    write_pngs(tmp_path / "train_64x64", 3, size=64)
    write_pngs(tmp_path / "valid_64x64", 2, size=64, seed=1)
    dm = ImageNet64DataModule(root=str(tmp_path), batch_size=2)
    dm.setup()
    assert (len(dm.train), len(dm.val), dm.seq_len) == (3, 2, 12288)
    assert next(iter(dm.val_dataloader())).shape == (2, 12289)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    folder = tmp_path / "grey16"
    folder.mkdir()
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63,000 of 65,535
    for i in range(4):
        Image.fromarray(ramp).save(folder / f"{i}.png")
    assert Image.open(folder / "0.png").mode.startswith("I")
    dm = ImageFolderDataModule(root=str(folder), image_size=8, channels=1, val_fraction=0.25, batch_size=1)
    dm.setup()
    pixels = dm.train[0][1:].view(8, 8)
    assert torch.equal(pixels, torch.from_numpy((ramp >> 8).astype(np.int64)))  # the top 8 bits, not min(x, 255)
    assert (pixels == 255).sum() == 0
