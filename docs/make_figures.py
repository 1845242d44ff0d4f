"""The README's pictures and sounds, from data no one on this project made: photographs scikit-image ships
and speech espeak-ng speaks. Every step runs the project's own command lines, printed as it goes.

    pip install -e '.[docs]'
    python docs/make_figures.py photos   # ~25 min on 2 CPU cores
    python docs/make_figures.py speech   # needs espeak-ng (Debian / Ubuntu: apt install espeak-ng); ~25 min

photos: 16x16 crops of four photographs train ``configs/docs/photos.yaml`` (on top of cifar10-tiny.yaml);
crops of a fifth, held out, are completed. speech: thirty sentences in six voices train
``configs/docs/speech.yaml`` (on top of audio-tiny.yaml); a held-out sentence in a held-out voice is
continued from its first half second. A killed run resumes where it stopped (``--ckpt_path last``).
Figures go to docs/figures/, data to data/, runs to runs/*-photos and runs/*-speech.
"""

from __future__ import annotations

import argparse
import io
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from sparse_transformer.audio_codec import decode, read_codes  # noqa: E402
from sparse_transformer.errors import InputError, run_cli  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402

FIGURES = ROOT / "docs" / "figures"
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field")
HELD_OUT_PHOTO = "chelsea"  # the cat
CROP = 16
ZOOM = 6  # the README shows 16x16 images 6 times larger, each pixel a square

# Harvard sentences (IEEE Recommended Practice for Speech Quality Measurements, 1969), lists 1 to 3.
SENTENCES = """The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background.
It's easy to tell the depth of a well. These days a chicken leg is a rare dish. Rice is often served in round
bowls. The juice of lemons makes fine punch. The box was thrown beside the parked truck. The hogs were fed
chopped corn and garbage. Four hours of steady work faced us. A large size in stockings is hard to sell.
The boy was there when the sun rose. A rod is used to catch pink salmon. The source of the huge river is the
clear spring. Kick the ball straight and follow through. Help the woman get back to her feet. A pot of tea
helps to pass the evening. Smoky fires lack flame and heat. The soft cushion broke the man's fall. The salt
breeze came across from the sea. The girl at the booth sold fifty bonds. The small pup gnawed a hole in the
sock. The fish twisted and turned on the bent hook. Press the pants and sew a button on the vest. The swan
dive was far short of perfect. The beauty of the view stunned the young boy. Two blue fish swam in the tank.
Her purse was full of useless trash. The colt reared and threw the tall rider. It snowed, rained, and hailed
the same morning. Read verse out loud for pleasure."""
VOICES = (("en-us", 150), ("en-us+f3", 160), ("en-gb", 140), ("en-gb+f2", 170), ("en-029", 150), ("en-gb-scotland+m3", 160))
HELD_OUT_SPEECH = ("Hoist the load to your left shoulder.", "en-gb-x-rp+f4", 150)
SPEECH_TEMPERATURE = 0.8  # at 1 this small model's continuations are mostly noise; lower, they fall silent


def command(*args: str) -> None:
    """Run one of the project's command lines, shown as a user would type it; stop if it fails."""
    print(f"\n$ python {shlex.join(args)}", flush=True)
    if subprocess.run([sys.executable, *args], cwd=ROOT).returncode != 0:
        sys.exit(f"{args[0]} failed (above)")


def train(configs: tuple[str, ...], run: Path) -> Path:
    """Train through train.py, resuming the run if a previous try left one; returns its last checkpoint."""
    resume = ["--ckpt_path", "last"] if (run / "checkpoints" / "last.ckpt").is_file() else []
    command("train.py", "fit", *(a for c in configs for a in ("--config", c)), *resume)
    return run / "checkpoints" / "last.ckpt"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return buffer.getvalue()


def crops(photo: np.ndarray, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """``n`` square crops of random size (32 pixels to half the shorter side) and place, each shrunk to 16x16."""
    height, width = photo.shape[:2]
    out = []
    for _ in range(n):
        side = int(rng.integers(32, min(height, width) // 2 + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side, :3])
        out.append(crop.resize((CROP, CROP), Image.Resampling.LANCZOS))
    return out


def photos() -> None:
    try:
        import skimage.data
    except ImportError as e:
        raise InputError("photos need scikit-image: pip install -e '.[docs]'") from e
    data, rng = ROOT / "data" / "photo-crops", np.random.default_rng(0)
    for name in (*TRAIN_PHOTOS, HELD_OUT_PHOTO):
        folder = data / ("held-out" if name == HELD_OUT_PHOTO else "train")
        for i, crop in enumerate(crops(getattr(skimage.data, name)(), 40 if name == HELD_OUT_PHOTO else 1000, rng)):
            write_atomic(folder / f"{name}-{i:04d}.png", png(crop))
    print(f"wrote {len(TRAIN_PHOTOS)} x 1000 training crops and 40 held-out crops ({HELD_OUT_PHOTO}) to {data}")

    ckpt = train(("configs/cifar10-tiny.yaml", "configs/docs/photos.yaml"), ROOT / "runs" / "cifar10-tiny-photos")
    out = ckpt.parents[1] / "figures"  # 16x16 pixels a side; the README's copies are larger
    command("sample.py", "--ckpt", str(ckpt.relative_to(ROOT)), "--num-samples", "16", "--out", str(out.relative_to(ROOT)))
    completion = ("--complete", "6", "--complete-from", str((data / "held-out").relative_to(ROOT)))
    command("sample.py", "--ckpt", str(ckpt.relative_to(ROOT)), *completion, "--out", str(out.relative_to(ROOT)))
    for name in ("samples", "completions"):
        grid = Image.open(out / f"{name}.png")
        big = grid.resize((grid.width * ZOOM, grid.height * ZOOM), Image.Resampling.NEAREST)
        write_atomic(FIGURES / f"photo-{name}.png", png(big))
    print(f"wrote {FIGURES / 'photo-samples.png'} and {FIGURES / 'photo-completions.png'}")


def speak(text: str, voice: str, rate: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(path), text], check=True, capture_output=True)
    except FileNotFoundError as e:
        raise InputError("speech needs espeak-ng (Debian / Ubuntu: apt install espeak-ng)") from e


def speech() -> None:
    sentences = [s.strip() + "." for s in " ".join(SENTENCES.split()).split(".") if s.strip()]
    data = ROOT / "data" / "speech"
    for v, (voice, rate) in enumerate(VOICES):
        for i, sentence in enumerate(sentences):
            speak(sentence, voice, rate, data / "train" / f"voice{v}-{i:02d}.wav")
    text, voice, rate = HELD_OUT_SPEECH
    speak(text, voice, rate, data / "held-out.wav")
    print(f"wrote {len(sentences)} sentences x {len(VOICES)} voices to {data / 'train'}, and {data / 'held-out.wav'}")

    ckpt = train(("configs/audio-tiny.yaml", "configs/docs/speech.yaml"), ROOT / "runs" / "audio-tiny-speech")
    out = FIGURES / "speech"
    wave, rate = soundfile.read(data / "held-out.wav", dtype="float32")  # espeak-ng speaks at 22,050 Hz
    prompt = io.BytesIO()
    soundfile.write(prompt, wave[: rate // 2], rate, format="WAV")  # the first half second, for sample.py to resample
    write_atomic(out / "prompt.wav", prompt.getvalue())
    command("sample.py", "--ckpt", str(ckpt.relative_to(ROOT)), "--prompt-file", str((out / "prompt.wav").relative_to(ROOT)),
            "--seconds", "1.5", "--num-samples", "2", "--temperature", str(SPEECH_TEMPERATURE),
            "--out", str(out.relative_to(ROOT)))  # fmt: skip
    continued = [soundfile.read(out / f"sample_{i}.wav", dtype="float32") for i in range(2)]
    recording = decode(torch.from_numpy(read_codes(data / "held-out.wav", continued[0][1]))).numpy()
    plot_speech(recording, [w for w, _ in continued], continued[0][1], FIGURES / "speech.png")
    print(f"wrote {FIGURES / 'speech.png'} and the sounds in {out}")


def plot_speech(recording: np.ndarray, continued: list[np.ndarray], rate: int, path: Path) -> None:
    """Spectrograms on one decibel scale (the recording's loudest 80 dB): the held-out recording, then the
    model's continuations of its first half second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import mlab

    rows = [("held-out recording", recording[: len(continued[0])])] + [
        (f"model: continuation {i + 1} of the first 0.5 s (temperature {SPEECH_TEMPERATURE})", wave)
        for i, wave in enumerate(continued)
    ]
    loudest = 10 * np.log10(mlab.specgram(recording, NFFT=256, Fs=rate, noverlap=192)[0].max())
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.2 * len(rows)), sharex=True, layout="constrained")
    for ax, (title, wave) in zip(axes, rows):
        spectrum = mlab.specgram(wave, NFFT=256, Fs=rate, noverlap=192)[0]
        ax.imshow(10 * np.log10(np.maximum(spectrum, 1e-20)), origin="lower", aspect="auto", cmap="magma",
                  vmin=loudest - 80, vmax=loudest, extent=(0, len(wave) / rate, 0, rate / 2))  # fmt: skip
        ax.axvline(0.5, color="white", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("frequency (Hz)")
    axes[-1].set_xlabel("time (s); dashed: end of the prompt")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    write_atomic(path, png(Image.open(buffer).convert("RGB").quantize(colors=128)))  # a quarter of the bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figures", nargs="+", choices=("photos", "speech"))
    for name in p.parse_args().figures:
        {"photos": photos, "speech": speech}[name]()


if __name__ == "__main__":
    run_cli(main)
