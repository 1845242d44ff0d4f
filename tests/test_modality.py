"""Round trips between bytes and media: images exactly, mu-law within its quantisation bound."""

import io
import wave

import numpy as np
import torch
from PIL import Image

import pytest

from sparse_transformer.errors import InputError
from sparse_transformer.modality import Audio, Modality, Text, png_bytes
from sparse_transformer.modality import Image as ImageModality


def test_image_bytes_are_raster_order_with_channels_interleaved():
    image = torch.randint(0, 256, (4, 5, 3), dtype=torch.uint8)  # (H, W, C)
    flat = ImageModality.to_tokens(image)
    assert flat.shape == (60,)
    # Byte (r * W + c) * C + ch is channel ch of the pixel at row r, column c.
    assert flat[(2 * 5 + 3) * 3 + 1] == image[2, 3, 1]
    back = ImageModality((4, 5, 3)).to_images(flat[None].long())  # (1, C, H, W)
    assert torch.equal(back[0].permute(1, 2, 0), image)


def test_png_grid_decodes_to_the_same_pixels():
    images = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8)
    grid = Image.open(io.BytesIO(png_bytes(images, nrow=2)))
    assert grid.size == (2 * 7 + 1, 7 + 1)  # a 1-pixel border around each image
    pixels = torch.from_numpy(np.asarray(grid.convert("RGB"))).permute(2, 0, 1)  # (C, H, W)
    assert torch.equal(pixels[:, 1:7, 1:7], images[0]) and torch.equal(pixels[:, 1:7, 8:14], images[1])


def test_mu_law_error_is_within_the_quantisation_bound():
    x = torch.linspace(-1, 1, 20001)
    codes = Audio.to_tokens(x)
    assert codes.dtype == torch.uint8 and codes.min() == 0 and codes.max() == 255
    err = (Audio.to_waveform(codes) - x).abs()
    # 256 uniform levels of the companded signal: half a level is 1/255 there, which maps back to
    # at most (|x| + 1/mu) * ((1 + mu)^(1/255) - 1) in the waveform.
    mu = 255
    bound = (x.abs() + 1 / mu) * ((1 + mu) ** (1 / 255) - 1) + 1e-6
    assert (err <= bound).all()
    assert err.max() > 0.5 * bound.max()  # the bound is tight, not vacuous
    assert torch.equal(Audio.to_tokens(Audio.to_waveform(codes)), codes)


def test_wav_output_has_the_rate_and_length():
    codes = Audio.to_tokens(torch.sin(torch.arange(800) / 10))
    with wave.open(io.BytesIO(Audio(8000).wav_bytes(codes))) as w:
        assert (w.getframerate(), w.getnframes(), w.getnchannels(), w.getsampwidth()) == (8000, 800, 1, 2)


def test_units_and_file_names_follow_the_modality():
    text, image, audio = Text(), ImageModality((8, 8, 3)), Audio(8000)
    assert (text.unit, image.unit, audio.unit) == ("bpb", "bpd", "bpd")
    tokens = torch.randint(0, 256, (2, 192))
    assert list(text.files(tokens)) == ["sample_0.txt", "sample_1.txt"]
    assert list(image.files(tokens)) == ["samples.png"]
    assert list(audio.files(tokens)) == ["sample_0.wav", "sample_1.wav"]


def test_specs_round_trip_and_bad_ones_are_named():
    for modality in (Text(), ImageModality((8, 8, 3)), Audio(8000)):
        assert Modality.from_spec(modality.spec()) == modality
    assert Modality.from_spec(None) == Text()
    with pytest.raises(InputError, match="modality 'video' is not one of text, image, audio"):
        Modality.from_spec({"kind": "video"})


def test_how_samples_start_and_how_long_they_are():
    text, image, audio = Text(), ImageModality((4, 4, 3)), Audio(8000)
    assert text.first_tokens(None) == [10] and text.first_tokens(b"Hi") == [72, 105]
    assert image.first_tokens(None) == audio.first_tokens(None) == [0]
    assert text.sample_length(None, 64, prompt_len=4) == 61  # fills the context after the prompt
    assert text.sample_length(None, 64, prompt_len=500) == 64 and text.sample_length(1000, 64, 4) == 1000  # any length
    assert image.sample_length(None, 48, 1) == 48 and audio.sample_length(20, 64, 1) == 20
    assert audio.sample_length(None, 256, 1) == 8000  # one second at 8 kHz, more than one context
    with pytest.raises(InputError, match="--prompt is for text models; this checkpoint models images"):
        image.first_tokens(b"x")
    with pytest.raises(InputError, match="--length=5: an image sample has 48 tokens, one whole image"):
        image.sample_length(5, 48, 1)
    with pytest.raises(InputError, match="--complete needs an image checkpoint; this one models audio"):
        audio.complete(None, lambda n: None, 1, None)
