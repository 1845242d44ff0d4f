"""Images as byte sequences: CIFAR-10, downsampled ImageNet 64x64, or any folder of images.

An image becomes its bytes in raster order with channels interleaved (32x32x3 -> 3072), preceded by the
start token, so a batch is ``[B, N + 1]`` and every one of the N dims is predicted (bits/dim as in the
paper). The model's factorized positional embedding gets (rows, cols, channels) from ``modality``.

Image files are read defensively (:func:`open_image`): whatever a file makes PIL raise (a truncated or
corrupt file, one over PIL's decompression-bomb limit, a format it only half knows) is one line naming the
file, and file names that are not UTF-8 are read and fingerprinted by their bytes.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from sparse_transformer.data.download import TIMEOUT, Remote, file_checksum, prepare
from sparse_transformer.data.sequences import SequenceDataModule, files_fingerprint
from sparse_transformer.errors import InputError, plural, run_cli
from sparse_transformer.files import atomic_file
from sparse_transformer.modality import START, Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

# CIFAR-10 as torchvision.datasets.CIFAR10 fetches and reads it (its url, tgz_md5, base_folder and file md5s).
CIFAR10_TAR = Remote(
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", 170_498_071, "md5:c58f30108f718f92721af3b95e74349a"
)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_UNPACKED = 186_300_000  # bytes, about


class ImageBytes(Dataset):
    """Images ``(H, W, C)`` uint8 -> ``[START, byte_0, ..., byte_{N-1}]`` (long)."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        pixels = Image.to_tokens(self.images[i]).long()
        return torch.cat([torch.tensor([START]), pixels])


class ArrayImages(Dataset):
    """Images held in one ``(n, H, W, C)`` uint8 array."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[i]))


class ImageFiles(Dataset):
    """Image files of one size, read with PIL on demand (so workers each read their own)."""

    def __init__(self, files: list[Path], shape: tuple[int, int, int]):
        self.files, self.shape = files, shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with open_image(self.files[i]) as image:
            pixels = read_pixels(self.files[i], image, grey=self.shape[2] == 1)
        return torch.from_numpy(pixels.reshape(self.shape).copy())  # (H, W, C)


@contextmanager
def open_image(path: Path) -> Iterator[PIL.Image.Image]:
    """``PIL.Image.open(path)``; anything PIL raises on opening is one line naming the file. An image over
    ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb, or a photograph far larger than any image this model
    reads) is refused there too, where PIL would only warn up to twice that."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(path)
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise InputError(f"cannot read image {path}: {' '.join(str(e).split()) or type(e).__name__}") from e
    with image:
        yield image


def read_pixels(path: Path, image: PIL.Image.Image, grey: bool) -> np.ndarray:
    """:func:`eight_bit` of an open image; a file corrupt past its header is one line naming it."""
    try:
        return eight_bit(image, grey)
    except Exception as e:
        raise InputError(f"cannot read image {path}: {' '.join(str(e).split()) or type(e).__name__}") from e


def eight_bit(image: PIL.Image.Image, grey: bool) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` uint8 pixels; 16-bit and 32-bit integer images are scaled, not clipped."""
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I": one channel of 16 or 32 bits
        wide = np.asarray(image).astype(np.int64)
        bits = 16 if image.mode.startswith("I;16") or wide.max(initial=0) < 1 << 16 else 32
        image = PIL.Image.fromarray((wide >> (bits - 8)).clip(0, 255).astype(np.uint8), mode="L")
    return np.asarray(image.convert("L" if grey else "RGB"))


def check_image(path: Path, shape: tuple[int, int, int]) -> None:
    """Refuse an image file whose header does not open or whose size is not ``shape``'s, in one line."""
    rows, cols, _ = shape
    with open_image(path) as image:
        width, height = image.size
    if (height, width) != (rows, cols):
        raise InputError(
            f"image {path} is {height}x{width} (rows x cols), expected {rows}x{cols}: set "
            f"data.init_args.image_size or resize the images"
        )


def find_images(folder: Path, shape: tuple[int, int, int]) -> list[Path]:
    """Every image file under ``folder`` (sorted), after checking each header opens with the expected size.

    Checking here, in the main process, turns a bad file into one clear error instead of a crash inside
    a DataLoader worker mid-epoch. PIL reads only the header: about 0.1 ms a file on this project's CPU,
    so 2 minutes for ImageNet 64's 1.28M training images, once per run.
    """
    if folder.is_file():
        raise InputError(f"image folder {folder} is a file; give the folder that holds the images")
    if not folder.is_dir():
        size = "" if shape[0] == 8 else f" --size {shape[0]}"
        raise InputError(
            f"image folder {folder} not found; put images of one size there, or make tiny ones: "
            f"python -m sparse_transformer.data.images tiny {folder}{size}"
        )
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    for path in files:
        check_image(path, shape)
    return files


class ImageDataModule(SequenceDataModule):
    """Base for image DataModules: subclasses set ``self.train``, ``self.val``, ``self.test`` in ``setup``
    (:class:`ImageBytes` datasets, so ``dm.val[i]`` is the sequence the model reads).

    Training draws images at random with replacement from a seeded generator (as the text DataModule
    does); validation and test read their split in order.

    Args:
        image_size: rows and columns (square images).
        channels: 3 (RGB) or 1 (grey).
        batch_size: images per batch (per device).
        samples_per_epoch: training images per epoch; None is one pass worth.
        seed: seeds the training sampler and any train / val split.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 16,
        samples_per_epoch: int | None = None,
        num_workers: int = 0,
        seed: int = 1234,
    ):
        super().__init__(batch_size, samples_per_epoch, num_workers, seed)
        if image_size < 1:
            raise InputError(f"data image_size={image_size} must be >= 1")
        if channels not in (1, 3):
            raise InputError(f"data channels={channels} must be 1 (grey) or 3 (RGB)")
        self.shape = (image_size, image_size, channels)

    @property
    def seq_len(self) -> int:
        """Bytes per image, the model's context: the start token is input only, never a target."""
        return int(np.prod(self.shape))

    @property
    def modality(self) -> Image:
        return Image(self.shape)


class ImageFolderDataModule(ImageDataModule):
    """Any folder of images of one size (searched recursively), split at random into train and val.

    Args:
        root: the folder.
        val_fraction: share of the images held out for validation (and test), drawn with ``seed``.
    """

    def __init__(self, root: str, val_fraction: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if not 0 < val_fraction < 1:
            raise InputError(f"data val_fraction={val_fraction} must be between 0 and 1")
        self.root, self.val_fraction = Path(root), val_fraction

    def setup(self, stage: str | None = None) -> None:
        files = find_images(self.root, self.shape)
        n_val = max(1, round(self.val_fraction * len(files)))
        if n_val >= len(files):
            raise InputError(
                f"image folder {self.root} has {plural(len(files), 'image')}: too few to hold out {n_val} for validation"
            )
        self.files = files
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.train = ImageBytes(ImageFiles([files[i] for i in sorted(order[n_val:])], self.shape))
        self.val = self.test = ImageBytes(ImageFiles([files[i] for i in sorted(order[:n_val])], self.shape))

    def fingerprint(self) -> dict[str, Any]:
        return files_fingerprint(self.files, self.root)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 50,000 training images; the 10,000 test images serve as validation and test set,
    where density-modelling papers (this one included) report bits/dim.

    Args:
        root: folder holding (or to receive) ``cifar-10-batches-py``.
        download: fetch it when absent (170 MB, needs internet; :func:`prepare_cifar10`).
    """

    def __init__(self, root: str = "data/cifar10", download: bool = False, **kwargs):
        super().__init__(image_size=32, channels=3, **kwargs)
        self.save_hyperparameters()
        self.root, self.download = Path(root), download

    def prepare_data(self) -> None:
        if self.download:
            prepare_cifar10(self.root)

    def setup(self, stage: str | None = None) -> None:
        from torchvision.datasets import CIFAR10

        try:
            train, test = CIFAR10(str(self.root), train=True), CIFAR10(str(self.root), train=False)
        except RuntimeError as e:
            raise InputError(
                f"CIFAR-10 not found or corrupt under {self.root}; set data.init_args.download=true to fetch it, or "
                f"run python -m sparse_transformer.data.images cifar10 {self.root}"
            ) from e
        self.train = ImageBytes(ArrayImages(train.data))  # 50,000 images (32, 32, 3)
        self.val = self.test = ImageBytes(ArrayImages(test.data))  # 10,000


def cifar10_complete(folder: Path) -> bool:
    """True when ``folder`` holds CIFAR-10's files with their md5s, False when it is not there; refused when it
    holds part of them or others (a download unpacked in place, the way torchvision's did, and cut short)."""
    if not folder.exists():
        return False
    for name, md5 in CIFAR10_FILES.items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"{folder} is not all of CIFAR-10 ({name} is missing): delete it and download again")
        digest = file_checksum(path, "md5")
        if digest != md5:
            raise InputError(f"{path} has md5 {digest}, CIFAR-10's has {md5}: delete {folder} and download again")
    return True


def prepare_cifar10(root: Path, timeout: float = TIMEOUT) -> Path:
    """Download CIFAR-10 (resumable, md5-checked) and unpack ``cifar-10-batches-py`` into ``root``: the folder
    appears only when complete, and one there already is checked and kept (``data/download.py``)."""
    root = Path(root)
    by_hand = f"fetch {CIFAR10_TAR.name} from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it into {root}"
    return prepare(CIFAR10_TAR, root / CIFAR10_FOLDER, cifar10_complete, CIFAR10_UNPACKED, by_hand, timeout)


class ImageNet64DataModule(ImageDataModule):
    """Downsampled ImageNet 64x64 (van den Oord et al. 2016), the version the paper trains on.

    It is not downloadable without an ImageNet account, so there is no download command: the user supplies it, unpacking
    ``train_64x64.tar`` and ``valid_64x64.tar`` (PNG files) from image-net.org under ``root``. The later
    ``.npz`` release (Chrabaszcz et al. 2017) uses another resizing, so its bits/dim are not the paper's.

    Args:
        root: folder holding ``train_64x64/`` and ``valid_64x64/``.
    """

    def __init__(self, root: str = "data/imagenet64", **kwargs):
        super().__init__(image_size=64, channels=3, **kwargs)
        self.save_hyperparameters()
        self.root = Path(root)

    def setup(self, stage: str | None = None) -> None:
        folders = [self.root / "train_64x64", self.root / "valid_64x64"]
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing:
            raise InputError(
                f"downsampled ImageNet 64x64 not found ({', '.join(missing)} missing); get train_64x64.tar and "
                f"valid_64x64.tar (van den Oord et al. 2016; image-net.org, with an ImageNet account) and unpack "
                f"them under {self.root} (the .npz variant of Chrabaszcz et al. 2017 is resized differently and not read)"
            )
        self.files = [find_images(folder, self.shape) for folder in folders]
        self.train = ImageBytes(ImageFiles(self.files[0], self.shape))
        self.val = self.test = ImageBytes(ImageFiles(self.files[1], self.shape))

    def fingerprint(self) -> dict[str, Any]:
        return files_fingerprint(self.files[0] + self.files[1], self.root)


# Tiny images for the tiny image configs: python -m sparse_transformer.data.images tiny data/tiny-images

TINY_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # photographs scikit-image ships (skimage.data)


def tiny_images(folder: Path, size: int = 8, count: int = 64, source: str = "auto", seed: int = 0) -> str:
    """Write ``count`` RGB PNGs of ``size`` x ``size`` pixels to ``folder``, the same files for the same arguments.

    ``photos``: square crops of random size and place from photographs scikit-image ships, shrunk to ``size``
    (natural textures and edges). ``drawn``: a colour gradient with a disc and a bar, drawn from a seeded
    generator (no package needed). ``auto`` takes photos when scikit-image is installed. Returns the source used.
    """
    if size < 1 or count < 2:
        raise InputError(f"tiny images: size={size} must be >= 1 and count={count} >= 2 (one is held out)")
    if source == "auto":
        source = "photos" if _skimage_data() is not None else "drawn"
    rng = np.random.default_rng(seed)
    if source == "photos":
        skimage_data = _skimage_data()
        if skimage_data is None:
            raise InputError("tiny images from photos need scikit-image: pip install scikit-image (or --source drawn)")
        photos = [getattr(skimage_data, name)() for name in TINY_PHOTOS]
        images = [_crop(photos[i % len(photos)], size, rng) for i in range(count)]
    elif source == "drawn":
        images = [_drawn(size, rng) for _ in range(count)]
    else:
        raise InputError(f"tiny images: source={source!r} must be auto, photos or drawn")
    for i, pixels in enumerate(images):
        with atomic_file(Path(folder) / f"{source}-{i:04d}.png") as f:
            PIL.Image.fromarray(pixels).save(f, format="png")
    return source


def _skimage_data() -> Any:
    try:
        import skimage.data
    except ImportError:
        return None
    return skimage.data


def _crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A square crop (a tenth to half the shorter side) at a random place, shrunk to ``size`` (H, W, 3)."""
    photo = np.stack([photo] * 3, axis=-1) if photo.ndim == 2 else photo[..., :3]
    height, width = photo.shape[:2]
    short = min(height, width)
    side = int(rng.integers(max(size, short // 10), short // 2 + 1))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = PIL.Image.fromarray(photo[top : top + side, left : left + side])
    return np.asarray(crop.resize((size, size), PIL.Image.Resampling.LANCZOS))


def _drawn(size: int, rng: np.random.Generator) -> np.ndarray:
    """A gradient between two colours in a random direction, a disc and a horizontal or vertical bar (H, W, 3)."""
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)  # (H, W) each, in [0, 1]
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y + 1) / 2  # (H, W)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    pixels = (1 - t)[..., None] * a + t[..., None] * b  # (H, W, 3)
    centre, radius = rng.uniform(0.2, 0.8, 2), rng.uniform(0.15, 0.35)
    pixels[(x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2] = rng.integers(0, 256, 3)
    at, width = int(rng.integers(0, size)), max(1, size // 8)
    bar = (y if rng.random() < 0.5 else x) * (size - 1)
    pixels[(bar >= at) & (bar < at + width)] = rng.integers(0, 256, 3)
    return pixels.round().clip(0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sparse_transformer.data.images", description="Make image data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser(
        "tiny", help="a folder of tiny PNGs for configs/cifar10-tiny.yaml and imagenet64-tiny.yaml",
        description="Write tiny PNGs, the same files every time, in seconds.", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    tiny.add_argument("folder", type=Path, help="where the PNGs go (created)")
    tiny.add_argument("--size", type=int, default=8, help="rows and columns")
    tiny.add_argument("--count", type=int, default=64, help="how many")
    tiny.add_argument("--source", choices=("auto", "photos", "drawn"), default="auto",
                      help="photos: crops of scikit-image's photographs; drawn: gradients, discs and bars; auto: photos if scikit-image is installed")  # fmt: skip
    tiny.add_argument("--seed", type=int, default=0)
    cifar10 = commands.add_parser(
        "cifar10", help="download CIFAR-10 for configs/cifar10.yaml",
        description="Download CIFAR-10 (170 MB): resumable, md5-checked, unpacked atomically; nothing to do when it is there.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    cifar10.add_argument(
        "folder", type=Path, nargs="?", default=Path("data/cifar10"), help="where cifar-10-batches-py goes (created)"
    )
    cifar10.add_argument(
        "--timeout", type=float, default=TIMEOUT, help="seconds without a byte before a connection counts as stalled"
    )
    args = parser.parse_args(argv)
    if args.command == "cifar10":
        prepare_cifar10(args.folder, args.timeout)
        return
    source = tiny_images(args.folder, args.size, args.count, args.source, args.seed)
    what = f"crops of {', '.join(TINY_PHOTOS)} (scikit-image)" if source == "photos" else "drawn gradients, discs and bars"
    print(f"wrote {args.count} PNGs of {args.size}x{args.size} pixels to {args.folder}/: {what}")


if __name__ == "__main__":
    run_cli(main)
