"""What the bytes mean: text, images or audio, and how generated tokens become files again.

The model reads byte sequences whatever the data (section 7 of the paper): text as raw bytes, an image in
raster order with channels interleaved (32x32x3 -> 3072 bytes), audio as 8-bit mu-law codes. A DataModule
describes its data with one of the :class:`Modality` objects below; ``train.py`` links it to the
LightningModule, which resolves the model's config against it and keeps it in the checkpoint, so
``sample.py`` and ``SampleLogger`` write samples the way the data was. Each modality owns what differs
between them: its codec, its metric unit, the defaults it gives the model (stride, positional shape), how a
sample starts and how long it is, the files and TensorBoard entries a sample becomes, and which of
``sample.py``'s options it takes.

Images and audio are modelled with a start token at position 0 (batches are ``[B, N + 1]``: START, then the
N bytes), so every one of the N dims is predicted and bits/dim compare with the paper. Position 0 always
holds START, so it needs no vocabulary entry of its own: the positional embedding tells it apart.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torchvision.utils import make_grid, save_image

from sparse_transformer import audio_codec
from sparse_transformer.errors import InputError
from sparse_transformer.model.config import ModelConfig
from sparse_transformer.model.patterns import sqrt_stride

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

START = 0  # the token before the first byte of an image or audio window
MIN_PICTURE = 256  # pixels on the short side of a picture a person is shown: grids are scaled up to it


class Modality:
    """What a DataModule's byte sequences are. Subclasses: :class:`Text`, :class:`Image`, :class:`Audio`."""

    noun: ClassVar[str]  # how messages name the data ("this checkpoint models images")
    unit: ClassVar[str] = "bpd"  # metric suffix: bits per dim, as image and audio papers report
    start: ClassVar[tuple[int, ...]] = (START,)  # tokens before the data in every window
    default_out: ClassVar[str | None] = "samples"  # sample.py's folder when --out is not given (None: print)
    options: ClassVar[tuple[str, ...]] = ()  # the sample.py options a checkpoint of this modality takes

    def resolve(self, config: ModelConfig) -> ModelConfig:
        """``config`` for this data: the stride and positional axes it leaves out follow from the data."""
        n, pattern = config.context, config.pattern
        stride = pattern.stride
        if pattern.needs_stride and stride is None:
            stride = self.default_stride(n, pattern.block_size)
        return config.resolve(stride, self.positions(n, stride), source=self.noun)

    def default_stride(self, seq_len: int, block_size: int) -> int:
        """The pattern's stride when the config leaves it out: the model's own default, l ~ sqrt(N) (section 4.2)."""
        return sqrt_stride(seq_len, block_size)

    def positions(self, seq_len: int, stride: int | None) -> tuple[int, ...] | None:
        """Axes of the factorized positional embedding when the config leaves them out (None: the model's default,
        ``config.default_positions``: 1-D for a short context, a matrix for a long one)."""
        return None

    def prompt(self, text: str | None = None, file: Path | None = None) -> list[int]:
        """The tokens every sample starts from."""
        return list(self.start)

    def default_length(self, seq_len: int, prompt_len: int) -> int:
        """Tokens to generate when no length is asked for: one context."""
        return seq_len

    def strip(self, tokens: torch.Tensor) -> torch.Tensor:
        """Generated ``[S, T]`` -> the data it stands for: the start token removed."""
        return tokens[:, len(self.start) :]

    def files(self, tokens: torch.Tensor, scale: int | None = None) -> dict[str, bytes]:
        """Samples ``[S, N]`` (start token removed) -> file name -> contents; pictures with ``scale`` x ``scale``
        screen pixels per pixel (default: big enough to see, :func:`image_grid`)."""
        raise NotImplementedError

    def log(self, writer: SummaryWriter, tokens: torch.Tensor, step: int) -> None:
        """Samples ``[S, N]`` to TensorBoard."""
        raise NotImplementedError


@dataclass(frozen=True)
class Text(Modality):
    """Raw bytes, continued from a prompt; metrics in bits per byte."""

    noun: ClassVar[str] = "text"
    unit: ClassVar[str] = "bpb"
    start: ClassVar[tuple[int, ...]] = ()
    default_out: ClassVar[str | None] = None
    options: ClassVar[tuple[str, ...]] = ("prompt", "prompt_file", "length")

    def prompt(self, text: str | None = None, file: Path | None = None) -> list[int]:
        """The prompt's bytes (default: a newline), kept at the start of the sample; from a UTF-8 file with ``file``."""
        if text is not None and file is not None:
            raise InputError("give --prompt or --prompt-file, not both")
        if file is not None:
            data = read_prompt(file)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"--prompt-file {file} is not UTF-8 text (byte {e.start}); give a text file") from e
        text = "\n" if text is None else text
        if not text:
            raise InputError("the prompt is empty; give at least one character (the default is a newline)")
        return list(text.encode("utf-8"))

    def default_length(self, seq_len: int, prompt_len: int) -> int:
        """Fill the context after the prompt, or one context more after a prompt that fills it."""
        return seq_len + 1 - prompt_len if prompt_len <= seq_len else seq_len

    def files(self, tokens: torch.Tensor, scale: int | None = None) -> dict[str, bytes]:
        return {f"sample_{i}.txt": bytes(row.tolist()) for i, row in enumerate(tokens)}

    def log(self, writer: SummaryWriter, tokens: torch.Tensor, step: int) -> None:
        for i, row in enumerate(tokens):
            text = bytes(row.tolist()).decode("utf-8", errors="replace")
            writer.add_text(f"samples/{i}", f"```\n{text}\n```", step)


@dataclass(frozen=True)
class Image(Modality):
    """Images of ``shape`` (rows, cols, channels) as bytes in raster order, channels interleaved."""

    shape: tuple[int, int, int]
    noun: ClassVar[str] = "images"
    options: ClassVar[tuple[str, ...]] = ("complete", "complete_from", "data_root", "scale")

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))

    def default_stride(self, seq_len: int, block_size: int) -> int:
        """One row (cols x channels): "attend to the row, then the column" (section 4.2)."""
        return self.shape[1] * self.shape[2]

    def positions(self, seq_len: int, stride: int | None) -> tuple[int, ...]:
        """(row, column, channel): one small table per axis (section 5.1)."""
        return self.shape

    @property
    def top_half(self) -> int:
        """Tokens of a window up to the middle row: the start token and the top rows, what completion keeps."""
        rows, cols, channels = self.shape
        return len(self.start) + (rows // 2) * cols * channels

    @staticmethod
    def to_tokens(image: torch.Tensor) -> torch.Tensor:
        """``(H, W, C)`` uint8 -> ``(H * W * C,)`` in raster order, channels interleaved (r, g, b, r, ...)."""
        return image.reshape(-1)

    def to_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, H * W * C)`` bytes -> ``(B, C, H, W)`` uint8, the layout torchvision writes."""
        return tokens.to(torch.uint8).reshape(-1, *self.shape).permute(0, 3, 1, 2)

    def files(self, tokens: torch.Tensor, scale: int | None = None) -> dict[str, bytes]:
        return {"samples.png": png_bytes(self.to_images(tokens), scale=scale)}

    def log(self, writer: SummaryWriter, tokens: torch.Tensor, step: int) -> None:
        writer.add_image("samples", image_grid(self.to_images(tokens)), step)

    def comparison(self, originals: torch.Tensor, completed: torch.Tensor, scale: int | None = None) -> bytes:
        """Windows ``[n, 1 + N]`` before and after completion as one PNG whose rows are corrupted (the part the
        model did not see in mid grey) / completed / original."""
        corrupted = originals.clone()
        corrupted[:, self.top_half :] = 128
        triples = self.strip(torch.stack([corrupted, completed, originals], dim=1).flatten(0, 1))  # (3n, N)
        return png_bytes(self.to_images(triples), nrow=3, scale=scale)


@dataclass(frozen=True)
class Audio(Modality):
    """Mono audio at ``sample_rate`` as 8-bit mu-law codes, one byte per step (``audio_codec.py``)."""

    sample_rate: int
    noun: ClassVar[str] = "audio"
    options: ClassVar[tuple[str, ...]] = ("prompt_file", "length", "seconds")

    def positions(self, seq_len: int, stride: int | None) -> tuple[int, ...] | None:
        """(row, column) of a matrix as wide as the stride, as the paper embeds audio (section 5.1)."""
        return (seq_len // stride, stride) if stride and seq_len % stride == 0 else None

    def prompt(self, text: str | None = None, file: Path | None = None) -> list[int]:
        """The start token, then the recording in ``file`` to continue (any file the audio DataModule reads,
        mixed to mono and resampled to the model's rate)."""
        if file is None:
            return list(self.start)
        check_prompt_file(file)
        return list(self.start) + audio_codec.read_codes(file, self.sample_rate).tolist()

    def default_length(self, seq_len: int, prompt_len: int) -> int:
        """One context, and at least one second: shorter is too short to hear."""
        return max(seq_len, self.sample_rate)

    def files(self, tokens: torch.Tensor, scale: int | None = None) -> dict[str, bytes]:
        return {f"sample_{i}.wav": audio_codec.wav_bytes(row, self.sample_rate) for i, row in enumerate(tokens)}

    def log(self, writer: SummaryWriter, tokens: torch.Tensor, step: int) -> None:
        for i, row in enumerate(tokens):
            writer.add_audio(f"samples/{i}", audio_codec.decode(row)[None], step, sample_rate=self.sample_rate)


# Checkpoints carry the modality; let torch.load(weights_only=True) rebuild it.
torch.serialization.add_safe_globals([Text, Image, Audio])


def check_prompt_file(path: Path) -> None:
    """A missing prompt file or a folder: one line naming it."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--prompt-file {path} is a folder; give a file")
    if not path.is_file():
        raise InputError(f"--prompt-file {path} not found")


def read_prompt(path: Path) -> bytes:
    """A prompt file's bytes, or one line saying why there are none."""
    check_prompt_file(path)
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"--prompt-file {path} cannot be read ({e.strerror})") from e


def image_grid(images: torch.Tensor, nrow: int | None = None, scale: int | None = None) -> torch.Tensor:
    """``(B, C, H, W)`` uint8 images -> one ``(3, H', W')`` float grid, ``nrow`` images per row (default: square),
    each pixel ``scale`` x ``scale`` (default: enough for ``MIN_PICTURE`` pixels on the grid's short side)."""
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    grid = make_grid(images.float() / 255, nrow=nrow, padding=1, pad_value=1.0)  # (3, H', W')
    scale = scale or math.ceil(MIN_PICTURE / min(grid.shape[1:]))
    return grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # nearest neighbour: pixels stay pixels


def png_bytes(images: torch.Tensor, nrow: int | None = None, scale: int | None = None) -> bytes:
    """``(B, C, H, W)`` uint8 images as one PNG grid (see :func:`image_grid`)."""
    buffer = io.BytesIO()
    save_image(image_grid(images, nrow, scale), buffer, format="png")
    return buffer.getvalue()
