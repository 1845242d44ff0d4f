"""Audio as bytes: files -> mono waveforms at a rate -> 8-bit mu-law codes, and codes back to WAV.

One place for the codec, below both the audio DataModule (which reads recordings to train on) and the audio
modality (which reads a recording to continue and writes samples). Files are read with soundfile (torchaudio
no longer does file I/O); torchaudio does the resampling and the mu-law transform.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

from sparse_transformer.errors import InputError

MU_LAW_CHANNELS = 256  # 8-bit mu-law, mu = 255

# File endings of the formats libsndfile reads (those this build has: soundfile.available_formats()).
FORMATS = {
    ".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG", ".opus": "OGG", ".mp3": "MP3", ".aiff": "AIFF",
    ".aif": "AIFF", ".aifc": "AIFF", ".au": "AU", ".caf": "CAF", ".w64": "W64", ".rf64": "RF64",
}  # fmt: skip
AUDIO_SUFFIXES = tuple(suffix for suffix, name in FORMATS.items() if name in soundfile.available_formats())
# Audio formats it does not read: refused by name rather than skipped like a stray text file.
UNREADABLE_SUFFIXES = (".m4a", ".aac", ".alac", ".wma", ".ape", ".amr", ".mka", ".webm")


def encode(waveform: torch.Tensor) -> torch.Tensor:
    """Waveform in [-1, 1] -> 8-bit mu-law codes (uint8)."""
    return AF.mu_law_encoding(waveform.clamp(-1, 1), MU_LAW_CHANNELS).to(torch.uint8)


def decode(codes: torch.Tensor) -> torch.Tensor:
    """8-bit mu-law codes -> waveform in [-1, 1] (float32)."""
    return AF.mu_law_decoding(codes.long(), MU_LAW_CHANNELS).float()


def wav_bytes(codes: torch.Tensor, sample_rate: int) -> bytes:
    """``(T,)`` mu-law codes as a 16-bit mono WAV file."""
    pcm = (decode(codes.cpu()).numpy() * 32767).round().astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buffer.getvalue()


def read_codes(path: Path, sample_rate: int) -> np.ndarray:
    """One file -> ``(T,)`` uint8 mu-law codes at ``sample_rate``, mono; a file cut short is refused."""
    path = Path(path)
    try:
        frames = soundfile.info(path).frames
        waveform, rate = soundfile.read(path, dtype="float32", always_2d=True)  # (T, channels)
    except (soundfile.LibsndfileError, RuntimeError) as e:
        raise InputError(f"cannot read audio file {path}: {e}") from e
    declared, actual = declared_size(path), path.stat().st_size
    if declared is not None and declared > actual:
        raise InputError(f"audio file {path} is cut short: its header says {declared} bytes, the file has {actual}")
    if len(waveform) < 0.99 * frames:  # compressed formats: fewer frames decode than the header promises
        raise InputError(f"audio file {path} is cut short: its header says {frames} frames, {len(waveform)} decode")
    check_finite(path, waveform, rate)
    mono = torch.from_numpy(waveform.mean(axis=1))
    if rate != sample_rate:
        mono = AF.resample(mono, rate, sample_rate)
    return encode(mono).numpy()


def check_finite(path: Path, waveform: np.ndarray, rate: int) -> None:
    """Refuse a float recording holding NaN or infinite samples, naming the first bad frame: mu-law would turn
    each into an extreme code without a word (integer formats cannot hold them)."""
    bad = ~np.isfinite(waveform).all(axis=1)  # (T,)
    if bad.any():
        frame = int(bad.argmax())
        value = waveform[frame][~np.isfinite(waveform[frame])][0]
        raise InputError(
            f"audio file {path} has a {value} sample at frame {frame:,} ({frame / rate:.3f} s) and "
            f"{int(bad.sum()):,} bad frames in all; repair or remove the file"
        )


def declared_size(path: Path) -> int | None:
    """The file size a RIFF (WAV) or IFF (AIFF) header declares; None for other formats or an unknown size.

    libsndfile reads a truncated WAV as a shorter one without a word, so the header is checked here.
    """
    with path.open("rb") as f:
        head = f.read(8)
    order = {b"RIFF": "little", b"FORM": "big"}.get(head[:4])
    if order is None or len(head) < 8:
        return None
    size = int.from_bytes(head[4:8], order)
    return None if size in (0, 0xFFFFFFFF) else size + 8  # streaming writers leave the size open
