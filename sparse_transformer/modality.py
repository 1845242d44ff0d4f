"""What the bytes mean: text, images or audio, and how generated tokens become files again.

The model reads byte sequences whatever the data (section 7 of the paper): text as raw bytes, an image in
raster order with channels interleaved (32x32x3 -> 3072 bytes), audio as 8-bit mu-law codes. A DataModule
describes its data with one of the :class:`Modality` objects below; ``train.py`` hands its ``spec()`` to the
LightningModule, which records it in the checkpoint, so ``sample.py`` and ``SampleLogger`` write samples the
way the data was. Each modality owns what differs between them: its codec, its metric unit, its positional
shape and default stride, how a sample starts and how long it is, the files and TensorBoard entries a sample
becomes, and (images) completion.

Images and audio are modelled with a start token at position 0 (batches are ``[B, N + 1]``: START, then the
N bytes), so every one of the N dims is predicted and bits/dim compare with the paper. Position 0 always
holds START, so it needs no vocabulary entry of its own: the positional embedding tells it apart.
"""

from __future__ import annotations

import io
import math
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torchaudio.functional as AF
from torchvision.utils import make_grid, save_image

from sparse_transformer.errors import InputError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from sparse_transformer.model import SparseTransformer
    from sparse_transformer.sampling import Sampling

START = 0  # the token before the first byte of an image or audio window
MU_LAW_CHANNELS = 256  # 8-bit mu-law, mu = 255


class Modality:
    """What a DataModule's byte sequences are. Subclasses: :class:`Text`, :class:`Image`, :class:`Audio`."""

    kind: ClassVar[str]  # the name a spec records
    noun: ClassVar[str]  # how messages name the data ("this checkpoint models images")
    unit: ClassVar[str] = "bpd"  # metric suffix: bits per dim, as image and audio papers report
    start: ClassVar[tuple[int, ...]] = (START,)  # tokens before the data in every window
    default_out: ClassVar[str | None] = "samples"  # sample.py's folder when --out is not given (None: print)

    def spec(self) -> dict[str, Any]:
        """The plain dict a checkpoint records; :meth:`from_spec` turns it back into the object."""
        return {"kind": self.kind}

    @staticmethod
    def from_spec(spec: dict[str, Any] | None) -> Modality:
        if spec is None:
            return Text()
        kinds = {cls.kind: cls for cls in (Text, Image, Audio)}
        options = {k: v for k, v in spec.items() if k != "kind"}
        if spec.get("kind") not in kinds:
            raise InputError(f"modality {spec.get('kind')!r} is not one of {', '.join(kinds)}")
        try:
            return kinds[spec["kind"]](**options)
        except TypeError as e:
            raise InputError(f"modality spec {spec} does not describe {spec['kind']} data ({e})") from e

    def default_stride(self, seq_len: int, block_size: int) -> int:
        """The pattern's stride when the config leaves it out: l ~ sqrt(N) in whole blocks (section 4.2)."""
        return max(block_size, round(math.sqrt(seq_len) / block_size) * block_size)

    def positions(self, seq_len: int, stride: int | None) -> tuple[int, ...]:
        """Axes of the factorized positional embedding when the config leaves them out: 1-D here."""
        return (seq_len,)

    def first_tokens(self, prompt: bytes | None = None, prompt_file: Path | None = None) -> list[int]:
        """What every sample starts from: the start token (a text prompt is for text models only)."""
        if prompt is not None:
            raise InputError(f"--prompt is for text models; this checkpoint models {self.noun}")
        if prompt_file is not None:
            raise InputError(f"--prompt-file is for text and audio models; this checkpoint models {self.noun}")
        return list(self.start)

    def sample_length(self, length: int | None, seq_len: int, prompt_len: int) -> int:
        """Tokens to generate for a request of ``length``, any number (None: ``default_length``)."""
        length = self.default_length(seq_len) if length is None else length
        if length < 1:
            raise InputError(f"--length={length} must be >= 1")
        return length

    def default_length(self, seq_len: int) -> int:
        """A sample's length when none is asked for: one context."""
        return seq_len

    def tokens_per_second(self) -> int:
        """For ``--seconds``: audio only."""
        raise InputError(f"--seconds is for audio models; this checkpoint models {self.noun} (give --length)")

    def strip(self, tokens: torch.Tensor) -> torch.Tensor:
        """Generated ``[S, T]`` -> the data it stands for: the start token removed."""
        return tokens[:, len(self.start) :]

    def files(self, tokens: torch.Tensor) -> dict[str, bytes]:
        """Samples ``[S, N]`` (start token removed) -> file name -> contents."""
        raise NotImplementedError

    def log(self, writer: SummaryWriter, tokens: torch.Tensor, step: int) -> None:
        """Samples ``[S, N]`` to TensorBoard."""
        raise NotImplementedError

    def complete(
        self, model: SparseTransformer, originals: Callable[[int], torch.Tensor], n: int, sampling: Sampling
    ) -> tuple[torch.Tensor, bytes]:
        """Complete ``n`` examples read by ``originals(n)`` (``[n, 1 + N]``); returns them and a picture."""
        raise InputError(f"--complete needs an image checkpoint; this one models {self.noun}")


@dataclass(frozen=True)
class Text(Modality):
    """Raw bytes, continued from a prompt; metrics in bits per byte."""

    kind: ClassVar[str] = "text"
    noun: ClassVar[str] = "text"
    unit: ClassVar[str] = "bpb"
    start: ClassVar[tuple[int, ...]] = ()
    default_out: ClassVar[str | None] = None

    def first_tokens(self, prompt: bytes | None = None, prompt_file: Path | None = None) -> list[int]:
        """The prompt's bytes (default: a newline), kept at the start of the sample; from a UTF-8 file with
        ``prompt_file``."""
        if prompt is not None and prompt_file is not None:
            raise InputError("give --prompt or --prompt-file, not both")
        if prompt_file is not None:
            prompt = read_prompt(prompt_file)
            try:
                prompt.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"--prompt-file {prompt_file} is not UTF-8 text (byte {e.start}); give a text file") from e
        prompt = b"\n" if prompt is None else prompt
        if not prompt:
            raise InputError("the prompt is empty; give at least one character (the default is a newline)")
        return list(prompt)

    def sample_length(self, length: int | None, seq_len: int, prompt_len: int) -> int:
        """Default: fill the context after the prompt, or one context more after a prompt that fills it."""
        if length is None:
            return seq_len + 1 - prompt_len if prompt_len <= seq_len else seq_len
        return super().sample_length(length, seq_len, prompt_len)

    def files(self, tokens: torch.Tensor) -> dict[str, bytes]:
        return {f"sample_{i}.txt": bytes(row.tolist()) for i, row in enumerate(tokens)}

    def log(self, writer: SummaryWriter, tokens: torch.Tensor, step: int) -> None:
        for i, row in enumerate(tokens):
            text = bytes(row.tolist()).decode("utf-8", errors="replace")
            writer.add_text(f"samples/{i}", f"```\n{text}\n```", step)


@dataclass(frozen=True)
class Image(Modality):
    """Images of ``shape`` (rows, cols, channels) as bytes in raster order, channels interleaved."""

    shape: tuple[int, int, int]
    kind: ClassVar[str] = "image"
    noun: ClassVar[str] = "images"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape)}

    def default_stride(self, seq_len: int, block_size: int) -> int:
        """One row (cols x channels): "attend to the row, then the column" (section 4.2)."""
        return self.shape[1] * self.shape[2]

    def positions(self, seq_len: int, stride: int | None) -> tuple[int, ...]:
        """(row, column, channel): one small table per axis (section 5.1)."""
        return self.shape

    def sample_length(self, length: int | None, seq_len: int, prompt_len: int) -> int:
        if length not in (None, seq_len):
            raise InputError(f"--length={length}: an image sample has {seq_len} tokens, one whole image")
        return seq_len

    @staticmethod
    def to_tokens(image: torch.Tensor) -> torch.Tensor:
        """``(H, W, C)`` uint8 -> ``(H * W * C,)`` in raster order, channels interleaved (r, g, b, r, ...)."""
        return image.reshape(-1)

    def to_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, H * W * C)`` bytes -> ``(B, C, H, W)`` uint8, the layout torchvision writes."""
        return tokens.to(torch.uint8).reshape(-1, *self.shape).permute(0, 3, 1, 2)

    def files(self, tokens: torch.Tensor) -> dict[str, bytes]:
        return {"samples.png": png_bytes(self.to_images(tokens))}

    def log(self, writer: SummaryWriter, tokens: torch.Tensor, step: int) -> None:
        writer.add_image("samples", image_grid(self.to_images(tokens)), step)

    def complete(
        self, model: SparseTransformer, originals: Callable[[int], torch.Tensor], n: int, sampling: Sampling
    ) -> tuple[torch.Tensor, bytes]:
        """Prime with the top half of each of ``n`` images and generate the rest; returns the completed images
        ``[n, N]`` and a PNG grid whose rows are corrupted / completed / original."""
        from sparse_transformer.sampling import generate

        if n < 1:
            raise InputError(f"--complete {n}: give the number of images to complete, at least 1")
        originals = originals(n).to(model.head.weight.device)  # (n, 1 + N)
        rows, cols, channels = self.shape
        primed = len(self.start) + (rows // 2) * cols * channels  # start token + the top rows
        completed = generate(model, originals[:, :primed], originals.shape[1] - primed, sampling)
        corrupted = originals.clone()
        corrupted[:, primed:] = 128  # the part the model did not see, in mid grey
        triples = self.strip(torch.stack([corrupted, completed, originals], dim=1).flatten(0, 1))  # (3n, N)
        return self.strip(completed), png_bytes(self.to_images(triples), nrow=3)


@dataclass(frozen=True)
class Audio(Modality):
    """Mono audio at ``sample_rate`` as 8-bit mu-law codes, one byte per step."""

    sample_rate: int
    kind: ClassVar[str] = "audio"
    noun: ClassVar[str] = "audio"

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "sample_rate": self.sample_rate}

    def positions(self, seq_len: int, stride: int | None) -> tuple[int, ...]:
        """(row, column) of a matrix as wide as the stride, as the paper embeds audio (section 5.1)."""
        return (seq_len // stride, stride) if stride and seq_len % stride == 0 else (seq_len,)

    def first_tokens(self, prompt: bytes | None = None, prompt_file: Path | None = None) -> list[int]:
        """The start token, then the recording in ``prompt_file`` to continue (any file the audio DataModule
        reads, mixed to mono and resampled to the model's rate)."""
        tokens = super().first_tokens(prompt)
        if prompt_file is None:
            return tokens
        from sparse_transformer.data.audio import load_mu_law

        check_prompt_file(prompt_file)
        return tokens + load_mu_law(Path(prompt_file), self.sample_rate).tolist()

    def default_length(self, seq_len: int) -> int:
        """One context, and at least one second: shorter is too short to hear."""
        return max(seq_len, self.sample_rate)

    def tokens_per_second(self) -> int:
        return self.sample_rate

    @staticmethod
    def to_tokens(waveform: torch.Tensor) -> torch.Tensor:
        """Waveform in [-1, 1] -> 8-bit mu-law codes (uint8)."""
        return AF.mu_law_encoding(waveform.clamp(-1, 1), MU_LAW_CHANNELS).to(torch.uint8)

    @staticmethod
    def to_waveform(codes: torch.Tensor) -> torch.Tensor:
        """8-bit mu-law codes -> waveform in [-1, 1] (float32)."""
        return AF.mu_law_decoding(codes.long(), MU_LAW_CHANNELS).float()

    def wav_bytes(self, codes: torch.Tensor) -> bytes:
        """``(T,)`` mu-law codes as a 16-bit mono WAV file."""
        pcm = (self.to_waveform(codes.cpu()).numpy() * 32767).round().astype("<i2")
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(self.sample_rate)
            w.writeframes(pcm.tobytes())
        return buffer.getvalue()

    def files(self, tokens: torch.Tensor) -> dict[str, bytes]:
        return {f"sample_{i}.wav": self.wav_bytes(row) for i, row in enumerate(tokens)}

    def log(self, writer: SummaryWriter, tokens: torch.Tensor, step: int) -> None:
        for i, row in enumerate(tokens):
            writer.add_audio(f"samples/{i}", self.to_waveform(row)[None], step, sample_rate=self.sample_rate)


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


def image_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """``(B, C, H, W)`` uint8 images -> one ``(3, H', W')`` float grid, ``nrow`` images per row (default: square)."""
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    return make_grid(images.float() / 255, nrow=nrow, padding=1, pad_value=1.0)


def png_bytes(images: torch.Tensor, nrow: int | None = None) -> bytes:
    """``(B, C, H, W)`` uint8 images as one PNG grid."""
    buffer = io.BytesIO()
    save_image(image_grid(images, nrow), buffer, format="png")
    return buffer.getvalue()
