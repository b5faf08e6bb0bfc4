"""Decoding client images into tensors: faithful round trips, and refusal of hostile bytes."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from xaid_server.errors import InvalidArgument
from xaid_server.model_config import ImageConfig
from xaid_server.preprocess import decode_image, tensor_to_image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _rgb(width: int = 24, height: int = 16) -> npt.NDArray[np.uint8]:
    """A picture with distinct channels and gradients in both directions."""
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [cols * 255 // max(1, width - 1), rows * 255 // max(1, height - 1), (rows * cols) % 256],
        axis=2,
    )
    return pixels.astype(np.uint8)


def _encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header declaring a size far beyond its tiny pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def _assert_refused(data: bytes, *, max_pixels: int = 50_000_000) -> InvalidArgument:
    config = ImageConfig(height=8, width=8)
    with pytest.raises(InvalidArgument) as info:
        decode_image(data, config, max_pixels=max_pixels)
    err = info.value
    assert err.field == "image"
    assert err.message.startswith("image: ")
    assert "PIL" not in err.message
    assert "/" not in err.message
    return err


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("normalise", [False, True])
def test_rgb_round_trip(layout: str, normalise: bool) -> None:
    pixels = _rgb()
    config = ImageConfig(height=16, width=24, channels=3, layout=layout)
    if normalise:
        config = replace(config, scale=255.0, mean=MEAN, std=STD)
    x, original = decode_image(_encode(Image.fromarray(pixels)), config)

    assert x.dtype == np.float32
    assert x.shape == ((1, 3, 16, 24) if layout == "NCHW" else (1, 16, 24, 3))
    assert original.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(original), pixels)
    back = tensor_to_image(x[0], config, layout)
    assert back.mode == "RGB"
    assert back.size == (24, 16)
    assert np.abs(np.asarray(back, dtype=int) - pixels.astype(int)).max() <= 1


def test_normalisation_matches_the_config() -> None:
    pixels = _rgb()
    config = ImageConfig(height=16, width=24, layout="NHWC", scale=255.0, mean=MEAN, std=STD)
    x, _ = decode_image(_encode(Image.fromarray(pixels)), config)
    expected = (pixels / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(x[0], expected, atol=1e-5)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("normalise", [False, True])
def test_grayscale_round_trip(layout: str, normalise: bool) -> None:
    pixels = _rgb()
    config = ImageConfig(height=16, width=24, channels=1, layout=layout)
    if normalise:
        config = replace(config, scale=255.0, mean=(0.5,), std=(0.25,))
    x, original = decode_image(_encode(Image.fromarray(pixels)), config)

    assert x.shape == ((1, 1, 16, 24) if layout == "NCHW" else (1, 16, 24, 1))
    assert original.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(original), pixels)  # colour kept for display
    grey = np.asarray(Image.fromarray(pixels).convert("L"), dtype=int)
    back = np.asarray(tensor_to_image(x[0], config, layout), dtype=int)
    assert back.shape == (16, 24, 3)
    assert np.abs(back - grey[:, :, None]).max() <= 1


def test_resizes_to_the_config_size_and_keeps_the_original() -> None:
    image = Image.fromarray(_rgb(width=40, height=30))
    config = ImageConfig(height=12, width=16, layout="NHWC")
    x, original = decode_image(_encode(image), config)
    assert x.shape == (1, 12, 16, 3)
    assert original.size == (40, 30)
    expected = np.asarray(image.resize((16, 12), Image.Resampling.BILINEAR), dtype=np.float32)
    np.testing.assert_array_equal(x[0], expected)


def test_jpeg_is_accepted() -> None:
    config = ImageConfig(height=16, width=24)
    x, original = decode_image(_encode(Image.fromarray(_rgb()), "JPEG", quality=95), config)
    assert x.shape == (1, 3, 16, 24)
    assert original.size == (24, 16)
    assert np.abs(np.asarray(original, dtype=int) - _rgb().astype(int)).mean() < 8


def test_16_bit_grayscale_keeps_its_tones() -> None:
    wide = (np.arange(16 * 24).reshape(16, 24) * 170).astype(np.uint16)
    config = ImageConfig(height=16, width=24, channels=1)
    x, _ = decode_image(_encode(Image.fromarray(wide)), config)
    np.testing.assert_allclose(x[0, 0], np.rint(wide / 257.0), atol=0.5)


def test_transparency_is_dropped_quietly() -> None:
    palette = Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = bytes([0] * 4 + [255] * 12)
    rgba = Image.fromarray(np.dstack([_rgb(), np.full((16, 24), 100, np.uint8)]))
    config = ImageConfig(height=16, width=24)
    for image in (palette, rgba):
        x, original = decode_image(_encode(image), config)
        assert x.shape == (1, 3, 16, 24)
        assert original.mode == "RGB"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"definitely not an image", id="garbage"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, id="corrupt-png"),
        pytest.param(b"\xff\xd8\xff\xe0" + b"\x13" * 40, id="corrupt-jpeg"),
    ],
)
def test_undecodable_bytes_are_refused(data: bytes) -> None:
    _assert_refused(data)


def test_truncated_png_is_refused() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise))
    _assert_refused(data[: len(data) // 2])


def test_truncated_jpeg_is_refused() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG")
    _assert_refused(data[: len(data) // 2])


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_other_formats_are_refused(fmt: str) -> None:
    err = _assert_refused(_encode(Image.fromarray(_rgb()), fmt))
    assert "PNG or JPEG" in err.message


@pytest.mark.parametrize(
    ("width", "height"),
    [(100_000, 100_000), (10_000, 10_000), (8_000, 8_000)],
    ids=["past-pillow-error", "in-pillow-warning-band", "past-our-limit"],
)
def test_huge_declared_size_is_refused_before_decoding(width: int, height: int) -> None:
    err = _assert_refused(_png_claiming(width, height))
    assert "larger than" in err.message


def test_max_pixels_is_honoured() -> None:
    data = _encode(Image.fromarray(_rgb()))
    err = _assert_refused(data, max_pixels=24 * 16 - 1)
    assert "larger than" in err.message
    x, _ = decode_image(data, ImageConfig(height=4, width=4), max_pixels=24 * 16)
    assert x.shape == (1, 3, 4, 4)


def test_tensor_to_image_without_config_stretches_to_full_range() -> None:
    x = np.linspace(-3.0, 5.0, 2 * 4 * 6).reshape(2, 4, 6)[:1]  # one channel, NCHW
    image = tensor_to_image(x, None)
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert image.size == (6, 4)
    assert pixels.min() == 0
    assert pixels.max() == 255
    assert (pixels[:, :, 0] == pixels[:, :, 1]).all()
    assert (pixels[:, :, 1] == pixels[:, :, 2]).all()


def test_tensor_to_image_tolerates_constant_and_non_finite_input() -> None:
    assert np.asarray(tensor_to_image(np.full((3, 4, 4), 7.0), None)).max() == 0
    x = np.full((4, 4, 3), np.nan)
    x[0, 0] = [1.0, 2.0, np.inf]
    image = tensor_to_image(x, None, "NHWC")
    assert image.size == (4, 4)


def test_tensor_to_image_rejects_unusable_shapes() -> None:
    with pytest.raises(ValueError, match="channels"):
        tensor_to_image(np.zeros((4, 8, 8)), None)
    with pytest.raises(ValueError, match="dimensions"):
        tensor_to_image(np.zeros((1, 3, 8, 8)), None)
    with pytest.raises(ValueError, match="mean"):
        tensor_to_image(np.zeros((1, 8, 8)), ImageConfig(8, 8, mean=(0.1, 0.2, 0.3)))
