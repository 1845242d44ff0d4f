"""Round trips between bytes and media: images exactly, mu-law within its quantisation bound."""

import io
import wave

import numpy as np
import torch
from PIL import Image

import pytest

from sparse_transformer import audio_codec
from sparse_transformer.errors import InputError
from sparse_transformer.modality import Audio, Text, png_bytes
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
    grid = Image.open(io.BytesIO(png_bytes(images, nrow=2, scale=1)))
    assert grid.size == (2 * 7 + 1, 7 + 1)  # a 1-pixel border around each image
    pixels = torch.from_numpy(np.asarray(grid.convert("RGB"))).permute(2, 0, 1)  # (C, H, W)
    assert torch.equal(pixels[:, 1:7, 1:7], images[0]) and torch.equal(pixels[:, 1:7, 8:14], images[1])


def test_pictures_are_scaled_up_to_be_seen_pixel_for_pixel():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    grid = Image.open(io.BytesIO(png_bytes(images)))  # 2 x 2 images of 8 x 8 with borders: 19 x 19
    assert grid.size == (19 * 14, 19 * 14)  # the smallest whole scale giving 256 pixels or more
    pixels = np.asarray(grid.convert("RGB"))
    assert (pixels[14:28, 14:28] == images[0, :, 0, 0].numpy()).all()  # image 0's first pixel, 14 x 14 on screen
    assert Image.open(io.BytesIO(png_bytes(images, scale=3))).size == (57, 57)


def test_mu_law_error_is_within_the_quantisation_bound():
    x = torch.linspace(-1, 1, 20001)
    codes = audio_codec.encode(x)
    assert codes.dtype == torch.uint8 and codes.min() == 0 and codes.max() == 255
    err = (audio_codec.decode(codes) - x).abs()
    # 256 uniform levels of the companded signal: half a level is 1/255 there, which maps back to
    # at most (|x| + 1/mu) * ((1 + mu)^(1/255) - 1) in the waveform.
    mu = 255
    bound = (x.abs() + 1 / mu) * ((1 + mu) ** (1 / 255) - 1) + 1e-6
    assert (err <= bound).all()
    assert err.max() > 0.5 * bound.max()  # the bound is tight, not vacuous
    assert torch.equal(audio_codec.encode(audio_codec.decode(codes)), codes)


def test_wav_output_has_the_rate_and_length():
    codes = audio_codec.encode(torch.sin(torch.arange(800) / 10))
    with wave.open(io.BytesIO(audio_codec.wav_bytes(codes, 8000))) as w:
        assert (w.getframerate(), w.getnframes(), w.getnchannels(), w.getsampwidth()) == (8000, 800, 1, 2)


def test_units_and_file_names_follow_the_modality():
    text, image, audio = Text(), ImageModality((8, 8, 3)), Audio(8000)
    assert (text.unit, image.unit, audio.unit) == ("bpb", "bpd", "bpd")
    tokens = torch.randint(0, 256, (2, 192))
    assert list(text.files(tokens)) == ["sample_0.txt", "sample_1.txt"]
    assert list(image.files(tokens)) == ["samples.png"]
    assert list(audio.files(tokens)) == ["sample_0.wav", "sample_1.wav"]


def test_checkpoints_keep_the_modality_itself():
    for modality in (Text(), ImageModality((8, 8, 3)), Audio(8000)):
        buffer = io.BytesIO()
        torch.save({"modality": modality}, buffer)
        buffer.seek(0)
        assert torch.load(buffer, weights_only=True)["modality"] == modality


def test_how_samples_start_and_how_long_they_are():
    text, image, audio = Text(), ImageModality((4, 4, 3)), Audio(8000)
    assert text.prompt() == [10] and text.prompt("Hi") == [72, 105] and text.prompt("é") == [0xC3, 0xA9]
    assert image.prompt() == audio.prompt() == [0]
    assert text.default_length(64, prompt_len=4) == 61  # fills the context after the prompt
    assert text.default_length(64, prompt_len=500) == 64
    assert image.default_length(48, 1) == 48
    assert audio.default_length(256, 1) == 8000  # one second at 8 kHz, more than one context
    with pytest.raises(InputError, match="the prompt is empty"):
        text.prompt("")
    assert image.top_half == 1 + 2 * 4 * 3  # the start token and two of four rows


def test_each_modality_names_the_sample_options_it_takes():
    assert Text.options == ("prompt", "prompt_file", "length")
    assert "complete" in ImageModality.options and "prompt" not in ImageModality.options
    assert "seconds" in Audio.options and "complete" not in Audio.options
