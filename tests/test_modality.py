"""Round trips between bytes and media: images exactly, mu-law within its quantisation bound."""

import io
import wave

import numpy as np
import torch
from PIL import Image

from sparse_transformer.modality import (
    TEXT,
    audio_modality,
    bytes_to_images,
    image_modality,
    image_to_bytes,
    mu_law_decode,
    mu_law_encode,
    png_bytes,
    samples_to_files,
    unit,
    wav_bytes,
)


def test_image_bytes_are_raster_order_with_channels_interleaved():
    image = torch.randint(0, 256, (4, 5, 3), dtype=torch.uint8)  # (H, W, C)
    flat = image_to_bytes(image)
    assert flat.shape == (60,)
    # Byte (r * W + c) * C + ch is channel ch of the pixel at row r, column c.
    assert flat[(2 * 5 + 3) * 3 + 1] == image[2, 3, 1]
    back = bytes_to_images(flat[None].long(), [4, 5, 3])  # (1, C, H, W)
    assert torch.equal(back[0].permute(1, 2, 0), image)


def test_png_grid_decodes_to_the_same_pixels():
    images = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8)
    grid = Image.open(io.BytesIO(png_bytes(images, nrow=2)))
    assert grid.size == (2 * 7 + 1, 7 + 1)  # a 1-pixel border around each image
    pixels = torch.from_numpy(np.asarray(grid.convert("RGB"))).permute(2, 0, 1)  # (C, H, W)
    assert torch.equal(pixels[:, 1:7, 1:7], images[0]) and torch.equal(pixels[:, 1:7, 8:14], images[1])


def test_mu_law_error_is_within_the_quantisation_bound():
    x = torch.linspace(-1, 1, 20001)
    codes = mu_law_encode(x)
    assert codes.dtype == torch.uint8 and codes.min() == 0 and codes.max() == 255
    err = (mu_law_decode(codes) - x).abs()
    # 256 uniform levels of the companded signal: half a level is 1/255 there, which maps back to
    # at most (|x| + 1/mu) * ((1 + mu)^(1/255) - 1) in the waveform.
    mu = 255
    bound = (x.abs() + 1 / mu) * ((1 + mu) ** (1 / 255) - 1) + 1e-6
    assert (err <= bound).all()
    assert err.max() > 0.5 * bound.max()  # the bound is tight, not vacuous
    assert torch.equal(mu_law_encode(mu_law_decode(codes)), codes)


def test_wav_output_has_the_rate_and_length():
    codes = mu_law_encode(torch.sin(torch.arange(800) / 10))
    with wave.open(io.BytesIO(wav_bytes(codes, 8000))) as w:
        assert (w.getframerate(), w.getnframes(), w.getnchannels(), w.getsampwidth()) == (8000, 800, 1, 2)


def test_units_and_file_names_follow_the_modality():
    assert (unit(TEXT), unit(image_modality((8, 8, 3))), unit(audio_modality(8000))) == ("bpb", "bpd", "bpd")
    tokens = torch.randint(0, 256, (2, 192))
    assert list(samples_to_files(tokens, TEXT)) == ["sample_0.txt", "sample_1.txt"]
    assert list(samples_to_files(tokens, image_modality((8, 8, 3)))) == ["samples.png"]
    assert list(samples_to_files(tokens, audio_modality(8000))) == ["sample_0.wav", "sample_1.wav"]
